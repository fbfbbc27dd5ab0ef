// Pages from a snapshot store (docs/STORE.md): the image is in content-named
// chunks that JavaScript fetches (lib/store/, through the host's chunk cache)
// and hands back whole. Which pages are wanted, and in what order, is the
// PageScheduler's, as for every supply: the requested page, its window, the
// working set, then the background following the last fault. A page is
// wanted as its piece: the chunk that holds it, or, where a page here is
// larger than a chunk (a huge page), the chunks that make that page. Each
// piece is asked for once; the fault thread queues the pieces a fault needs
// and tells JavaScript (a "store-wanted" event per batch), which fetches
// them at once, and takes working-set and background pieces as it has room.
// A piece that is one chunk of zeros, or one the host's chunk cache holds
// (chunk_cache.h), the fault thread installs itself: a warm fault never waits
// for JavaScript. Once JavaScript gives the engine the store's address and
// keys (FetchInEngine), a cold fault's piece that is one chunk in a pack is
// fetched by the engine's own threads (store_getter.h), checked, installed and
// kept in the host's cache with no trip through JavaScript; a piece they
// cannot fetch goes to JavaScript as before.
#pragma once
#include <deque>
#include <memory>
#include <mutex>
#include <vector>

#include "bitmap.h"
#include "chunk_cache.h"
#include "engine_life.h"
#include "events.h"
#include "installer.h"
#include "page_scheduler.h"
#include "page_supply.h"
#include "store_getter.h"
#include "target_map.h"

namespace uffdpc {

class StoreSupply final : public PageSupply {
 public:
  // A piece JavaScript is to fetch and install (InstallPiece): the source
  // pages [sourceFirst, sourceFirst + sourceCount) of source region
  // `sourceRegion`, which are pages of target region `region`.
  struct Want {
    uint32_t region;
    uint64_t piece;
    uint32_t sourceRegion;
    uint64_t sourceFirst, sourceCount;
    Why why;
  };
  struct Window {
    uint32_t forward = 0, backward = 0;  // pages around a faulted page
  };
  // `chunkBytes`: per source region, its chunks' size (a power of two, whole
  // source pages). `cache`: the chunks' names and the host's chunk cache.
  StoreSupply(TargetMap& map, Installer& installer, EventSink& events, EngineLife& life, const std::vector<uint64_t>& chunkBytes, Window window,
              bool background, std::unique_ptr<ChunkCacheReader> cache);
  ~StoreSupply() override;

  // JS thread, once, on a started engine: the pieces faults wait on are
  // fetched from now on by gets.connections threads of the engine's own.
  // Null when started, else why not. `cpu`: where the threads run (-1: anywhere).
  const char* FetchInEngine(std::unique_ptr<StoreGets> gets, int cpu);
  // JS thread: a group of pieces taken ahead (TakeAhead), fetched by the
  // engine's threads with one ranged GET, each chunk checked, installed and
  // kept; a "store-fetched" event with `id` says how it went. False (nothing
  // started): the group is not pieces of one chunk each lying one after
  // another in one pack, or the engine does not fetch: JavaScript fetches it.
  bool FetchAheadInEngine(const std::vector<Want>& group, uint32_t id);
  // JS thread: the piece `piece` of target region `region`, asked for, as wanted for `why`; false when it is no such piece.
  bool WantOfAsked(uint32_t region, uint64_t piece, Why why, Want* out) const;
  // faultPieces, getNs: the faults' pieces and their GETs' time (fetch, decode, check) summed; damaged: cached files that failed their check (removed).
  struct InEngineStats {
    uint64_t gets, bytesFetched, pieces, gaveBack, keptBytes, fromCache, getNs, damaged, faultPieces;
  };
  InEngineStats InEngine() const;
  // Pieces the engine's threads hold (queued or being fetched): 0 once every chunk they fetched is kept.
  uint64_t FetchingInEngine();

  void Ask(TargetRegion& r, uint64_t page) override;
  void Flush() override;
  void AlreadyHeld(TargetRegion& r, uint64_t first, uint64_t count) override;

