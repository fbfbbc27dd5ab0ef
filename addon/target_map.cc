#include "target_map.h"

#include <cstring>

#include "io.h"
#include "wire.h"

namespace uffdpc {

thread_local bool LayoutGate::onFaultThread = false;

uint64_t TargetRegion::SplitAddressOf(uint64_t p, uint64_t* run) const {
  std::lock_guard<std::mutex> lock(piecesMu);
  for (const Piece& x : pieces)
    if (p >= x.first && p < x.first + x.pages) {
      if (run) *run = x.first + x.pages - p;
      return x.address + (p - x.first) * pageSize;
    }
  if (run) *run = 1;
  return 0;  // not reached: the pieces cover every page
}

std::vector<TargetRegion::Piece> TargetRegion::Pieces() const {
  if (!split.load(std::memory_order_acquire)) return {{0, pages, base.load(std::memory_order_acquire)}};
  std::lock_guard<std::mutex> lock(piecesMu);
  return pieces;
}

bool TargetRegion::PageAt(uint64_t address, uint64_t* page) const {
  for (const Piece& x : Pieces())
    if (address >= x.address && address < x.address + x.pages * pageSize) {
      *page = x.first + (address - x.address) / pageSize;
      return true;
    }
  return false;
}

bool TargetRegion::Move(uint64_t from, uint64_t to, uint64_t len) {
  std::vector<Piece> now = Pieces(), next;
  bool moved = false;
  for (const Piece& x : now) {
    uint64_t lo = std::max(from, x.address), hi = std::min(from + len, x.address + x.pages * pageSize);
    if (lo >= hi) {
      next.push_back(x);
      continue;
    }
    moved = true;
    uint64_t a = x.first + (lo - x.address) / pageSize, b = x.first + (hi - x.address + pageSize - 1) / pageSize;
    if (a > x.first) next.push_back({x.first, a - x.first, x.address});
    next.push_back({a, b - a, to + (lo - from)});
    if (b < x.first + x.pages) next.push_back({b, x.first + x.pages - b, x.address + (b - x.first) * pageSize});
  }
  if (!moved) return false;
  std::sort(next.begin(), next.end(), [](const Piece& l, const Piece& r) { return l.first < r.first; });
  std::vector<Piece> merged;  // neighbours that are contiguous in memory again become one piece
  for (const Piece& x : next) {
    if (!merged.empty() && merged.back().address + merged.back().pages * pageSize == x.address)
      merged.back().pages += x.pages;
    else
      merged.push_back(x);
  }
  std::lock_guard<std::mutex> lock(piecesMu);
  if (merged.size() == 1) {  // in one piece again (a whole region moved): the fast path
    base.store(merged[0].address, std::memory_order_release);
    split.store(false, std::memory_order_release);
    pieces.clear();
  } else {
    pieces = std::move(merged);
    split.store(true, std::memory_order_release);
  }
  return true;
}

TargetRegion& TargetMap::AddRegion(uint64_t base, uint64_t length, uint64_t pageSize, uint32_t sourceRegion, uint64_t sourcePage, uint8_t* fill) {
  auto t = std::make_unique<TargetRegion>();
  t->index = static_cast<uint32_t>(regions_.size());
  t->base = base;
  t->sourceRegion = sourceRegion;
  t->sourcePage = sourcePage;
  t->length = length;
  t->pageSize = pageSize;
  t->pages = length / pageSize;
  t->ratio = pageSize / sourcePageSize_[sourceRegion];  // checked in TypeScript: a power of two, at least 1
  if (fill) {
    t->fill = fill;
    t->cached = std::make_shared<AtomicBitmap>(t->pages);
    t->cache = t->cached.get();
  }
  t->received = std::make_unique<AtomicBitmap>(t->pages);
  t->requested = std::make_unique<AtomicBitmap>(t->pages);
  t->removed = std::make_unique<AtomicBitmap>(t->pages);
  t->settled = std::make_unique<AtomicBitmap>(t->pages);
  t->checked = std::make_unique<AtomicBitmap>(t->pages);
  t->faultNs = std::make_unique<LazyPageArray<uint64_t>>(t->pages);
  t->waiters = std::make_unique<LazyPageArray<uint32_t>>(t->pages);
  totalPages_ += t->pages;
  maxRunBytes_ = std::max<uint64_t>(maxRunBytes_, wire::MaxRunPages(t->pageSize) * t->pageSize);
  regions_.push_back(std::move(t));
  return *regions_.back();
}

void TargetMap::Settle(uint64_t pages, uint64_t now) {
  if (pages == 0) return;
  // Before a live source's switchover every page may be here and still change: not complete yet.
  if (resident_.fetch_add(pages) + pages == totalPages_ && !precopy_.load()) {
    completeNs_ = now;
    events_.Emit({"complete", "", "", "", 0, {{"elapsedNs", double(now - startNs_)}}});
  }
}

void TargetMap::CompleteIfWhole(uint64_t now) {
  if (resident_.load() != totalPages_) return;
  completeNs_ = now;
  events_.Emit({"complete", "", "", "", 0, {{"elapsedNs", double(now - startNs_)}}});
}

void TargetMap::ReceivedBits(uint32_t region, uint8_t* out) const {
  const TargetRegion& r = *regions_[region];
  std::memset(out, 0, (r.pages + 7) / 8);
  for (uint64_t p = 0; p < r.pages; p++)
    if (r.received->Test(p)) out[p / 8] |= static_cast<uint8_t>(1u << (p % 8));
}

void TargetMap::HeldBits(uint32_t id, uint8_t* out) const {
  uint64_t pages = sourcePages_[id];
  std::memset(out, 0xff, (pages + 7) / 8);
  if (pages % 8) out[pages / 8] = static_cast<uint8_t>((1u << (pages % 8)) - 1);  // no bits past the end
  for (auto& r : regions_) {
    if (r->sourceRegion != id) continue;
    for (uint64_t p = 0; p < r->pages; p++) {
      if (r->received->Test(p) || r->removed->Test(p)) continue;
      for (uint64_t s = r->SourceOf(p); s < r->SourceOf(p + 1); s++) out[s / 8] &= static_cast<uint8_t>(~(1u << (s % 8)));
    }
  }
}

const char* TargetMap::TargetEntries(const uint64_t* entries, size_t count, std::vector<uint64_t>& out) const {
  constexpr uint64_t kPageMask = (1ull << 48) - 1;
  for (size_t i = 0; i < count; i++) {
    uint64_t region = entries[i] >> 48, page = entries[i] & kPageMask;
    if (region >= sourceRegions() || page >= sourcePages(static_cast<uint32_t>(region))) return "a prefetch entry lies outside the image";
  }
  out.reserve(out.size() + count);
  for (size_t i = 0; i < count; i++) {
    uint32_t region = static_cast<uint32_t>(entries[i] >> 48);
    uint64_t page = entries[i] & kPageMask;
    for (auto& r : regions_)
      if (r->sourceRegion == region && page >= r->sourcePage && page < r->sourcePage + r->SourceSpan()) {
        out.push_back((uint64_t(r->index) << 48) | (page - r->sourcePage) / r->ratio);
        break;
      }
  }
  return nullptr;
}

uint64_t TargetMap::MarkResident(uint32_t region, const uint8_t* bits) {
  TargetRegion& r = *regions_[region];
  uint64_t marked = 0;
  for (uint64_t p = 0; p < r.pages; p++) {
    if (!((bits[p / 8] >> (p % 8)) & 1) || !r.received->Claim(p)) continue;
    if (r.fill) r.cached->Claim(p);  // mapped in the guest, so in the page cache: never written again
    if (r.settled->Claim(p)) marked++;
  }
  Settle(marked, MonotonicNs());
  return marked;
}

uint64_t TargetMap::OutstandingRequests() const {
  uint64_t n = 0;
  for (auto& r : regions_)
    for (uint64_t p = 0; p < r->pages; p++)
      if (r->requested->Test(p) && !r->settled->Test(p)) n++;
  return n;
}

}  // namespace uffdpc
