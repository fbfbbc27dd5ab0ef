#include "store_supply.h"

#include <algorithm>

#include "wire.h"

namespace uffdpc {

namespace {
std::vector<PageScheduler::Region> ShapeOf(const TargetMap& map) {
  std::vector<PageScheduler::Region> shape;
  for (auto& r : map.regions()) shape.push_back({r->pages, 1, wire::MaxRunPages(r->pageSize)});
  return shape;
}
}  // namespace

StoreSupply::StoreSupply(TargetMap& map, Installer& installer, EventSink& events, const std::vector<uint64_t>& chunkBytes, Window window, bool background)
    : map_(map),
      installer_(installer),
      events_(events),
      scheduler_(ShapeOf(map), {window.forward, window.backward}),
      windowPages_(window.forward + window.backward),
      backgroundOn_(background) {
  for (auto& r : map.regions()) {
    uint64_t chunkPages = std::max<uint64_t>(1, chunkBytes[r->sourceRegion] / map.sourcePageSize(r->sourceRegion));
    Pieces p;
    p.sourcePages = std::max(chunkPages, r->ratio);  // both powers of two: whole chunks and whole pages here
    p.first = r->sourcePage / p.sourcePages;
    p.count = (r->sourcePage + r->SourceSpan() - 1) / p.sourcePages - p.first + 1;
    p.asked = std::make_unique<AtomicBitmap>(p.count);
    piecePages_ = std::max(piecePages_, p.sourcePages / r->ratio);
    pieces_.push_back(std::move(p));
  }
  faultRuns_.reserve(8);
}

void StoreSupply::PagesOf(const TargetRegion& r, uint64_t piece, uint64_t* first, uint64_t* end) const {
  uint64_t per = pieces_[r.index].sourcePages;
  uint64_t from = std::max(piece * per, r.sourcePage), to = std::min((piece + 1) * per, r.sourcePage + r.SourceSpan());
  *first = (from - r.sourcePage) / r.ratio;
  *end = (to - r.sourcePage) / r.ratio;
}

bool StoreSupply::AskPiece(TargetRegion& r, uint64_t piece) {
  if (!pieces_[r.index].asked->Claim(piece - pieces_[r.index].first)) return false;
  uint64_t first, end;
  PagesOf(r, piece, &first, &end);
  for (uint64_t p = first; p < end; p++) scheduler_.Claim(r.index, p);  // no run of the scheduler yields them again
  return true;
}

StoreSupply::Want StoreSupply::WantOf(const TargetRegion& r, uint64_t piece, Why why) const {
  uint64_t first, end;
  PagesOf(r, piece, &first, &end);
  return {r.index, piece, r.sourceRegion, r.SourceOf(first), (end - first) * r.ratio, why};
}

void StoreSupply::AskRun(const PageRun& run, std::vector<Want>& out) {
  TargetRegion& r = *map_.regions()[run.region];
  uint64_t last = PieceOf(r, run.first + run.count - 1);
  for (uint64_t piece = PieceOf(r, run.first); piece <= last; piece++)
    if (AskPiece(r, piece)) out.push_back(WantOf(r, piece, run.why));
}

void StoreSupply::Ask(TargetRegion& r, uint64_t page) {
  std::vector<Want> wants;
  faultRuns_.clear();
  scheduler_.Request(r.index, page, 1, faultRuns_);  // the background follows this fault from now on
  uint64_t piece = PieceOf(r, page);
  if (AskPiece(r, piece)) wants.push_back(WantOf(r, piece, Why::kRequested));
  // (Already asked for: the piece is on its way, and installing it wakes this thread.)
  if (windowPages_) {
    faultRuns_.clear();
    scheduler_.Around(r.index, page, 1, UINT64_MAX, faultRuns_);
    for (const PageRun& run : faultRuns_) AskRun(run, wants);
  }
  if (wants.empty()) return;
  std::lock_guard<std::mutex> lock(mu_);
  urgent_.insert(urgent_.end(), wants.begin(), wants.end());
  tell_ = true;
}

void StoreSupply::Flush() {
  if (!tell_) return;
  tell_ = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (told_ || urgent_.empty()) return;
    told_ = true;
  }
  events_.Emit({"store-wanted"});
}

void StoreSupply::AlreadyHeld(TargetRegion& r, uint64_t first, uint64_t count) {
  for (uint64_t p = first; p < first + count; p++) scheduler_.Claim(r.index, p);
}

void StoreSupply::TakeUrgent(std::vector<Want>& out) {
  std::lock_guard<std::mutex> lock(mu_);
  out.insert(out.end(), urgent_.begin(), urgent_.end());
  urgent_.clear();
  told_ = false;
}

void StoreSupply::TakeAhead(size_t max, std::vector<Want>& out) {
  PageRun run;
  while (out.size() < max && scheduler_.NextWorkingSetRun(&run)) AskRun(run, out);
  if (!backgroundOn_.load(std::memory_order_acquire)) return;
  // About a piece per run: the cursor moves on a piece at a time.
  while (out.size() < max && scheduler_.NextBackgroundRun(piecePages_, &run)) AskRun(run, out);
}

const char* StoreSupply::InstallPiece(uint32_t region, uint64_t piece, Why why, const uint8_t* data, uint64_t length) {
  if (region >= map_.regions().size()) return "no such region";
  TargetRegion& r = *map_.regions()[region];
  const Pieces& ps = pieces_[region];
  if (piece < ps.first || piece >= ps.first + ps.count) return "no such piece in the region";
  if (!ps.asked->Test(piece - ps.first)) return "a piece that was not asked for";
  uint64_t first, end;
  PagesOf(r, piece, &first, &end);
  if (data && length != (end - first) * r.pageSize) return "the piece's length does not fit its pages";
  // The pages a thread faulted on count as requested; the others as what the piece was asked for.
  for (uint64_t p = first; p < end;) {
    bool requested = r.requested->Test(p);
    uint64_t q = p + 1;
    while (q < end && r.requested->Test(q) == requested) q++;
    const uint8_t* at = data ? data + (p - first) * r.pageSize : nullptr;
    if (installer_.Install(r, p, q - p, at, requested ? wire::kRequested : static_cast<uint32_t>(why), "store", 0, /*mayWait=*/true) == kStop) return nullptr;
    p = q;
  }
  return nullptr;
}

const char* StoreSupply::AddPrefetch(const uint64_t* entries, size_t count) {
  std::vector<uint64_t> set;
  if (const char* bad = map_.TargetEntries(entries, count, set)) return bad;
  scheduler_.AddWorkingSet(set);
  return nullptr;
}

}  // namespace uffdpc
