#include "page_scheduler.h"

#include <algorithm>

namespace uffdpc {

PageScheduler::PageScheduler(std::vector<Region> regions, Window window) : window_(window) {
  for (const Region& shape : regions) {
    State s{shape, std::make_unique<AtomicBitmap>(shape.pages), nullptr};
    if (s.shape.unit == 0) s.shape.unit = 1;
    s.shape.maxRun = std::max(s.shape.maxRun - s.shape.maxRun % s.shape.unit, s.shape.unit);
    totalPages_ += shape.pages;
    regions_.push_back(std::move(s));
  }
}

bool PageScheduler::Claim(uint32_t region, uint64_t page) {
  if (!regions_[region].claimed->Claim(page)) return false;
  claimed_.fetch_add(1, std::memory_order_acq_rel);
  return true;
}

bool PageScheduler::ClaimUnit(State& r, uint64_t first) {
  if (!r.claimed->Claim(first)) return false;
  uint64_t mine = 1;  // (pages of it claimed one by one already, e.g. held by the other side, are not counted twice)
  for (uint64_t k = first + 1; k < first + r.shape.unit; k++)
    if (r.claimed->Claim(k)) mine++;
  claimed_.fetch_add(mine, std::memory_order_acq_rel);
  return true;
}

// Appends unit [at, at + unit) to the runs: merged into the last run when it
// continues it (same region and reason, adjacent, within maxRun), else a new run.
static void Append(PageRuns& out, uint32_t region, uint64_t at, uint64_t unit, uint64_t maxRun, Why why) {
  if (!out.empty()) {
    PageRun& last = out.back();
    if (last.region == region && last.why == why && last.count + unit <= maxRun) {
      if (last.first + last.count == at) {
        last.count += unit;
        return;
      }
      if (at + unit == last.first) {  // growing downward (the backward window, nearest first)
        last.first = at;
        last.count += unit;
        return;
      }
    }
  }
  out.push_back({region, at, unit, why});
}

uint64_t PageScheduler::Request(uint32_t region, uint64_t first, uint64_t count, PageRuns& out) {
  State& r = regions_[region];
  uint64_t unit = r.shape.unit, from = first - first % unit, to = std::min(r.shape.pages, (first + count + unit - 1) / unit * unit);
  follow_.store(static_cast<uint64_t>(region) << 48 | to, std::memory_order_relaxed);
  followSeq_.fetch_add(1, std::memory_order_release);
  uint64_t before = 0;
  for (uint64_t at = from; at < to; at += unit) {
    if (ClaimUnit(r, at))
      Append(out, region, at, unit, r.shape.maxRun, Why::kRequested);
    else
      before += unit;
  }
  return before;
}

void PageScheduler::ClaimRange(uint32_t id, uint64_t from, uint64_t to, Why why, uint64_t& room, PageRuns& out) {
  State& r = regions_[id];
  for (uint64_t at = from; at < to && room >= r.shape.unit; at += r.shape.unit) {
    if (!ClaimUnit(r, at)) continue;
    room -= r.shape.unit;
    Append(out, id, at, r.shape.unit, r.shape.maxRun, why);
  }
}

void PageScheduler::Around(uint32_t region, uint64_t first, uint64_t count, uint64_t room, PageRuns& out) {
  State& r = regions_[region];
  uint64_t unit = r.shape.unit, from = first - first % unit, to = std::min(r.shape.pages, (first + count + unit - 1) / unit * unit);
  // The window: forward, ascending; then backward, nearest first (so a short room keeps the nearest).
  ClaimRange(region, to, std::min(r.shape.pages, to + window_.forward * unit), Why::kWindow, room, out);
  for (uint64_t k = 1; k <= window_.backward && k * unit <= from && room >= unit; k++) {
    uint64_t at = from - k * unit;
    if (!ClaimUnit(r, at)) continue;
    room -= unit;
    Append(out, region, at, unit, r.shape.maxRun, Why::kWindow);
  }
  // A request inside the working set being replayed brings the set's pages contiguous to it (a cold start touches clusters).
  if (unit > 1 || !hasSet_.load(std::memory_order_acquire)) return;
  const AtomicBitmap& set = *r.workingSet;
  uint64_t lo = first, hi = first + count;
  bool inSet = false;
  for (uint64_t p = first; p < hi && !inSet; p++) inSet = set.Test(p);
  if (!inSet) return;
  while (lo > 0 && first - lo < r.shape.maxRun && set.Test(lo - 1)) lo--;
  while (hi < r.shape.pages && hi - first < r.shape.maxRun && set.Test(hi)) hi++;
  ClaimRange(region, lo, hi, Why::kWorkingSet, room, out);
}

void PageScheduler::Notify() {
  if (!wakeMu_) return;
  std::lock_guard<std::mutex> lock(*wakeMu_);
  wakeCv_->notify_all();
}

void PageScheduler::Queue(QueuedRequest request) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(request);
  }
  Notify();
}

