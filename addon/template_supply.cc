#include "template_supply.h"

#include <unistd.h>

#include <algorithm>

#include "wire.h"

namespace uffdpc {

TemplateFiller::TemplateFiller(TargetMap& map, int demandFd) : map_(map), demandFd_(demandFd), share_(std::make_shared<TemplateShare>()) {
  share_->filler = this;
  for (auto& r : map.regions()) {
    share_->cached.push_back(r->cached);
    share_->contents.push_back(r->fill);
  }
  share_->sourcePages = map.sourcePageCounts();
  share_->sourcePageSizes = map.sourcePageSizes();
}

TemplateFiller::~TemplateFiller() { Leave(); }

void TemplateFiller::Leave() {
  std::lock_guard<std::mutex> lock(share_->mu);
  if (share_->filler == this) share_->filler = nullptr;
}

void TemplateFiller::AddDemands(const std::vector<uint64_t>& demands) {
  {
    std::lock_guard<std::mutex> lock(demandMu_);
    demands_.insert(demands_.end(), demands.begin(), demands.end());
  }
  uint64_t one = 1;
  if (write(demandFd_, &one, sizeof one) < 0) {}
}

void TemplateFiller::OnWake() {
  uint64_t count;
  if (read(demandFd_, &count, sizeof count) < 0) {}
  std::vector<uint64_t> demands;
  {
    std::lock_guard<std::mutex> lock(demandMu_);
    demands.swap(demands_);
  }
  auto& regions = map_.regions();
  for (uint64_t d : demands) {
    uint64_t region = d >> 48, page = d & ((1ull << 48) - 1);
    if (region >= regions.size() || page >= regions[region]->pages) continue;  // clones place their regions on the same image
    TargetRegion& r = *regions[region];
    if (r.cached->Test(page) || !r.requested->Claim(page) || r.cached->Test(page)) continue;
    supply_->Ask(r, page);
  }
  supply_->Flush();
}

void TemplateFiller::Cached(TargetRegion& r, uint64_t first, uint64_t count, const uint8_t* data, uint32_t reason) {
  std::lock_guard<std::mutex> lock(share_->mu);
  for (TemplateSupply* clone : share_->clones) clone->FromTemplate(r.sourceRegion, first, count, data, reason);
}

TemplateSupply::TemplateSupply(std::shared_ptr<TemplateShare> share, TargetMap& map, Installer& installer, EventSink& events, const EngineLife& life)
    : share_(std::move(share)), map_(map), installer_(installer), events_(events), life_(life) {
  // In the page cache: what the template's file holds (its regions are the source's, clones' pages lie on them one to one).
  for (auto& r : map.regions()) {
    r->cache = share_->cached[r->sourceRegion].get();
    r->cacheFirst = r->sourcePage;
  }
}

void TemplateSupply::Flush() {
  if (demands_.empty()) return;
  std::lock_guard<std::mutex> lock(share_->mu);
  if (share_->filler) share_->filler->AddDemands(demands_);
  demands_.clear();
}

void TemplateSupply::Start(int) {
  std::lock_guard<std::mutex> lock(share_->mu);
  if (!share_->filler) {
    events_.Emit({"error", "template", "ERR_ENGINE_STATE", "the template this clone maps has stopped filling", 0});
    return;
  }
  share_->clones.push_back(this);
  for (uint32_t region = 0; region < share_->cached.size(); region++) {
    const AtomicBitmap& cached = *share_->cached[region];
    for (uint64_t p = 0; p < cached.size();) {
      if (!cached.Test(p)) {
        p++;
        continue;
      }
      uint64_t q = p + 1;
      while (q < cached.size() && cached.Test(q)) q++;
      FromTemplate(region, p, q - p, share_->contents[region] + p * map_.sourcePageSize(region), wire::kBackground);
      p = q;
    }
  }
}

void TemplateSupply::Leave() {
  std::lock_guard<std::mutex> lock(share_->mu);
  auto& clones = share_->clones;
  clones.erase(std::remove(clones.begin(), clones.end(), this), clones.end());
}

// The pages are mapped into the guest at once (read-only, copy on write),
// waited on or not: its threads wake, and it then runs without faulting on
// what the template holds. The pages stay the template's; only page tables are added.
void TemplateSupply::FromTemplate(uint32_t region, uint64_t first, uint64_t count, const uint8_t* data, uint32_t reason) {
  if (life_.Leaving() || targetGone_) return;
  Installer::Busy busy(installer_);
  for (auto& r : map_.regions()) {
    if (r->sourceRegion != region) continue;
    uint64_t lo = std::max(first, r->sourcePage), hi = std::min(first + count, r->sourcePage + r->pages);
    if (lo >= hi) continue;
    uint64_t a = lo - r->sourcePage, b = hi - r->sourcePage;
    installer_.Installed(*r, a, b - a, reason, data + (lo - first) * r->pageSize);
    for (uint64_t k = a; k < b;) {  // a stretch per piece of the region (one, unless the process moved part of it)
      uint64_t run = 0;
      uint64_t at = r->AddressOf(k, &run);
      uint64_t len = std::min(run, b - k) * r->pageSize;
      k += std::min(run, b - k);
      int err = installer_.Continue(at, len, r->pageSize, /*mayWait=*/false);
      if (err == EAGAIN) {  // the layout is changing: the fault thread maps them after the event
        installer_.DeferContinue(at, len);
      } else if (err == ESRCH) {
        targetGone_ = true;
        if (!life_.Leaving()) events_.Emit(ErrnoEvent("target-gone", "template", ESRCH, "ioctl", "the process owning the memory exited", 0));
        return;
      } else if (err && err != ENOENT) {  // ENOENT: unmapped meanwhile (its event settles it)
        if (!life_.Leaving()) events_.Emit(ErrnoEvent("install-failed", "template", err, "ioctl", "mapping template pages failed (UFFDIO_CONTINUE)", 0));
      }
    }
  }
}

}  // namespace uffdpc