  // JS thread. The pieces faults wait on (and their windows), every one queued.
  void TakeUrgent(std::vector<Want>& out);
  // Up to `max` pieces of the working set, then (when on) of the background;
  // none once every page is asked for. Zero chunks, and pieces the host's
  // chunk cache holds, are installed here instead (up to `cacheBytes` of
  // them), counted in `*fromCache`.
  // `background`: false takes the working set's pieces only (the background waits for the set to be in).
  void TakeAhead(size_t max, std::vector<Want>& out, uint64_t cacheBytes, uint64_t* fromCache, bool background = true);
  // A piece's content (null: zeros), `length` bytes: its source pages' bytes;
  // `why`: what it was wanted for. Null when installed (or the engine is
  // stopping: its events say why), else what is wrong.
  const char* InstallPiece(uint32_t region, uint64_t piece, Why why, const uint8_t* data, uint64_t length);
  // See ImageSupply::AddPrefetch.
  const char* AddPrefetch(const uint64_t* entries, size_t count) override;
  void StartBackground() { backgroundOn_.store(true, std::memory_order_release); }
  // Pieces the fault thread read from the host's chunk cache itself (zero chunks are not counted).
  uint64_t PiecesFromCache() const { return fromCache_.load(std::memory_order_relaxed); }

 private:
  struct Pieces {
    uint64_t sourcePages;  // source pages per piece (a multiple of the region's ratio)
    uint64_t first;        // the piece holding the region's first page
    uint64_t count;
    std::unique_ptr<AtomicBitmap> asked;  // bit i: piece first + i was asked for
  };
  uint64_t PieceOf(const TargetRegion& r, uint64_t page) const { return r.SourceOf(page) / pieces_[r.index].sourcePages; }
  // The piece's pages in r: [*first, *end).
  void PagesOf(const TargetRegion& r, uint64_t piece, uint64_t* first, uint64_t* end) const;
  // Claims the piece (once) and its pages in the scheduler; true when this call did.
  bool AskPiece(TargetRegion& r, uint64_t piece);
  Want WantOf(const TargetRegion& r, uint64_t piece, Why why) const;
  // The pieces of a run not asked for yet, asked for now.
  void AskRun(const PageRun& run, std::vector<Want>& out);
  // A working-set run's pieces out[from..] (ascending), joined by the set's
  // pieces next to them in the image: up to kSetRunPieces in all, across
  // gaps of at most kSetGapPieces pieces of no set page (asked for too: a
  // chunk's bytes in one GET cost less than a GET of their own). Kept in the
  // image's order, so that the feeder fetches them with one ranged GET.
  void JoinSetNeighbours(std::vector<Want>& out, size_t from);
  bool HoldsSetPage(const TargetRegion& r, uint64_t piece) const;
  // Fault thread: a piece that is one chunk, installed as zeros or from the
  // host's chunk cache; false when JavaScript is to fetch it.
  // `buffer`: the calling thread's; `mayWait`: not on the fault thread. `*read`: the work it took, in bytes (read from the cache, or zeros installed).
  bool FromCache(const Want& w, std::vector<uint8_t>& buffer, bool mayWait, uint64_t* read);
  // Of the pieces out[from..], those FromCache installs (while `*budget` bytes of work last) are taken out.
  void InstallCached(std::vector<Want>& out, size_t from, bool faultThread, uint64_t* budget, uint64_t* installed);
  InstallResult InstallPages(TargetRegion& r, uint64_t piece, Why why, const uint8_t* data, bool mayWait);
  // The chunk a piece of one chunk is (false: a piece of several, a huge page); its bytes and the piece's offset in them.
  bool ChunkOf(const Want& w, uint64_t* chunk, uint64_t* length, uint64_t* offset) const;
  // Fault thread: of wants[from..], the pieces the engine's threads fetch are queued for them and taken out.
  void QueueInEngine(std::vector<Want>& wants);
  // An engine thread: fetches queued pieces until the engine stops.
  void FetchLoop();
  // One piece: true when installed; false when JavaScript is to fetch it.
  // `*kept`: the bytes it kept in the host's cache.
  bool FetchOne(ChunkGetter& getter, const Want& w, std::vector<uint8_t>& content, std::string* why, uint64_t* kept);
  // A piece the engine's threads could not fetch, handed to JavaScript.
  void GiveBack(const Want& w);
  // An engine thread: fetches groups taken ahead until the engine stops.
  void AheadLoop();
  bool FetchGroup(ChunkGetter& getter, const std::vector<Want>& group, std::vector<uint8_t>& object, std::vector<uint8_t>& content, std::string* why,
                  uint64_t* kept);
  // The chunks' slots in the cache's lock file, locked (each once); false, none held, while another holds one: another
  // process, this one's JavaScript, or another of the engine's threads (their locks share one open file, so they are
  // counted here: the file's locks would not exclude them).
  bool LockSlots(std::vector<uint64_t>& slots, bool* locked, std::string* why);
  // One ranged GET by `getter`, counted in the engine's stats; a failure rests the engine (kRestAfterFailureNs).
  bool GetRange(ChunkGetter& getter, int64_t pack, uint64_t offset, uint64_t length, std::vector<uint8_t>& object, std::string* why);
  // Keeps a fetched chunk in the host's cache; the bytes it added.
  uint64_t Keep(uint32_t sourceRegion, uint64_t chunk, const uint8_t* data, uint64_t length, std::string* why);
  void UnlockSlots(const std::vector<uint64_t>& slots, bool locked);
  // A cached file that failed its check, removed (fetched again and kept anew), as JavaScript's cache does.
  void RemoveDamaged(uint32_t sourceRegion, uint64_t chunk);

