// The destination's installer: the only part that puts pages into the target
// process's memory. UFFDIO_COPY and UFFDIO_ZEROPAGE for a run of pages, MINOR
// mode (contents into the page cache, threads released with UFFDIO_CONTINUE),
// a live source's precopy (rewrites in place, discards, the switchover),
// pages given back by the process, and poisoning the pages that will never
// come. Each install marks its pages in the target map, records the waits of
// the threads that faulted on them and settles each page exactly once.
#pragma once
#include <atomic>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

#include "engine_life.h"
#include "engine_stats.h"
#include "events.h"
#include "installed_checksum.h"
#include "target_map.h"
#include "uffd_abi.h"

namespace uffdpc {

// What an install came to: done; the layout is changing and the caller may not
// wait (retry elsewhere); or the engine must stop installing.
enum InstallResult { kOk, kBusy, kStop };

// MINOR mode, a template's filler: told of pages written into the page cache
// instead of mapping them (the filler's clones map them; template_supply.h).
class CacheListener {
 public:
  virtual ~CacheListener() = default;
  virtual void Cached(TargetRegion& r, uint64_t first, uint64_t count, const uint8_t* data, uint32_t reason) = 0;
};

class Installer {
 public:
  // `zeros`: map.maxRunBytes() of zeros (hugetlbfs has no ZEROPAGE: zeros are copied).
  Installer(TargetMap& map, EngineStats& stats, InstalledChecksum& checksum, EventSink& events, const EngineLife& life, int uffd, bool ownMemory,
            const uint8_t* zeros)
      : map_(map), stats_(stats), checksum_(checksum), events_(events), life_(life), uffd_(uffd), ownMemory_(ownMemory), zeros_(zeros) {}

  void SetCacheListener(CacheListener* listener) { cacheListener_ = listener; }
  // Runs of this process's own memory (a restore) that cover a whole aligned
  // 2 MiB go in as one transparent huge page: copied into a huge page of the
  // installing thread's own, then moved into place (UFFDIO_MOVE). Installing
  // and first touching 512 small pages one by one costs far more (on this
  // machine, a nested guest, about 12 µs a page against under 1 µs), and the
  // workload runs on huge-page mappings after. Needs UFFD_FEATURE_MOVE.
  void InstallHugePages() { hugeRuns_.store(true); }
  // A transparent huge page (x86-64, arm64 with 4 KiB pages), in bytes and in small pages.
  static constexpr uint64_t kHugeBytes = 2u << 20, kSmallPage = 4096, kHugePages = kHugeBytes / kSmallPage;
  static bool HugeAligned(uint64_t address) { return (address & (kHugeBytes - 1)) == 0; }
  // Whether data for r may go in as whole huge pages (small pages of own memory, InstallHugePages()).
  bool MovesHuge(const TargetRegion& r) const { return hugeRuns_.load(std::memory_order_relaxed) && !r.fill && r.pageSize == kSmallPage; }
  // Whether a run of `pages` pages of r may hold a whole huge page to move in
  // (its zero pages are then best handed over as data with the rest).
  bool MayInstallHuge(const TargetRegion& r, uint64_t pages) const { return MovesHuge(r) && pages >= kHugePages; }
  // The pages of r from `page` (before `end`) that make one aligned huge page
  // in the process's memory (kHugePages), or 0 where none starts there.
  uint64_t HugePageAt(TargetRegion& r, uint64_t page, uint64_t end) const {
    if (page + kHugePages > end) return 0;
    uint64_t run = 0, at = r.AddressOf(page, &run);
    return HugeAligned(at) && run >= kHugePages ? kHugePages : 0;
  }
  bool Leaving() const { return life_.Leaving(); }

  // Installs pages [first, first+count) of r that are neither resident nor given
  // back, a contiguous stretch per ioctl. `data`: their contents (null: zeros).
  // `mayWait`: retry while the layout changes (not on the fault thread).
  InstallResult Install(TargetRegion& r, uint64_t first, uint64_t count, const uint8_t* data, uint32_t reason, const char* channel, uint32_t generation,
                        bool mayWait = true);
  // Marks pages resident (see installer.cc); public for a template's clone, whose pages are mapped, not copied.
  void Installed(TargetRegion& r, uint64_t first, uint64_t count, uint32_t reason, const uint8_t* pages, bool counted = true, bool claimed = false);

