#include "image_supply.h"

#include <algorithm>

#include "wire.h"

namespace uffdpc {

namespace {
// Page p of r is all zeros in the image (every source page behind it).
bool ImageZero(const ImagePages& img, const TargetRegion& r, uint64_t p) {
  for (uint64_t s = r.SourceOf(p); s < r.SourceOf(p + 1); s++)
    if (!img.IsZero(s)) return false;
  return true;
}
}  // namespace

ImageSupply::ImageSupply(TargetMap& map, Installer& installer, EngineLife& life, std::vector<std::unique_ptr<ImagePages>> image, Window window, bool background)
    : map_(map), installer_(installer), life_(life), image_(std::move(image)), window_(window), backgroundOn_(background) {
  // The working set's pages, looked up by the fault thread: allocated once, here.
  for (uint64_t pages : map.sourcePageCounts()) prefetchSet_.push_back(std::make_unique<AtomicBitmap>(pages));
}

ImageSupply::~ImageSupply() { Release(); }

void ImageSupply::Ask(TargetRegion& r, uint64_t page) {
  lastFault_.store((uint64_t(r.index) << 48) | page, std::memory_order_relaxed);
  faultSeq_.fetch_add(1, std::memory_order_release);
  InstallResult result = InstallFromImage(r, page, 1, wire::kRequested, /*mayWait=*/false);
  if (result == kStop) return;
  if (result == kBusy || window_.forward || window_.backward || InWorkingSet(r, page)) QueueFill(r, page);
}

void ImageSupply::Start(int cpu) {
  life_.WakeOnStop(fillMu_, fillCv_);
  life_.Spawn("pc-fill", cpu, [this] { FillLoop(); });
}

void ImageSupply::Release() {
  for (auto& pages : image_) pages->Release();
}

// Installs pages [first, first+count) of r from the image, a data or zero
// run at a time. `mayWait`: retry while the layout changes (not on the fault thread).
InstallResult ImageSupply::InstallFromImage(TargetRegion& r, uint64_t first, uint64_t count, uint32_t reason, bool mayWait) {
  const ImagePages& img = *image_[r.sourceRegion];
  uint64_t p = first, end = first + count;
  while (p < end) {
    bool zero = ImageZero(img, r, p);
    uint64_t q = p + 1;
    while (q < end && ImageZero(img, r, q) == zero) q++;
    InstallResult result = installer_.Install(r, p, q - p, zero ? nullptr : img.Page(r.SourceOf(p)), reason, "image", 0, mayWait);
    if (result != kOk) return result;
    p = q;
  }
  return kOk;
}

void ImageSupply::QueueFill(TargetRegion& r, uint64_t page) {
  std::lock_guard<std::mutex> lock(fillMu_);
  fillQueue_.push_back({&r, page});
  fillCv_.notify_one();
}

const char* ImageSupply::AddPrefetch(const uint64_t* entries, size_t count) {
  for (size_t i = 0; i < count; i++) {
    uint64_t region = entries[i] >> 48, page = entries[i] & ((1ull << 48) - 1);
    if (region >= map_.sourceRegions() || page >= map_.sourcePages(static_cast<uint32_t>(region))) return "a prefetch entry lies outside the image";
  }
  std::lock_guard<std::mutex> lock(fillMu_);
  for (size_t i = 0; i < count; i++) prefetchSet_[entries[i] >> 48]->Claim(entries[i] & ((1ull << 48) - 1));
  prefetch_.insert(prefetch_.end(), entries, entries + count);
  fillCv_.notify_one();
  return nullptr;
}

void ImageSupply::StartBackground() {
  std::lock_guard<std::mutex> lock(fillMu_);
  backgroundOn_ = true;
  fillCv_.notify_one();
}

void ImageSupply::FillLoop() {
  while (!life_.Stopping()) {
    std::pair<TargetRegion*, uint64_t> item{nullptr, 0};
    {
      std::unique_lock<std::mutex> lock(fillMu_);
      fillCv_.wait(lock, [&] {
        return life_.Stopping() || !fillQueue_.empty() || prefetchNext_ < prefetch_.size() || (backgroundOn_ && !backgroundDone_ && !fillFailed_);
      });
      if (life_.Stopping()) return;
      if (!fillQueue_.empty()) {
        item = fillQueue_.front();
        fillQueue_.pop_front();
      }
    }
    if (item.first) {
      FillAround(*item.first, item.second);
    } else if (!PrefetchBatch()) {
      BackgroundRun();
    }
  }
}

// A faulted page (again, if the fault thread could not install it) and its window.
void ImageSupply::FillAround(TargetRegion& r, uint64_t page) {
  if (InstallFromImage(r, page, 1, wire::kRequested, true) == kStop) return StopFilling();
  // A page of the working set being replayed brings its cluster of the set at once.
  if (InWorkingSet(r, page) && InstallCluster(r, page) == kStop) return StopFilling();
  uint64_t hi = std::min<uint64_t>(r.pages, page + 1 + window_.forward), lo = page > window_.backward ? page - window_.backward : 0;
  if (hi > page + 1 && InstallFromImage(r, page + 1, hi - page - 1, wire::kPrefault, true) == kStop) return StopFilling();
  if (page > lo && InstallFromImage(r, lo, page - lo, wire::kPrefault, true) == kStop) return StopFilling();
}

// Installs the next batch of the working set, at most one run's bytes, in
// its order: each entry with the pages of the set contiguous to it, as one
// run (a cold start touches clusters: code, heap), so a scattered order
// still goes in with few ioctls. False when none is left.
bool ImageSupply::PrefetchBatch() {
  uint64_t bytes = 0;
  bool any = false;
  while (bytes < wire::kMaxRunBytes) {
    uint64_t e;
    {
      std::lock_guard<std::mutex> lock(fillMu_);
      if (prefetchNext_ >= prefetch_.size()) break;
      e = prefetch_[prefetchNext_++];
    }
    any = true;
    uint32_t region = static_cast<uint32_t>(e >> 48);
    uint64_t page = e & ((1ull << 48) - 1);
    for (auto& r : map_.regions()) {
      if (r->sourceRegion != region || page < r->sourcePage || page >= r->sourcePage + r->SourceSpan()) continue;
      uint64_t at = (page - r->sourcePage) / r->ratio;
      if (r->received->Test(at) || r->removed->Test(at)) break;  // in already, with its cluster or on demand
      uint64_t pages = 0;
      if (InstallCluster(*r, at, &pages) == kStop) {
        StopFilling();
        return false;
      }
      bytes += pages * r->pageSize;
      break;
    }
  }
  return any;
}

// Page `at` of r and the pages of the working set contiguous to it, still
// missing, as one run (at most one run's bytes). `*pages`: how many it covered.
InstallResult ImageSupply::InstallCluster(TargetRegion& r, uint64_t at, uint64_t* pages) {
  const AtomicBitmap& set = *prefetchSet_[r.sourceRegion];
  auto wanted = [&](uint64_t p) { return set.Test(r.SourceOf(p)) && !r.received->Test(p) && !r.removed->Test(p); };
  uint64_t maxRun = wire::MaxRunPages(r.pageSize), lo = at, hi = at + 1;
  while (lo > 0 && hi - lo < maxRun && wanted(lo - 1)) lo--;
  while (hi < r.pages && hi - lo < maxRun && wanted(hi)) hi++;
  if (pages) *pages = hi - lo;
  return InstallFromImage(r, lo, hi - lo, wire::kPrefetch, true);
}

// One background run: the next missing pages after the last fault, then on
// to the following regions; done once every page is settled.
void ImageSupply::BackgroundRun() {
  if (map_.residentPages() >= map_.totalPages()) {
    std::lock_guard<std::mutex> lock(fillMu_);
    backgroundDone_ = true;
    return;
  }
  auto& regions = map_.regions();
  uint64_t seq = faultSeq_.load(std::memory_order_acquire);
  if (seq != bgSeenSeq_) {  // follow the workload: continue after its last fault
    bgSeenSeq_ = seq;
    uint64_t last = lastFault_.load(std::memory_order_relaxed);
    bgRegion_ = static_cast<size_t>(last >> 48) % regions.size();
    bgCursor_ = (last & ((1ull << 48) - 1)) + 1;
  }
  TargetRegion& r = *regions[bgRegion_];
  uint64_t p = r.settled->NextClear(bgCursor_);
  if (p >= r.pages) {
    bgRegion_ = (bgRegion_ + 1) % regions.size();
    bgCursor_ = 0;
    return;
  }
  uint64_t n = 1, maxRun = wire::MaxRunPages(r.pageSize);
  while (p + n < r.pages && n < maxRun && !r.settled->Test(p + n)) n++;
  bgCursor_ = p + n;
  if (InstallFromImage(r, p, n, wire::kBackground, true) == kStop) StopFilling();
}

// An install failed for good (the process is gone): nothing more is filled.
void ImageSupply::StopFilling() {
  std::lock_guard<std::mutex> lock(fillMu_);
  fillFailed_ = true;
  fillQueue_.clear();
  prefetchNext_ = prefetch_.size();
}

}  // namespace uffdpc
