// Which pages go next, written once for every sink that sends or installs
// pages (the page server's socket runs, the QEMU stream's records, a local
// image's installs): each page once, in this order of priority:
//
//   requested    the page (or pages) a thread waits on, always
//   window       the pages around it: `forward` after, then `backward`
//                before, in whole units (a huge page's 512 source pages)
//   working set  the pages of a recorded working set: around a request, its
//                cluster of the set at once; on their own, in the set's order
//   background   every page not claimed yet, from a cursor that follows the
//                last request (then the following regions, wrapping round)
//
// A page is claimed by setting its bit (AtomicBitmap): whoever sets it first
// sends or installs it, so several threads (a request thread and a bulk or
// fill thread) claim at once with no lock. A unit is claimed by its first
// page; it goes whole or not at all. The scheduler yields runs of claimed
// pages with their reason; what a sink does with a run (a socket run, QEMU
// records, UFFDIO_COPY) is the sink's.
//
// Threads: Claim, Request and Around from any thread, lock-free (the request
// path takes no mutex). AddWorkingSet, Queue, TakeRequest, HasWork and
// NextWorkingSetRun take the scheduler's own mutex (never on the request
// path), and notify the sink's condition variable (WakeOnWork). One thread
// at a time calls NextBackgroundRun (it owns the cursor).
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <vector>

#include "bitmap.h"
#include "wire.h"

namespace uffdpc {

// Why a run goes now; the values are the wire's (wire::Reason).
enum class Why : uint32_t {
  kRequested = wire::kRequested,
  kWindow = wire::kWindow,
  kWorkingSet = wire::kPrefetch,
  kBackground = wire::kBackground,
};

struct PageRun {
  uint32_t region;
  uint64_t first, count;
  Why why;
};
using PageRuns = std::vector<PageRun>;

// A request waiting in the queue: pages [first, first + count) of `region`;
// `atNs` is the sink's (e.g. when it came, for a latency histogram).
struct QueuedRequest {
  uint32_t region;
  uint64_t first, count, atNs;
};

class PageScheduler {
 public:
  struct Region {
    uint64_t pages;
    uint64_t unit = 1;    // pages claimed together (divides pages; at most maxRun)
    uint64_t maxRun = 1;  // the most pages in one run (a multiple of unit)
  };
  struct Window {
    uint64_t forward = 0, backward = 0;  // in units
  };

  PageScheduler(std::vector<Region> regions, Window window);

  uint32_t regions() const { return static_cast<uint32_t>(regions_.size()); }
  const Region& region(uint32_t id) const { return regions_[id].shape; }
  uint64_t totalPages() const { return totalPages_; }
  // Pages claimed so far (by anyone); AllClaimed() once every page was.
  uint64_t claimed() const { return claimed_.load(std::memory_order_acquire); }
  bool AllClaimed() const { return claimed() >= totalPages_; }

  // Page `page` of `region` is taken care of without being sent (the other
  // side holds it, or it was given back): never yielded again. True when this
  // call claimed it.
  bool Claim(uint32_t region, uint64_t page);
  bool Claimed(uint32_t region, uint64_t page) const { return regions_[region].claimed->Test(page); }

  // The request path. Request(): the background follows [first, first+count)
  // from now on; its pages (whole units) not claimed yet are claimed and
  // appended as requested runs. Returns how many of them were claimed before.
  uint64_t Request(uint32_t region, uint64_t first, uint64_t count, PageRuns& out);
  // Around(): then the window around [first, first+count) and, where the
  // request lies in the working set, the set's cluster around it: the pages
  // not claimed yet, at most `room` of them (a sink's budget), appended as runs.
  void Around(uint32_t region, uint64_t first, uint64_t count, uint64_t room, PageRuns& out);

  // The request queue, for a sink that answers on another thread than the
  // one that reads requests (QEMU's return path, a local image's fill thread).
  void Queue(QueuedRequest request);
  bool TakeRequest(QueuedRequest* request);

  // A working set to stream ahead of the background, in this order: entries
  // region << 48 | page. False (nothing kept) when one lies outside.
  bool AddWorkingSet(const std::vector<uint64_t>& entries);
  uint64_t WorkingSetSize();
  bool InWorkingSet(uint32_t region, uint64_t page) const;
  // The next entry of the set not claimed yet with the pages of the set
  // contiguous to it not claimed yet (its whole unit, in units), as one run;
  // false when no entry is left.
  bool NextWorkingSetRun(PageRun* run);

  // A queued request or working-set entry is waiting (takes the mutex: call
  // it in a condition variable's predicate, under the sink's own lock).
  bool HasWork();
  // `cv` is notified under `mu` when a request or a working set comes.
  void WakeOnWork(std::mutex& mu, std::condition_variable& cv) {
    wakeMu_ = &mu;
    wakeCv_ = &cv;
  }

  // The next run of at most `maxPages` pages (whole units) not claimed yet,
  // from the cursor (which jumps after each new request); false when this
  // sweep found none (AllClaimed(), or another thread took the last ones).
  bool NextBackgroundRun(uint64_t maxPages, PageRun* run);

 private:
  struct State {
    Region shape;
    std::unique_ptr<AtomicBitmap> claimed;
    std::unique_ptr<AtomicBitmap> workingSet;  // allocated with the first working set
  };
  static constexpr uint64_t kPageMask = (1ull << 48) - 1;

  // Claims the unit starting at `first` (by its first page); true when this call did.
  bool ClaimUnit(State& r, uint64_t first);
  // Claims the pages of [from, to) not claimed yet while `room` lasts, appended as runs.
  void ClaimRange(uint32_t id, uint64_t from, uint64_t to, Why why, uint64_t& room, PageRuns& out);
  void Notify();

  std::vector<State> regions_;
  Window window_;
  uint64_t totalPages_ = 0;
  std::atomic<uint64_t> claimed_{0};
  // The last request, for the background: region << 48 | next page, and a count that changes with it.
  std::atomic<uint64_t> follow_{0}, followSeq_{0};
  std::atomic<bool> hasSet_{false};  // the working-set bitmaps are allocated
  // Under mu_: the queue and the working set's order.
  std::mutex mu_;
  std::deque<QueuedRequest> queue_;
  std::vector<uint64_t> workingSet_;
  size_t workingSetNext_ = 0;
  std::mutex* wakeMu_ = nullptr;
  std::condition_variable* wakeCv_ = nullptr;
  // The background's own (one thread).
  uint32_t bgRegion_ = 0;
  uint64_t bgCursor_ = 0, bgSeenSeq_ = 0;
};

}  // namespace uffdpc
