// Pages from an image mapped in this process (a local restore). The fault
// thread installs the faulted page itself, at once; a fill thread installs,
// in this order of priority, the windows around faulted pages, a replayed
// working set (a cluster of it at a time) and the background, which follows
// the workload's last fault.
#pragma once
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <vector>

#include "image_pages.h"
#include "installer.h"
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
  // Lets go of the image (its mappings may be unmapped from now on).
  void Release() override;

  // A working set's pages (region << 48 | page, in order), installed ahead of
  // the background. Null, or what is wrong with them (nothing is taken then).
  const char* AddPrefetch(const uint64_t* entries, size_t count);
  // The background fill starts (or goes on) now.
  void StartBackground();

 private:
  void FillLoop();
  void FillAround(TargetRegion& r, uint64_t page);
  bool PrefetchBatch();
  bool InWorkingSet(const TargetRegion& r, uint64_t page) const { return prefetchSet_[r.sourceRegion]->Test(r.SourceOf(page)); }
  InstallResult InstallCluster(TargetRegion& r, uint64_t at, uint64_t* pages = nullptr);
  void BackgroundRun();
  void StopFilling();
  InstallResult InstallFromImage(TargetRegion& r, uint64_t first, uint64_t count, uint32_t reason, bool mayWait);
  void QueueFill(TargetRegion& r, uint64_t page);

  TargetMap& map_;
  Installer& installer_;
  EngineLife& life_;
  std::vector<std::unique_ptr<ImagePages>> image_;  // per source region
  Window window_;
  // The fill thread's work, under fillMu_: windows to install, the working set to replay, the background.
  std::mutex fillMu_;
  std::condition_variable fillCv_;
  std::deque<std::pair<TargetRegion*, uint64_t>> fillQueue_;
  std::vector<uint64_t> prefetch_;
  size_t prefetchNext_ = 0;
  std::vector<std::unique_ptr<AtomicBitmap>> prefetchSet_;  // per source region: the working set's pages (bits set under fillMu_)
  bool backgroundOn_ = false, backgroundDone_ = false, fillFailed_ = false;
  size_t bgRegion_ = 0;  // fill thread only: the background's place
  uint64_t bgCursor_ = 0, bgSeenSeq_ = 0;
  std::atomic<uint64_t> lastFault_{0}, faultSeq_{0};  // target region << 48 | page of the last page asked for
};

}  // namespace uffdpc
