// Pages from an image mapped in this process (a local restore). Which pages
// go in, and in what order, is the PageScheduler's (page_scheduler.h), over
// the target map's regions: the fault thread installs the faulted page itself,
// at once; a fill thread installs the window around it (and, for a page of a
// working set being replayed, the set's cluster), then the working set in its
// order, then the background, which follows the workload's last fault. Each
// page is claimed once, by whoever installs it.
#pragma once
#include <condition_variable>
#include <memory>
#include <mutex>
#include <vector>

#include "image_pages.h"
#include "installer.h"
#include "page_scheduler.h"
#include "page_supply.h"
#include "target_map.h"

namespace uffdpc {

class ImageSupply final : public PageSupply {
 public:
  struct Window {
    uint32_t forward = 0, backward = 0;  // pages installed after and before a faulted page
  };
  // `image`: one per source region, matching it (checked by the caller).
  ImageSupply(TargetMap& map, Installer& installer, EngineLife& life, std::vector<std::unique_ptr<ImagePages>> image, Window window, bool background);
  ~ImageSupply() override;

  // A page the kernel cannot take yet (EAGAIN: the layout is changing, and the
  // event saying so is read by this very thread) goes to the fill thread, which retries it.
  void Ask(TargetRegion& r, uint64_t page) override;
  void Flush() override {}
  // Starts the fill thread (joined by the engine's shutdown).
  void Start(int cpu) override;
  // Pages found present are claimed: no fill run takes them (nor counts them duplicates).
  void AlreadyHeld(TargetRegion& r, uint64_t first, uint64_t count) override;
  // Lets go of the image (its mappings may be unmapped from now on).
  void Release() override;

  // A working set's pages (source region << 48 | source page, in order),
  // installed ahead of the background. Null, or what is wrong with them (nothing is taken then).
  const char* AddPrefetch(const uint64_t* entries, size_t count) override;
  // The background fill starts (or goes on) now.
  void StartBackground();

 private:
  void FillLoop();
  void FillAround(const QueuedRequest& request);
  bool PrefetchBatch();
  bool BackgroundRun();
  void StopFilling();
  InstallResult InstallRun(const PageRun& run, bool mayWait);
  InstallResult InstallFromImage(TargetRegion& r, uint64_t first, uint64_t count, uint32_t reason, bool mayWait);

  TargetMap& map_;
  Installer& installer_;
  EngineLife& life_;
  std::vector<std::unique_ptr<ImagePages>> image_;  // per source region
  PageScheduler scheduler_;                         // over the target map's regions, one page a unit
  bool windowed_;                                   // a faulted page has a window to install
  PageRuns faultRuns_;                              // fault thread only: what Request() claimed
  PageRuns fillRuns_;                               // fill thread only: what Around() claimed
  // Under fillMu_ (the scheduler notifies fillCv_ when a request or a working set comes).
  std::mutex fillMu_;
  std::condition_variable fillCv_;
  bool backgroundOn_ = false, backgroundDone_ = false, fillFailed_ = false;
};

}  // namespace uffdpc