  TargetMap& map_;
  Installer& installer_;
  EventSink& events_;
  EngineLife& life_;
  PageScheduler scheduler_;  // over the target map's regions, one page a unit
  std::vector<Pieces> pieces_;
  std::vector<uint64_t> chunkBytes_;  // per source region
  std::unique_ptr<ChunkCacheReader> cache_;
  std::vector<uint8_t> cacheBuffer_;  // fault thread: a chunk read from the cache
  std::vector<uint8_t> aheadBuffer_;  // JS thread: the same, for pieces taken ahead
  std::atomic<uint64_t> fromCache_{0};
  uint64_t windowPages_;
  uint64_t piecePages_ = 1;  // the largest piece, in pages here: a background run's length
  std::atomic<bool> backgroundOn_;
  PageRuns faultRuns_;            // fault thread only
  std::vector<Want> faultWants_;  // fault thread only
  std::mutex mu_;
  std::vector<Want> urgent_;  // under mu_
  bool told_ = false;         // under mu_: JS was told of urgent_ and has not taken it yet
  bool tell_ = false;         // fault thread: new urgent pieces since the last Flush

  // Fetching in the engine (FetchInEngine).
  std::unique_ptr<StoreGets> gets_;
  std::atomic<bool> fetchInEngine_{false};
  std::atomic<int64_t> restUntilNs_{0};  // after a failure to reach the store: JavaScript fetches until then
  int lockFd_ = -1;                      // the cache directory's lock file (its own open: excludes JavaScript's locks too)
  std::mutex slotsMu_;
  std::vector<uint64_t> heldSlots_;  // under slotsMu_: the slots the engine's threads hold
  std::mutex fetchMu_;
  std::condition_variable fetchCv_;
  std::deque<Want> fetchQueue_;  // under fetchMu_: requested pieces first
  uint64_t fetchBusy_ = 0;       // under fetchMu_
  size_t requestedQueued_ = 0;   // under fetchMu_: requested pieces at the queue's front
  struct AheadJob {
    std::vector<Want> group;
    uint32_t id;
  };
  std::mutex aheadMu_;
  std::condition_variable aheadCv_;
  std::deque<AheadJob> aheadQueue_;                            // under aheadMu_
  uint32_t aheadThreads_ = 0, aheadIdle_ = 0, aheadBusy_ = 0;  // under aheadMu_
  static constexpr uint32_t kAheadThreads = 16;                // at most this many groups fetched at once (the feeder holds fewer in flight)
  static constexpr uint64_t kMaxGroupBytes = 32u << 20;        // a group's content at most (its GET's answer is capped at 64 MiB)
  int cpu_ = -1;
  static constexpr uint64_t kRestAfterFailureNs = 1'000'000'000;
  std::atomic<uint64_t> inGets_{0}, inBytes_{0}, inPieces_{0}, inGaveBack_{0}, inKept_{0}, inFromCache_{0}, inGetNs_{0}, inDamaged_{0}, inFaultPieces_{0};
};

}  // namespace uffdpc