  // ---- a live source's precopy ----
  InstallResult Precopied(TargetRegion& r, uint64_t first, uint64_t count, const uint8_t* data, const char* channel, uint32_t generation);
  void Discard(TargetRegion& r, uint64_t first, uint64_t count);
  void SwitchedOver();

  // ---- UFFDIO_CONTINUE (MINOR mode) ----
  int Continue(uint64_t address, uint64_t length, uint64_t pageSize, bool mayWait);
  // Any thread: cached pages whose mapping met a layout change (EAGAIN); the fault thread maps them after the event.
  void DeferContinue(uint64_t address, uint64_t length) {
    std::lock_guard<std::mutex> lock(deferredContinuesMu_);
    lateContinues_.push_back({address, length});
  }

  // ---- the fault thread's own installs ----
  // A fault on a page that is there (see installer.cc).
  void ServeResident(TargetRegion& r, uint64_t pageAddress, uint64_t faultNs);
  void ZeroFillGivenBack(uint64_t address, uint64_t pageSize);
  void ZeroFillOutside(uint64_t address);
  // Installs that met a layout change wait for the events the fault thread reads next.
  bool HasDeferred();
  void RetryDeferred();
  // The process gave memory back (balloon, DONTNEED) or unmapped it: those pages settle as zeros, never fetched.
  void GiveBack(uint64_t start, uint64_t end);

  // poisonMissing(): every page not settled raises SIGBUS when touched; returns the pages poisoned, `*firstError` the first errno.
  uint64_t PoisonMissing(int* firstError);

  // Waits (bounded) until no install is under way: one that copied its pages
  // may still be adding them to the checksum.
  void WaitIdle() const;

  // Counts the installs under way (see WaitIdle).
  struct Busy {
    explicit Busy(Installer& i) : n_(i.installing_) { n_.fetch_add(1); }
    ~Busy() { n_.fetch_sub(1); }
    std::atomic<int>& n_;
  };

 private:
  InstallResult InstallInCache(TargetRegion& r, uint64_t first, uint64_t count, const uint8_t* data, uint32_t reason, const char* channel, uint32_t generation,
                               bool mayWait);
  InstallResult ContinueRequested(TargetRegion& r, uint64_t p, uint64_t q, bool mayWait, const char* channel, uint32_t generation);
  int Copy(uint64_t dst, const uint8_t* src, uint64_t len, int64_t* done);
  int MoveHuge(uint64_t dst, const uint8_t* src, int64_t* done);
  int Zero(uint64_t dst, uint64_t len, int64_t* done);
  int Poison(uint64_t address, uint64_t length, uint64_t pageSize, uint64_t* pages);
  bool LayoutSettled();
  void Wake(uint64_t address, uint64_t length) {
    uffdio_range range{address, length};
    ioctl(uffd_, UFFDIO_WAKE, &range);
  }

  TargetMap& map_;
  EngineStats& stats_;
  InstalledChecksum& checksum_;
  EventSink& events_;
  const EngineLife& life_;
  int uffd_;
  bool ownMemory_;  // the regions are this process's own memory (a restore): precopy writes and drops pages directly
  const uint8_t* zeros_;
  CacheListener* cacheListener_ = nullptr;
  std::atomic<bool> zeroFallback_{false};
  std::atomic<bool> hugeRuns_{false};  // InstallHugePages(); off again if a move cannot be done here
  std::atomic<int> installing_{0};
  std::vector<std::pair<uint64_t, uint64_t>> deferredZeroFills_;  // fault thread only: [address, length]
  std::vector<std::pair<uint64_t, uint64_t>> deferredContinues_;  // fault thread only: MINOR pages to map again [address, length]
  std::mutex deferredContinuesMu_;
  std::vector<std::pair<uint64_t, uint64_t>> lateContinues_;  // under deferredContinuesMu_: the same, from the other threads
};

}  // namespace uffdpc
