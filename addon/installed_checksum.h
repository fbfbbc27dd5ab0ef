// The installed-pages checksum (page_checksum.h): every page the engine put in
// from the source's data, hashed as the source holds it, summed per source
// region, so the handler can check at the end that what went in is what the
// source has. installedChecksum() reports it with the pages it leaves out.
#pragma once
#include <napi.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "target_map.h"

namespace uffdpc {

class InstalledChecksum {
 public:
  // `zeros`: at least one source page of zeros, for the zero page's hash.
  InstalledChecksum(const TargetMap& map, bool enabled, const uint8_t* zeros);

  bool enabled() const { return enabled_; }
  // Pages [first, first+count) of r went in holding `pages` (null: zeros): each enters the sum once.
  void Add(TargetRegion& r, uint64_t first, uint64_t count, const uint8_t* pages);
  // Page k of r changes from `from` to `to` (null: zeros) while in the sum.
  void Recount(TargetRegion& r, uint64_t k, const uint8_t* from, const uint8_t* to);
  // Pages [p, q) of r, holding `base + k * pageSize`, leave the sum (dropped again).
  void Drop(TargetRegion& r, uint64_t p, uint64_t q, const uint8_t* base);

  // installedChecksum() -> per source region {region, sum, pages, skip}: the sum
  // and the pages it leaves out as flat [first, count, ...] source-page ranges
  // (given back, found present, mapped by no region, not yet installed); skip is
  // null past kMaxSkipRanges ranges. Call once no install is under way.
  Napi::Array Report(Napi::Env env) const;

 private:
  // Page p of r's share of the sum, holding `bytes` (null: zeros): per source page.
  uint64_t PageSum(const TargetRegion& r, uint64_t p, const uint8_t* bytes) const;

  static constexpr size_t kMaxSkipRanges = 100000;  // keeps the source's `done` frame well under its limit
  const TargetMap& map_;
  bool enabled_;
  std::unique_ptr<std::atomic<uint64_t>[]> sums_;  // per source region
  std::vector<uint64_t> zeroHash_;                 // per source region: ContentHash of a zero page
};

}  // namespace uffdpc