bool PageScheduler::TakeRequest(QueuedRequest* request) {
  std::lock_guard<std::mutex> lock(mu_);
  if (queue_.empty()) return false;
  *request = queue_.front();
  queue_.pop_front();
  return true;
}

bool PageScheduler::HasWork() {
  std::lock_guard<std::mutex> lock(mu_);
  return !queue_.empty() || workingSetNext_ < workingSet_.size();
}

bool PageScheduler::AddWorkingSet(const std::vector<uint64_t>& entries) {
  for (uint64_t e : entries)
    if ((e >> 48) >= regions_.size() || (e & kPageMask) >= regions_[e >> 48].shape.pages) return false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!hasSet_.load(std::memory_order_relaxed)) {
      for (State& r : regions_) r.workingSet = std::make_unique<AtomicBitmap>(r.shape.pages);
      hasSet_.store(true, std::memory_order_release);  // the request path looks at it from now on
    }
    for (uint64_t e : entries) regions_[e >> 48].workingSet->Claim(e & kPageMask);
    workingSet_.insert(workingSet_.end(), entries.begin(), entries.end());
  }
  Notify();
  return true;
}

uint64_t PageScheduler::WorkingSetSize() {
  std::lock_guard<std::mutex> lock(mu_);
  return workingSet_.size();
}

bool PageScheduler::InWorkingSet(uint32_t region, uint64_t page) const {
  return hasSet_.load(std::memory_order_acquire) && regions_[region].workingSet->Test(page);
}

bool PageScheduler::NextWorkingSetRun(PageRun* run) {
  for (;;) {
    uint64_t e;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (workingSetNext_ >= workingSet_.size()) return false;
      e = workingSet_[workingSetNext_++];
    }
    uint32_t id = static_cast<uint32_t>(e >> 48);
    uint64_t page = e & kPageMask;
    State& r = regions_[id];
    if (r.shape.unit > 1) {  // the entry's whole unit
      uint64_t first = page - page % r.shape.unit;
      if (!ClaimUnit(r, first)) continue;
      *run = {id, first, r.shape.unit, Why::kWorkingSet};
      return true;
    }
    if (!Claim(id, page)) continue;  // claimed already: with its cluster, on request, or held
    const AtomicBitmap& set = *r.workingSet;
    uint64_t lo = page, hi = page + 1;
    while (hi < r.shape.pages && hi - lo < r.shape.maxRun && set.Test(hi) && Claim(id, hi)) hi++;
    while (lo > 0 && hi - lo < r.shape.maxRun && set.Test(lo - 1) && Claim(id, lo - 1)) lo--;
    *run = {id, lo, hi - lo, Why::kWorkingSet};
    return true;
  }
}

bool PageScheduler::NextBackgroundRun(uint64_t maxPages, PageRun* run) {
  if (regions_.empty()) return false;
  uint64_t seq = followSeq_.load(std::memory_order_acquire);
  if (seq != bgSeenSeq_) {  // follow the workload: go on after its last request
    bgSeenSeq_ = seq;
    uint64_t last = follow_.load(std::memory_order_relaxed);
    bgRegion_ = static_cast<uint32_t>(last >> 48) % regions_.size();
    bgCursor_ = last & kPageMask;
  }
  // At most one sweep of every region (the one the cursor is in twice: from the cursor, then from its start).
  for (size_t wraps = 0; wraps <= regions_.size() && !AllClaimed();) {
    State& r = regions_[bgRegion_];
    uint64_t p = r.claimed->NextClear(bgCursor_);
    if (p >= r.shape.pages) {  // nothing left from here in this region: the next one, from its start
      bgRegion_ = static_cast<uint32_t>((bgRegion_ + 1) % regions_.size());
      bgCursor_ = 0;
      wraps++;
      continue;
    }
    uint64_t unit = r.shape.unit, most = std::max(unit, std::min(maxPages, r.shape.maxRun)), n = 0;
    p -= p % unit;
    // Runs end on multiples of the longest run, so that after the first one
    // they cover whole aligned stretches (a destination installs an aligned
    // 2 MiB of small pages as one huge page).
    uint64_t toBoundary = r.shape.maxRun - p % r.shape.maxRun;
    if (toBoundary >= unit) most = std::min(most, toBoundary);
    while (p + n < r.shape.pages && n + unit <= most && ClaimUnit(r, p + n)) n += unit;
    bgCursor_ = p + std::max(n, unit);
    if (n == 0) continue;  // another thread took it first
    *run = {bgRegion_, p, n, Why::kBackground};
    return true;
  }
  return false;
}

}  // namespace uffdpc
