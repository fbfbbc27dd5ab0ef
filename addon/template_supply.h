// Templates: one image filled once into a shared memory file on this host,
// for many clones. The template's own engine (its filler) puts the pages into
// the file, from whatever supply it has; the engines of its clones, whose
// guests map that file privately, take their pages from it (TemplateSupply):
// a page the file holds is mapped with UFFDIO_CONTINUE, a page it lacks is
// demanded from the filler, whose install maps it into every clone at once.
#pragma once
#include <atomic>
#include <memory>
#include <mutex>
#include <vector>

#include "events.h"
#include "installer.h"
#include "page_supply.h"
#include "target_map.h"

namespace uffdpc {

class TemplateFiller;
class TemplateSupply;

// What a template's filler and its clones share, under `mu`.
struct TemplateShare {
  std::mutex mu;
  TemplateFiller* filler = nullptr;  // null once it stopped
  std::vector<TemplateSupply*> clones;
  std::vector<std::shared_ptr<AtomicBitmap>> cached;   // per source region: in the file (the filler's regions are the source's)
  std::vector<const uint8_t*> contents;                // per source region: the filler's mapping of the file
  std::vector<uint64_t> sourcePages, sourcePageSizes;  // the image's geometry: a clone must have the same
};

// The filler's part: takes its clones' demands to its own supply, and maps what it installs into every clone.
class TemplateFiller final : public CacheListener, public FaultThreadWork {
 public:
  // `demandFd`: a non-blocking eventfd (the engine closes it at its shutdown). The map's regions are the source's, each whole, in the file's mapping.
  TemplateFiller(TargetMap& map, int demandFd);
  ~TemplateFiller() override;
  const std::shared_ptr<TemplateShare>& share() const { return share_; }
  // Where demanded pages are asked for: the filler engine's own supply.
  void SetSupply(PageSupply* supply) { supply_ = supply; }
  // Closes the template to new clones; no clone reaches this filler after.
  void Leave();

  // A clone's fault thread: pages its guest waits on (source region << 48 | page).
  void AddDemands(const std::vector<uint64_t>& demands);
  // The filler's fault thread: asks for each demanded page not yet in the file, as for a fault of its own.
  int WakeFd() const override { return demandFd_; }
  void OnWake() override;
  // Pages [first, first+count) of r are in the file now (at `data`): every clone counts them in and maps them.
  void Cached(TargetRegion& r, uint64_t first, uint64_t count, const uint8_t* data, uint32_t reason) override;

 private:
  TargetMap& map_;
  int demandFd_;
  PageSupply* supply_ = nullptr;
  std::shared_ptr<TemplateShare> share_;
  std::mutex demandMu_;
  std::vector<uint64_t> demands_;  // under demandMu_
};

// A clone's supply: its guest maps the template's file privately; its pages
// are released with UFFDIO_CONTINUE (MINOR mode) like a guest's own memory
// file's. Faults on pages the template does not hold yet go to its filler, a
// batch per read of the userfaultfd; the filler's installs release them.
class TemplateSupply final : public PageSupply {
 public:
  // The map's regions lie on the image's own pages (ratio 1, no file of their own: checked by the caller).
  TemplateSupply(std::shared_ptr<TemplateShare> share, TargetMap& map, Installer& installer, EventSink& events, const EngineLife& life);

  void Ask(TargetRegion& r, uint64_t page) override { demands_.push_back((uint64_t(r.sourceRegion) << 48) | r.SourceOf(page)); }
  void Flush() override;
  // Joins the template and counts in what its file holds already.
  void Start(int cpu) override;
  // Leaves the template; no call reaches this clone after.
  void Leave() override;

  // Under the template's lock: source pages [first, first+count) of `region`
  // are in the template's file, at `data` (see template_supply.cc).
  void FromTemplate(uint32_t region, uint64_t first, uint64_t count, const uint8_t* data, uint32_t reason);

 private:
  std::shared_ptr<TemplateShare> share_;
  TargetMap& map_;
  Installer& installer_;
  EventSink& events_;
  const EngineLife& life_;
  std::vector<uint64_t> demands_;        // fault thread only
  std::atomic<bool> targetGone_{false};  // its process exited (nothing more to map)
};

}  // namespace uffdpc
