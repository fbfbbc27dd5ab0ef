#include "image_supply.h"

#include <algorithm>

#include "io.h"
#include "wire.h"

namespace uffdpc {

namespace {
// Page p of r is all zeros in the image (every source page behind it).
bool ImageZero(const ImagePages& img, const TargetRegion& r, uint64_t p) {
  for (uint64_t s = r.SourceOf(p); s < r.SourceOf(p + 1); s++)
    if (!img.IsZero(s)) return false;
  return true;
}

// The scheduler's regions are the target map's: a page is a target page (a huge page installs whole).
std::vector<PageScheduler::Region> ShapeOf(const TargetMap& map) {
  std::vector<PageScheduler::Region> shape;
  for (auto& r : map.regions()) shape.push_back({r->pages, 1, wire::MaxRunPages(r->pageSize)});
  return shape;
}
}  // namespace

ImageSupply::ImageSupply(TargetMap& map, Installer& installer, EngineLife& life, std::vector<std::unique_ptr<ImagePages>> image, Window window, bool background)
    : map_(map),
      installer_(installer),
      life_(life),
      image_(std::move(image)),
      scheduler_(ShapeOf(map), {window.forward, window.backward}),
      windowed_(window.forward || window.backward),
      backgroundOn_(background) {
  faultRuns_.reserve(1);
  scheduler_.WakeOnWork(fillMu_, fillCv_);
}

ImageSupply::~ImageSupply() { Release(); }

void ImageSupply::Ask(TargetRegion& r, uint64_t page) {
  faultRuns_.clear();
  // The fault thread installs the page itself even when a fill run claimed it
  // already: the faulting thread never waits behind a whole run of the
  // working set or the background (whichever lands second is a duplicate).
  scheduler_.Request(r.index, page, 1, faultRuns_);
  InstallResult result = InstallFromImage(r, page, 1, wire::kRequested, /*mayWait=*/false);
  if (result == kStop) return;
  if (result == kBusy || windowed_ || scheduler_.InWorkingSet(r.index, page)) scheduler_.Queue({r.index, page, 1, 0});
}

void ImageSupply::Start(int cpu) {
  life_.WakeOnStop(fillMu_, fillCv_);
  life_.Spawn("pc-fill", cpu, [this] { FillLoop(); });
}

void ImageSupply::AlreadyHeld(TargetRegion& r, uint64_t first, uint64_t count) {
  for (uint64_t p = first; p < first + count; p++) scheduler_.Claim(r.index, p);
}

void ImageSupply::Release() {
  for (auto& pages : image_) pages->Release();
}

// Installs pages [first, first+count) of r from the image, a data or zero
// run at a time. `mayWait`: retry while the layout changes (not on the fault thread).
InstallResult ImageSupply::InstallFromImage(TargetRegion& r, uint64_t first, uint64_t count, uint32_t reason, bool mayWait) {
  const ImagePages& img = *image_[r.sourceRegion];
  // Where whole huge pages go in, each aligned 2 MiB of the run that is not all
  // zeros goes in as one, its zero pages as data with the rest (as the kernel's
  // own huge pages hold them); all-zero stretches stay zero pages (no memory).
  const bool huge = installer_.MayInstallHuge(r, count) && img.pageSize == r.pageSize;
  uint64_t p = first, end = first + count;
  while (p < end) {
    uint64_t whole = huge ? installer_.HugePageAt(r, p, end) : 0;
    if (whole) {
      uint64_t k = p;
      while (k < p + whole && ImageZero(img, r, k)) k++;
      if (k < p + whole) {
        InstallResult result = installer_.Install(r, p, whole, img.Page(r.SourceOf(p)), reason, "image", 0, mayWait);
        if (result != kOk) return result;
        p += whole;
        continue;
      }
    }
    bool zero = ImageZero(img, r, p);
    uint64_t q = p + 1;
    while (q < end && ImageZero(img, r, q) == zero && !(huge && installer_.HugePageAt(r, q, end))) q++;
    InstallResult result = installer_.Install(r, p, q - p, zero ? nullptr : img.Page(r.SourceOf(p)), reason, "image", 0, mayWait);
    if (result != kOk) return result;
    p = q;
  }
  return kOk;
}

InstallResult ImageSupply::InstallRun(const PageRun& run, bool mayWait) {
  return InstallFromImage(*map_.regions()[run.region], run.first, run.count, static_cast<uint32_t>(run.why), mayWait);
}

const char* ImageSupply::AddPrefetch(const uint64_t* entries, size_t count) {
  std::vector<uint64_t> set;
  if (const char* bad = map_.TargetEntries(entries, count, set)) return bad;
  scheduler_.AddWorkingSet(set);
  return nullptr;
}

void ImageSupply::StartBackground() {
  std::lock_guard<std::mutex> lock(fillMu_);
  backgroundOn_ = true;
  fillCv_.notify_one();
}

void ImageSupply::FillLoop() {
  while (!life_.Stopping()) {
    QueuedRequest request;
    bool queued;
    {
      std::unique_lock<std::mutex> lock(fillMu_);
      fillCv_.wait(lock, [&] { return life_.Stopping() || (!fillFailed_ && (scheduler_.HasWork() || (backgroundOn_ && !backgroundDone_))); });
      if (life_.Stopping()) return;
      queued = scheduler_.TakeRequest(&request);
    }
    if (queued) {
      FillAround(request);
    } else if (!PrefetchBatch() && !BackgroundRun()) {
      std::lock_guard<std::mutex> lock(fillMu_);
      backgroundDone_ = true;
    }
  }
}

// A faulted page (again, if the fault thread could not install it) and what
// goes with it: its window, and its cluster of the working set being replayed.
// (A page the fault thread installed is looked at again: counted a duplicate.)
void ImageSupply::FillAround(const QueuedRequest& request) {
  TargetRegion& r = *map_.regions()[request.region];
  if (InstallFromImage(r, request.first, request.count, wire::kRequested, true) == kStop) return StopFilling();
  fillRuns_.clear();
  scheduler_.Around(request.region, request.first, request.count, UINT64_MAX, fillRuns_);
  for (const PageRun& run : fillRuns_)
    if (InstallRun(run, true) == kStop) return StopFilling();
}

// Installs the next batch of the working set, at most one run's bytes, in
// its order: each entry with the pages of the set contiguous to it, as one
// run (a cold start touches clusters: code, heap), so a scattered order
// still goes in with few ioctls. False when none is left.
bool ImageSupply::PrefetchBatch() {
  uint64_t bytes = 0;
  bool any = false;
  PageRun run;
  while (bytes < wire::kMaxRunBytes && scheduler_.NextWorkingSetRun(&run)) {
    any = true;
    if (InstallRun(run, true) == kStop) {
      StopFilling();
      return false;
    }
    bytes += run.count * map_.regions()[run.region]->pageSize;
  }
  return any;
}

// One background run: the next pages not claimed after the last fault, then
// on to the following regions. False once every page was claimed.
bool ImageSupply::BackgroundRun() {
  {
    std::lock_guard<std::mutex> lock(fillMu_);
    if (!backgroundOn_) return true;  // a request or the working set woke the thread, not the background
  }
  PageRun run;
  if (!scheduler_.NextBackgroundRun(UINT64_MAX, &run)) return false;
  if (InstallRun(run, true) == kStop) StopFilling();
  return true;
}

// An install failed for good (the process is gone): nothing more is filled.
void ImageSupply::StopFilling() {
  std::lock_guard<std::mutex> lock(fillMu_);
  fillFailed_ = true;
}

}  // namespace uffdpc
