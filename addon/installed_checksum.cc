#include "installed_checksum.h"

#include <algorithm>

#include "page_checksum.h"

namespace uffdpc {

InstalledChecksum::InstalledChecksum(const TargetMap& map, bool enabled, const uint8_t* zeros)
    : map_(map), enabled_(enabled), sums_(new std::atomic<uint64_t>[map.sourceRegions()]()) {
  for (uint64_t size : map.sourcePageSizes()) zeroHash_.push_back(size <= map.maxRunBytes() ? ContentHash(zeros, size) : 0);
}

void InstalledChecksum::Add(TargetRegion& r, uint64_t first, uint64_t count, const uint8_t* pages) {
  uint64_t sum = 0;
  for (uint64_t p = first; p < first + count; p++)
    if (r.checked->Claim(p)) sum += PageSum(r, p, pages ? pages + (p - first) * r.pageSize : nullptr);
  sums_[r.sourceRegion].fetch_add(sum, std::memory_order_relaxed);
}

void InstalledChecksum::Recount(TargetRegion& r, uint64_t k, const uint8_t* from, const uint8_t* to) {
  if (!enabled_ || !r.checked->Test(k)) return;
  sums_[r.sourceRegion].fetch_add(PageSum(r, k, to) - PageSum(r, k, from), std::memory_order_relaxed);
}

void InstalledChecksum::Drop(TargetRegion& r, uint64_t p, uint64_t q, const uint8_t* base) {
  if (!enabled_) return;
  uint64_t delta = 0;
  for (uint64_t k = p; k < q; k++) {
    if (!r.checked->Test(k)) continue;
    delta -= PageSum(r, k, base + k * r.pageSize);
    r.checked->Clear(k);
  }
  sums_[r.sourceRegion].fetch_add(delta, std::memory_order_relaxed);
}

uint64_t InstalledChecksum::PageSum(const TargetRegion& r, uint64_t p, const uint8_t* bytes) const {
  uint64_t size = map_.sourcePageSize(r.sourceRegion), sum = 0;
  for (uint64_t s = 0; s < r.ratio; s++)
    sum += Contribution(r.sourceRegion, r.SourceOf(p) + s, bytes ? ContentHash(bytes + s * size, size) : zeroHash_[r.sourceRegion]);
  return sum;
}

Napi::Array InstalledChecksum::Report(Napi::Env env) const {
  Napi::Array out = Napi::Array::New(env, map_.sourceRegions());
  for (uint32_t id = 0; id < map_.sourceRegions(); id++) {
    std::vector<const TargetRegion*> targets;
    for (auto& r : map_.regions())
      if (r->sourceRegion == id) targets.push_back(r.get());
    std::sort(targets.begin(), targets.end(), [](const TargetRegion* a, const TargetRegion* b) { return a->sourcePage < b->sourcePage; });
    std::vector<double> skip;
    bool tooMany = false;
    auto leaveOut = [&](uint64_t first, uint64_t count) {
      if (count == 0 || tooMany) return;
      if (!skip.empty() && skip[skip.size() - 2] + skip.back() == double(first)) {
        skip.back() += double(count);
        return;
      }
      if (skip.size() / 2 >= kMaxSkipRanges) {
        tooMany = true;
        return;
      }
      skip.push_back(double(first));
      skip.push_back(double(count));
    };
    uint64_t cursor = 0;
    for (const TargetRegion* t : targets) {
      leaveOut(cursor, t->sourcePage - cursor);
      for (uint64_t p = t->checked->NextClear(0); p < t->pages; p = t->checked->NextClear(p)) {
        uint64_t q = p;
        while (q < t->pages && !t->checked->Test(q)) q++;
        leaveOut(t->SourceOf(p), (q - p) * t->ratio);
        p = q;
      }
      cursor = t->sourcePage + t->SourceSpan();
    }
    leaveOut(cursor, map_.sourcePages(id) - cursor);
    uint64_t skipped = 0;
    for (size_t k = 1; k < skip.size(); k += 2) skipped += static_cast<uint64_t>(skip[k]);
    const uint64_t checkedPages = tooMany ? 0 : map_.sourcePages(id) - skipped;
    Napi::Object o = Napi::Object::New(env);
    o.Set("region", id);
    o.Set("sum", Napi::BigInt::New(env, sums_[id].load()));
    o.Set("pages", double(checkedPages));
    if (tooMany) {
      o.Set("skip", env.Null());
    } else {
      Napi::Array a = Napi::Array::New(env, skip.size());
      for (size_t k = 0; k < skip.size(); k++) a.Set(static_cast<uint32_t>(k), skip[k]);
      o.Set("skip", a);
    }
    out.Set(id, o);
  }
  return out;
}

}  // namespace uffdpc
