#include "store_supply.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cstring>

#include "io.h"
#include "wire.h"

namespace uffdpc {

namespace {
std::vector<PageScheduler::Region> ShapeOf(const TargetMap& map) {
  std::vector<PageScheduler::Region> shape;
  for (auto& r : map.regions()) shape.push_back({r->pages, 1, wire::MaxRunPages(r->pageSize)});
  return shape;
}
}  // namespace

StoreSupply::StoreSupply(TargetMap& map, Installer& installer, EventSink& events, EngineLife& life, const std::vector<uint64_t>& chunkBytes, Window window,
                         bool background, std::unique_ptr<ChunkCacheReader> cache)
    : map_(map),
      installer_(installer),
      events_(events),
      life_(life),
      scheduler_(ShapeOf(map), {window.forward, window.backward}),
      chunkBytes_(chunkBytes),
      cache_(std::move(cache)),
      windowPages_(window.forward + window.backward),
      backgroundOn_(background) {
  faultWants_.reserve(8);
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

StoreSupply::~StoreSupply() {
  if (lockFd_ >= 0) close(lockFd_);  // the engine's threads are joined by now (its shutdown comes first)
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

namespace {
// A working-set run is joined into one fetch of at most this many pieces
// (the feeder's PIECES_PER_FETCH), across gaps of at most this many.
constexpr uint64_t kSetRunPieces = 16;
constexpr uint64_t kSetGapPieces = 2;
}  // namespace

bool StoreSupply::HoldsSetPage(const TargetRegion& r, uint64_t piece) const {
  uint64_t first, end;
  PagesOf(r, piece, &first, &end);
  for (uint64_t p = first; p < end; p++)
    if (scheduler_.InWorkingSet(r.index, p)) return true;
  return false;
}

void StoreSupply::JoinSetNeighbours(std::vector<Want>& out, size_t from) {
  if (out.size() == from) return;
  TargetRegion& r = *map_.regions()[out[from].region];
  const Pieces& ps = pieces_[r.index];
  Why why = out[from].why;
  uint64_t taken = out.size() - from;
  // Outwards from the run's ends: a set piece found past a gap is asked for with the gap's pieces.
  for (int step : {1, -1}) {
    uint64_t edge = step > 0 ? out.back().piece : out[from].piece;
    for (uint64_t q = edge + step; taken < kSetRunPieces && q >= ps.first && q < ps.first + ps.count; q += step) {
      if (ps.asked->Test(q - ps.first)) break;  // asked already (a fault's, a run of the set's): the run ends there
      if (!HoldsSetPage(r, q)) {
        uint64_t gap = q > edge ? q - edge : edge - q;  // pieces of no set page since the run's edge, q included
        if (gap > kSetGapPieces || taken + gap >= kSetRunPieces) break;
        continue;
      }
      bool whole = true;
      for (uint64_t g = edge + step;; g += step) {
        if (!AskPiece(r, g)) {
          whole = false;  // a fault took it meanwhile
          break;
        }
        out.push_back(WantOf(r, g, why));
        taken++;
        if (g == q) break;
      }
      if (!whole) break;
      edge = q;
    }
  }
  std::sort(out.begin() + static_cast<std::ptrdiff_t>(from), out.end(), [](const Want& a, const Want& b) { return a.piece < b.piece; });
}

void StoreSupply::Ask(TargetRegion& r, uint64_t page) {
  std::vector<Want>& wants = faultWants_;
  wants.clear();
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
  uint64_t budget = UINT64_MAX, installed = 0;
  InstallCached(wants, 0, /*faultThread=*/true, &budget, &installed);
  QueueInEngine(wants);
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

void StoreSupply::TakeAhead(size_t max, std::vector<Want>& out, uint64_t cacheBytes, uint64_t* fromCache, bool background) {
  PageRun run;
  while (out.size() < max && scheduler_.NextWorkingSetRun(&run)) {
    size_t from = out.size();
    AskRun(run, out);
    JoinSetNeighbours(out, from);
    InstallCached(out, from, /*faultThread=*/false, &cacheBytes, fromCache);
  }
  if (!background || !backgroundOn_.load(std::memory_order_acquire)) return;
  // About a piece per run: the cursor moves on a piece at a time.
  while (out.size() < max && scheduler_.NextBackgroundRun(piecePages_, &run)) {
    size_t from = out.size();
    AskRun(run, out);
    InstallCached(out, from, /*faultThread=*/false, &cacheBytes, fromCache);
  }
}

void StoreSupply::InstallCached(std::vector<Want>& out, size_t from, bool faultThread, uint64_t* budget, uint64_t* installed) {
  std::vector<uint8_t>& buffer = faultThread ? cacheBuffer_ : aheadBuffer_;
  size_t kept = from;
  for (size_t i = from; i < out.size(); i++) {
    uint64_t read = 0;
    if (*budget > 0 && FromCache(out[i], buffer, /*mayWait=*/!faultThread, &read)) {
      *budget -= std::min(*budget, read);
      ++*installed;
      continue;
    }
    out[kept++] = out[i];
  }
  out.resize(kept);
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
  InstallPages(r, piece, why, data, /*mayWait=*/true);
  return nullptr;
}

InstallResult StoreSupply::InstallPages(TargetRegion& r, uint64_t piece, Why why, const uint8_t* data, bool mayWait) {
  uint64_t first, end;
  PagesOf(r, piece, &first, &end);
  // The pages a thread faulted on count as requested, and go in first: each install wakes the threads waiting on its
  // pages, so a page in the middle of a chunk does not wait for the copy of the pages before it. Those runs are taken
  // once, up to kFirstRuns of them (more: the piece goes in in order); a page faulted on meanwhile goes in with the rest,
  // counted as requested. The others count as what the piece was asked for.
  constexpr int kFirstRuns = 4;
  uint64_t firstRuns[kFirstRuns][2];
  int runs = 0;
  for (uint64_t p = first; p < end && runs <= kFirstRuns;) {
    if (!r.requested->Test(p)) {
      p++;
      continue;
    }
    uint64_t q = p + 1;
    while (q < end && r.requested->Test(q)) q++;
    if (runs < kFirstRuns) firstRuns[runs][0] = p, firstRuns[runs][1] = q;
    runs++;
    p = q;
  }
  if (runs > kFirstRuns || (runs == 1 && firstRuns[0][0] == first)) runs = 0;  // in order: as many wakes either way
  for (int k = 0; k < runs; k++) {
    uint64_t p = firstRuns[k][0], q = firstRuns[k][1];
    InstallResult result = installer_.Install(r, p, q - p, data ? data + (p - first) * r.pageSize : nullptr, wire::kRequested, "store", 0, mayWait);
    if (result != kOk) return result;
  }
  auto installedFirst = [&](uint64_t p) {
    for (int k = 0; k < runs; k++)
      if (p >= firstRuns[k][0] && p < firstRuns[k][1]) return firstRuns[k][1];
    return uint64_t{0};
  };
  for (uint64_t p = first; p < end;) {
    if (uint64_t past = installedFirst(p)) {
      p = past;
      continue;
    }
    bool requested = r.requested->Test(p);
    uint64_t q = p + 1;
    while (q < end && r.requested->Test(q) == requested && !installedFirst(q)) q++;
    const uint8_t* at = data ? data + (p - first) * r.pageSize : nullptr;
    InstallResult result = installer_.Install(r, p, q - p, at, requested ? wire::kRequested : static_cast<uint32_t>(why), "store", 0, mayWait);
    if (result != kOk) return result;
    p = q;
  }
  return kOk;
}

bool StoreSupply::ChunkOf(const Want& w, uint64_t* chunk, uint64_t* length, uint64_t* offset) const {
  uint64_t pageSize = map_.sourcePageSize(w.sourceRegion);
  uint64_t chunkPages = chunkBytes_[w.sourceRegion] / pageSize;
  if (chunkPages == 0 || pieces_[w.region].sourcePages != chunkPages) return false;  // a huge page of many chunks: JavaScript joins them
  if (w.piece >= cache_->Chunks(w.sourceRegion)) return false;
  uint64_t chunkFirst = w.piece * chunkPages;
  *chunk = w.piece;
  *length = (std::min(chunkFirst + chunkPages, map_.sourcePages(w.sourceRegion)) - chunkFirst) * pageSize;
  if (w.sourceFirst < chunkFirst || (w.sourceFirst + w.sourceCount - chunkFirst) * pageSize > *length) return false;
  *offset = (w.sourceFirst - chunkFirst) * pageSize;
  return true;
}

bool StoreSupply::FromCache(const Want& w, std::vector<uint8_t>& buffer, bool mayWait, uint64_t* read) {
  TargetRegion& r = *map_.regions()[w.region];
  uint64_t chunk, length, offset;
  if (!ChunkOf(w, &chunk, &length, &offset)) return false;
  const uint8_t* data = nullptr;
  // A zero chunk costs no read but an install all the same: it counts against the budget as its bytes.
  *read = w.sourceCount * map_.sourcePageSize(w.sourceRegion);
  if (!cache_->IsZero(w.sourceRegion, chunk)) {
    if (buffer.size() < length) buffer.resize(length);
    if (!cache_->Read(w.sourceRegion, chunk, buffer.data(), length)) return false;
    data = buffer.data() + offset;
    *read = length;  // the whole chunk was read
  }
  // A layout change under way (kBusy, on the fault thread): JavaScript installs it once the fault thread has read the change.
  if (InstallPages(r, w.piece, w.why, data, mayWait) == kBusy) return false;
  if (data) fromCache_.fetch_add(1, std::memory_order_relaxed);
  return true;
}

const char* StoreSupply::FetchInEngine(std::unique_ptr<StoreGets> gets, int cpu) {
  if (gets_) return "the engine fetches from the store already";
  if (gets->places.size() != chunkBytes_.size()) return "a list of places per source region";
  for (size_t region = 0; region < gets->places.size(); region++) {
    if (gets->places[region].size() != cache_->Chunks(static_cast<uint32_t>(region))) return "a place per chunk of the region";
    for (const ChunkPlace& place : gets->places[region])
      if (place.pack >= static_cast<int64_t>(gets->packs.size())) return "a chunk's pack out of range";
  }
  if (gets->connections == 0 || gets->connections > 64) return "1 to 64 connections";
  // Its own open of the lock file: its locks exclude JavaScript's in this process too. None: chunks are fetched unlocked.
  if (!cache_->dir().empty()) lockFd_ = open((cache_->dir() + "/lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  gets_ = std::move(gets);
  cpu_ = cpu;
  life_.WakeOnStop(fetchMu_, fetchCv_);
  life_.WakeOnStop(aheadMu_, aheadCv_);
  for (uint32_t i = 0; i < gets_->connections; i++) life_.Spawn("pc-store-get", cpu, [this] { FetchLoop(); });
  fetchInEngine_.store(true, std::memory_order_release);
  return nullptr;
}

StoreSupply::InEngineStats StoreSupply::InEngine() const {
  auto load = [](const std::atomic<uint64_t>& v) { return v.load(std::memory_order_relaxed); };
  return {load(inGets_),      load(inBytes_), load(inPieces_),  load(inGaveBack_),   load(inKept_),
          load(inFromCache_), load(inGetNs_), load(inDamaged_), load(inFaultPieces_)};
}

uint64_t StoreSupply::FetchingInEngine() {
  if (life_.Stopping()) return 0;  // what is queued is never fetched
  uint64_t n;
  {
    std::lock_guard<std::mutex> lock(fetchMu_);
    n = fetchQueue_.size() + fetchBusy_;
  }
  std::lock_guard<std::mutex> lock(aheadMu_);
  return n + aheadQueue_.size() + aheadBusy_;
}

void StoreSupply::QueueInEngine(std::vector<Want>& wants) {
  if (wants.empty() || !fetchInEngine_.load(std::memory_order_acquire)) return;
  if (static_cast<int64_t>(MonotonicNs()) < restUntilNs_.load(std::memory_order_relaxed)) return;
  size_t kept = 0;
  bool queued = false;
  {
    std::lock_guard<std::mutex> lock(fetchMu_);
    for (const Want& w : wants) {
      uint64_t chunk, length, offset;
      if (ChunkOf(w, &chunk, &length, &offset) && !cache_->IsZero(w.sourceRegion, chunk) && gets_->places[w.sourceRegion][chunk].pack >= 0) {
        // The faulted pieces first, in the order they came; their windows after.
        if (w.why == Why::kRequested) {
          fetchQueue_.insert(fetchQueue_.begin() + static_cast<std::ptrdiff_t>(requestedQueued_), w);
          requestedQueued_++;
        } else {
          fetchQueue_.push_back(w);
        }
        queued = true;
      } else {
        wants[kept++] = w;
      }
    }
  }
  wants.resize(kept);
  if (queued) fetchCv_.notify_all();
}

void StoreSupply::FetchLoop() {
  ChunkGetter getter(*gets_);
  std::vector<uint8_t> content;
  for (;;) {
    Want w;
    {
      std::unique_lock<std::mutex> lock(fetchMu_);
      fetchCv_.wait(lock, [&] { return life_.Stopping() || !fetchQueue_.empty(); });
      if (life_.Stopping()) return;
      w = fetchQueue_.front();
      fetchQueue_.pop_front();
      if (requestedQueued_ > 0) requestedQueued_--;  // they are at the front
      fetchBusy_++;
    }
    std::string why;
    uint64_t kept = 0;
    // After a failure to reach the store, what was queued goes to JavaScript too, without a GET of its own.
    bool resting = static_cast<int64_t>(MonotonicNs()) < restUntilNs_.load(std::memory_order_relaxed);
    if (resting) why = "the store failed a GET a moment ago";
    bool done = !resting && FetchOne(getter, w, content, &why, &kept);
    if (!done && !life_.Stopping()) GiveBack(w);
    {
      std::lock_guard<std::mutex> lock(fetchMu_);
      fetchBusy_--;
    }
    // JavaScript counts the cache's new bytes (its bound), and learns when the engine's threads are idle.
    events_.Emit({"store-fetched", "", "", why, 0, {{"id", 0.0}, {"keptBytes", double(kept)}, {"gaveBack", done ? 0.0 : 1.0}}});
  }
}

bool StoreSupply::WantOfAsked(uint32_t region, uint64_t piece, Why why, Want* out) const {
  if (region >= map_.regions().size()) return false;
  const TargetRegion& r = *map_.regions()[region];
  const Pieces& ps = pieces_[region];
  if (piece < ps.first || piece >= ps.first + ps.count || !ps.asked->Test(piece - ps.first)) return false;
  *out = WantOf(r, piece, why);
  return true;
}

bool StoreSupply::FetchAheadInEngine(const std::vector<Want>& group, uint32_t id) {
  if (group.empty() || !fetchInEngine_.load(std::memory_order_acquire)) return false;
  if (static_cast<int64_t>(MonotonicNs()) < restUntilNs_.load(std::memory_order_relaxed)) return false;
  const ChunkPlace* last = nullptr;
  uint64_t total = 0;
  for (const Want& w : group) {
    uint64_t chunk, length, offset;
    if (!ChunkOf(w, &chunk, &length, &offset) || cache_->IsZero(w.sourceRegion, chunk)) return false;
    total += length;
    if (total > kMaxGroupBytes) return false;  // one GET of at most what an answer may hold
    const ChunkPlace& place = gets_->places[w.sourceRegion][chunk];
    if (place.pack < 0 || (last && (place.pack != last->pack || place.offset != last->offset + last->length))) return false;
    last = &place;
  }
  {
    std::lock_guard<std::mutex> lock(aheadMu_);
    aheadQueue_.push_back({group, id});
    if (aheadIdle_ < aheadQueue_.size() && aheadThreads_ < kAheadThreads) {
      aheadThreads_++;
      life_.Spawn("pc-store-ahead", cpu_, [this] { AheadLoop(); });
    }
  }
  aheadCv_.notify_one();
  return true;
}

void StoreSupply::AheadLoop() {
  ChunkGetter getter(*gets_);
  std::vector<uint8_t> object, content;
  for (;;) {
    AheadJob job;
    {
      std::unique_lock<std::mutex> lock(aheadMu_);
      aheadIdle_++;
      aheadCv_.wait(lock, [&] { return life_.Stopping() || !aheadQueue_.empty(); });
      aheadIdle_--;
      if (life_.Stopping()) return;
      job = std::move(aheadQueue_.front());
      aheadQueue_.pop_front();
      aheadBusy_++;
    }
    std::string why;
    uint64_t kept = 0;
    bool done = FetchGroup(getter, job.group, object, content, &why, &kept);
    if (!done) inGaveBack_.fetch_add(job.group.size(), std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(aheadMu_);
      aheadBusy_--;
    }
    events_.Emit({"store-fetched", "", "", why, 0, {{"id", double(job.id)}, {"keptBytes", double(kept)}, {"gaveBack", done ? 0.0 : 1.0}}});
  }
}

bool StoreSupply::LockSlots(std::vector<uint64_t>& slots, bool* locked, std::string* why) {
  *locked = false;
  if (lockFd_ < 0) return true;
  std::sort(slots.begin(), slots.end());
  slots.erase(std::unique(slots.begin(), slots.end()), slots.end());  // two chunks may share one: locked once
  std::lock_guard<std::mutex> lock(slotsMu_);
  for (uint64_t slot : slots)
    if (std::find(heldSlots_.begin(), heldSlots_.end(), slot) != heldSlots_.end()) {
      *why = "another of the engine's fetches holds a chunk's lock (the same chunk, or one sharing its lock)";
      return false;
    }
  for (size_t i = 0; i < slots.size(); i++) {
    int err = LockRange(lockFd_, slots[i], kCacheSlotBytes, true);
    if (err == 0) continue;
    for (size_t k = 0; k < i; k++) LockRange(lockFd_, slots[k], kCacheSlotBytes, false);
    if (err != EAGAIN) return true;  // a filesystem that cannot lock: fetched unlocked (a second request at worst)
    *why = "another fetch of a chunk (or of one sharing its lock) is under way";
    return false;
  }
  heldSlots_.insert(heldSlots_.end(), slots.begin(), slots.end());
  *locked = true;
  double now = static_cast<double>(std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count());
  for (uint64_t slot : slots)
    if (pwrite(lockFd_, &now, sizeof now, static_cast<off_t>(slot)) < 0) {}  // a full disk: waiters see an old beat and fetch for themselves
  return true;
}

void StoreSupply::UnlockSlots(const std::vector<uint64_t>& slots, bool locked) {
  if (!locked) return;
  std::lock_guard<std::mutex> lock(slotsMu_);
  for (uint64_t slot : slots) {
    LockRange(lockFd_, slot, kCacheSlotBytes, false);
    heldSlots_.erase(std::find(heldSlots_.begin(), heldSlots_.end(), slot));
  }
}

bool StoreSupply::FetchGroup(ChunkGetter& getter, const std::vector<Want>& group, std::vector<uint8_t>& object, std::vector<uint8_t>& content, std::string* why,
                             uint64_t* kept) {
  struct Member {
    uint64_t chunk, length, offset, at;  // at: the chunk's content in `content`
  };
  std::vector<Member> members(group.size());
  std::vector<uint64_t> slots;
  uint64_t total = 0;
  for (size_t i = 0; i < group.size(); i++) {
    Member& m = members[i];
    ChunkOf(group[i], &m.chunk, &m.length, &m.offset);
    m.at = total;
    total += m.length;
    slots.push_back(CacheLockSlot(cache_->Name(group[i].sourceRegion, m.chunk)));
  }
  bool locked = false;
  if (!LockSlots(slots, &locked, why)) return false;
  if (content.size() < total) content.resize(total);
  // Whoever held a lock before may have kept its chunk since the group was taken: those are read, the rest fetched
  // (one ranged GET from the first missing to the last; one kept in between comes again and is not counted).
  std::vector<bool> read(group.size(), false);
  size_t from = group.size(), to = 0;
  for (size_t i = 0; i < group.size(); i++) {
    bool damaged = false;
    read[i] = cache_->Read(group[i].sourceRegion, members[i].chunk, content.data() + members[i].at, members[i].length, &damaged);
    if (damaged) RemoveDamaged(group[i].sourceRegion, members[i].chunk);
    if (!read[i]) from = std::min(from, i), to = i + 1;
  }
  if (from < to) {
    const ChunkPlace& first = gets_->places[group[from].sourceRegion][members[from].chunk];
    const ChunkPlace& last = gets_->places[group[to - 1].sourceRegion][members[to - 1].chunk];
    if (!GetRange(getter, first.pack, first.offset, last.offset + last.length - first.offset, object, why)) {
      UnlockSlots(slots, locked);
      return false;
    }
    // Every chunk checked before any is installed: a damaged one sends the whole group to JavaScript, which fetches it again.
    std::vector<uint8_t> one;
    for (size_t i = from; i < to; i++) {
      if (read[i]) continue;
      const ChunkPlace& place = gets_->places[group[i].sourceRegion][members[i].chunk];
      if (!getter.Decode(object.data() + (place.offset - first.offset), place.length, cache_->Name(group[i].sourceRegion, members[i].chunk), members[i].length,
                         one, why)) {
        UnlockSlots(slots, locked);
        return false;
      }
      std::memcpy(content.data() + members[i].at, one.data(), members[i].length);
    }
  }
  for (size_t i = 0; i < group.size(); i++) {
    const Want& w = group[i];
    if (InstallPages(*map_.regions()[w.region], w.piece, w.why, content.data() + members[i].at + members[i].offset, /*mayWait=*/true) == kStop) {
      UnlockSlots(slots, locked);
      return true;
    }
  }
  size_t fromCache = static_cast<size_t>(std::count(read.begin(), read.end(), true));
  inPieces_.fetch_add(group.size() - fromCache, std::memory_order_relaxed);
  inFromCache_.fetch_add(fromCache, std::memory_order_relaxed);
  for (size_t i = 0; i < group.size(); i++)
    if (!read[i]) *kept += Keep(group[i].sourceRegion, members[i].chunk, content.data() + members[i].at, members[i].length, why);
  UnlockSlots(slots, locked);
  return true;
}

bool StoreSupply::FetchOne(ChunkGetter& getter, const Want& w, std::vector<uint8_t>& content, std::string* why, uint64_t* kept) {
  TargetRegion& r = *map_.regions()[w.region];
  uint64_t chunk, length, offset;
  ChunkOf(w, &chunk, &length, &offset);
  const uint8_t* name = cache_->Name(w.sourceRegion, chunk);
  std::vector<uint64_t> slots{CacheLockSlot(name)};
  bool locked = false;
  if (!LockSlots(slots, &locked, why)) return false;  // JavaScript waits for that fetch's file
  if (content.size() < length) content.resize(length);
  // Whoever held the lock before may have kept the chunk since the fault thread looked. A damaged file is removed
  // (fetched again and kept anew), as JavaScript's cache does.
  bool damaged = false;
  if (cache_->Read(w.sourceRegion, chunk, content.data(), length, &damaged)) {
    UnlockSlots(slots, locked);
    InstallPages(r, w.piece, w.why, content.data() + offset, /*mayWait=*/true);
    inFromCache_.fetch_add(1, std::memory_order_relaxed);
    return true;
  }
  if (damaged) RemoveDamaged(w.sourceRegion, chunk);
  const ChunkPlace& place = gets_->places[w.sourceRegion][chunk];
  uint64_t started = MonotonicNs();
  std::vector<uint8_t>& object = getter.buffer();
  if (!GetRange(getter, place.pack, place.offset, place.length, object, why)) {
    UnlockSlots(slots, locked);
    return false;
  }
  // A chunk that does not decode or check (damaged, a codec or seal JavaScript reads) is JavaScript's; the store answered.
  if (!getter.Decode(object.data(), object.size(), name, length, content, why)) {
    UnlockSlots(slots, locked);
    return false;
  }
  inGetNs_.fetch_add(MonotonicNs() - started, std::memory_order_relaxed);
  inFaultPieces_.fetch_add(1, std::memory_order_relaxed);
  if (InstallPages(r, w.piece, w.why, content.data() + offset, /*mayWait=*/true) == kStop) {
    UnlockSlots(slots, locked);
    return true;
  }
  inPieces_.fetch_add(1, std::memory_order_relaxed);
  *kept = Keep(w.sourceRegion, chunk, content.data(), length, why);
  UnlockSlots(slots, locked);
  return true;
}

bool StoreSupply::GetRange(ChunkGetter& getter, int64_t pack, uint64_t offset, uint64_t length, std::vector<uint8_t>& object, std::string* why) {
  uint64_t gets = getter.gets(), bytes = getter.bytes();
  bool got = getter.GetRange(
      pack, offset, length, object, [this] { return life_.Stopping(); }, why);
  inGets_.fetch_add(getter.gets() - gets, std::memory_order_relaxed);
  inBytes_.fetch_add(getter.bytes() - bytes, std::memory_order_relaxed);
  // Until the store answers JavaScript again: its retries, backoff and outage are the session's.
  if (!got) restUntilNs_.store(static_cast<int64_t>(MonotonicNs() + kRestAfterFailureNs), std::memory_order_relaxed);
  return got;
}

uint64_t StoreSupply::Keep(uint32_t sourceRegion, uint64_t chunk, const uint8_t* data, uint64_t length, std::string* why) {
  if (cache_->dir().empty()) return 0;
  std::string folder, file;
  cache_->PathOf(sourceRegion, chunk, &folder, &file);
  KeepResult result = KeepChunkFile(folder, file, data, length, CacheCheck(data, length));
  // Installed all the same; the next restore fetches it again (JavaScript logs why).
  if (result.err) *why = std::string("a chunk could not be kept in the cache: ") + result.syscall + ": " + std::strerror(result.err);
  if (!result.made) return 0;
  inKept_.fetch_add(length + kCacheFooterBytes, std::memory_order_relaxed);
  return length + kCacheFooterBytes;
}

void StoreSupply::RemoveDamaged(uint32_t sourceRegion, uint64_t chunk) {
  std::string folder, file;
  cache_->PathOf(sourceRegion, chunk, &folder, &file);
  unlink((folder + "/" + file).c_str());
  inDamaged_.fetch_add(1, std::memory_order_relaxed);
}

void StoreSupply::GiveBack(const Want& w) {
  inGaveBack_.fetch_add(1, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(mu_);
    urgent_.push_back(w);
    if (told_) return;
    told_ = true;
  }
  events_.Emit({"store-wanted"});
}

const char* StoreSupply::AddPrefetch(const uint64_t* entries, size_t count) {
  std::vector<uint64_t> set;
  if (const char* bad = map_.TargetEntries(entries, count, set)) return bad;
  scheduler_.AddWorkingSet(set);
  return nullptr;
}

}  // namespace uffdpc
