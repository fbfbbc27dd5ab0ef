// The destination's target map: the regions of the faulting process's memory
// that the engine fills, each backed by a stretch of a source region, with the
// per-page bitmaps every part reads (requested, received, given back, settled,
// in the checksum) and the count of settled pages that says when the memory is
// complete. Every other part of the engine (installer.h, fault_loop.h, the
// supplies) sees the memory only through this map.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "bitmap.h"
#include "events.h"
#include "page_array.h"

namespace uffdpc {

// A range of the faulting process's memory, backed by pages
// [sourcePage, sourcePage + pages) of source region `sourceRegion`.
struct TargetRegion {
  std::atomic<uint64_t> base{0};  // page 0's address while the region is in one piece (it moves on REMAP)
  uint64_t length = 0, pageSize = 0, pages = 0;
  // Where the region's pages are once the process moved part of it (mremap):
  // pages [first, first+pages) at `address`, sorted by first. Empty while it is
  // in one piece (at `base`). Read under piecesMu; moves are rare.
  struct Piece {
    uint64_t first, pages, address;
  };
  std::atomic<bool> split{false};
  mutable std::mutex piecesMu;
  std::vector<Piece> pieces;
  // Page p's address now; `run` (if given): how many pages from p on lie contiguous there.
  uint64_t AddressOf(uint64_t p, uint64_t* run = nullptr) const {
    if (!split.load(std::memory_order_acquire)) {
      if (run) *run = pages - p;
      return base.load(std::memory_order_acquire) + p * pageSize;
    }
    return SplitAddressOf(p, run);
  }
  uint64_t SplitAddressOf(uint64_t p, uint64_t* run) const;
  // The region's pieces now (one while it is whole).
  std::vector<Piece> Pieces() const;
  // The page at `address`, when the region holds it.
  bool PageAt(uint64_t address, uint64_t* page) const;
  // The process moved [from, from+len) to `to` (mremap): the pages there follow. Returns whether any did.
  bool Move(uint64_t from, uint64_t to, uint64_t len);

  uint32_t index = 0;  // among the map's regions
  uint32_t sourceRegion = 0;
  uint64_t sourcePage = 0;
  uint64_t ratio = 1;  // source pages per page here (512: a 2 MiB huge page from a 4 KiB-page image)
  // The first source page behind page p of this region.
  uint64_t SourceOf(uint64_t p) const { return sourcePage + p * ratio; }
  // Source pages this region covers.
  uint64_t SourceSpan() const { return pages * ratio; }
  std::unique_ptr<AtomicBitmap> received, requested;
  std::unique_ptr<AtomicBitmap> removed;             // given back by the process (REMOVE/UNMAP): zero-filled, never fetched
  std::unique_ptr<AtomicBitmap> settled;             // resident or given back: counted toward completion exactly once
  std::unique_ptr<AtomicBitmap> checked;             // installed here from the source's data: in the installed-pages checksum
  std::unique_ptr<LazyPageArray<uint64_t>> faultNs;  // first fault time of a waited-on page, 0 if none
  std::unique_ptr<LazyPageArray<uint32_t>> waiters;  // faults seen on the page while it was missing
  // MINOR mode: the guest's memory file mapped in this process too. Contents
  // go into the page cache through it, and the guest's threads are released
  // with UFFDIO_CONTINUE (null: pages are installed with UFFDIO_COPY).
  uint8_t* fill = nullptr;
  std::shared_ptr<AtomicBitmap> cached;  // MINOR mode, own file: the page's contents are in the page cache
  // MINOR mode (own file, or a template's clone): where to look whether page p
  // is in the page cache, bit cacheFirst + p of `cache`. Null: not MINOR.
  const AtomicBitmap* cache = nullptr;
  uint64_t cacheFirst = 0;
  bool Minor() const { return cache != nullptr; }
  bool InCache(uint64_t p) const { return cache->Test(cacheFirst + p); }
};

// Memory events the fault thread has read but not applied yet: an install
// that finds nothing mapped (ENOENT) waits for them before it decides the
// page was unmapped rather than moved (Installer::LayoutSettled).
struct LayoutGate {
  std::atomic<bool> reading{false};  // the fault thread is reading the userfaultfd
  std::atomic<int> unapplied{0};
  static thread_local bool onFaultThread;
};

class TargetMap {
 public:
  explicit TargetMap(EventSink& events) : events_(events) {}

  // Building (engine_options.cc), before any thread runs.
  void AddSourceRegion(uint64_t pages, uint64_t pageSize) {
    sourcePages_.push_back(pages);
    sourcePageSize_.push_back(pageSize);
  }
  TargetRegion& AddRegion(uint64_t base, uint64_t length, uint64_t pageSize, uint32_t sourceRegion, uint64_t sourcePage, uint8_t* fill);

  const std::vector<std::unique_ptr<TargetRegion>>& regions() const { return regions_; }
  size_t sourceRegions() const { return sourcePages_.size(); }
  uint64_t sourcePages(uint32_t id) const { return sourcePages_[id]; }
  uint64_t sourcePageSize(uint32_t id) const { return sourcePageSize_[id]; }
  const std::vector<uint64_t>& sourcePageCounts() const { return sourcePages_; }
  const std::vector<uint64_t>& sourcePageSizes() const { return sourcePageSize_; }
  uint64_t totalPages() const { return totalPages_; }
  uint64_t maxRunBytes() const { return maxRunBytes_; }  // the largest run any region takes, in bytes

  // The region holding `address`, and its page there.
  TargetRegion* RegionAt(uint64_t address, uint64_t* page) const {
    for (auto& r : regions_)
      if (r->PageAt(address, page)) return r.get();
    return nullptr;
  }

  // ---- settling: pages that reached their final state (resident, or given back) ----
  void Start(uint64_t now) { startNs_ = now; }
  uint64_t startNs() const { return startNs_; }
  uint64_t completeNs() const { return completeNs_.load(); }
  uint64_t residentPages() const { return resident_.load(); }
  // Counts `pages` settled; the last one completes the memory (not before a live source's switchover).
  void Settle(uint64_t pages, uint64_t now);
  // A settled page of r dropped again (a live source wrote it after sending it).
  void Unsettle(TargetRegion& r, uint64_t p) {
    if (!r.settled->Test(p)) return;
    r.settled->Clear(p);
    resident_.fetch_sub(1);
  }
  // A live source: before its switchover marker, pages may be here and still change (nothing completes).
  bool InPrecopy() const { return precopy_.load(); }
  void SetPrecopy(bool on) { precopy_.store(on); }
  // After the switchover marker: complete now if every page is here.
  void CompleteIfWhole(uint64_t now);

  // ---- what JS reads (bit p of byte p/8) ----
  void ReceivedBits(uint32_t region, uint8_t* out) const;  // (pages + 7) / 8 bytes
  // Source region `id`: what the source need not send (resident, given back, or mapped by no region).
  void HeldBits(uint32_t id, uint8_t* out) const;  // (source pages + 7) / 8 bytes
  // Source pages (entries source region << 48 | page, as a working set
  // names them) as the target pages that hold them, region << 48 | page, in
  // order; a page no region maps is left out. Null, or what is wrong (one lies outside the image).
  const char* TargetEntries(const uint64_t* entries, size_t count, std::vector<uint64_t>& out) const;
  // Pages of `region` found present already settle without being fetched; returns how many.
  uint64_t MarkResident(uint32_t region, const uint8_t* bits);
  // Pages asked for and not yet settled.
  uint64_t OutstandingRequests() const;

  LayoutGate layout;

 private:
  EventSink& events_;
  std::vector<std::unique_ptr<TargetRegion>> regions_;
  std::vector<uint64_t> sourcePages_, sourcePageSize_;
  uint64_t totalPages_ = 0, maxRunBytes_ = 4096;
  uint64_t startNs_ = 0;
  std::atomic<uint64_t> resident_{0}, completeNs_{0};
  std::atomic<bool> precopy_{false};
};

}  // namespace uffdpc
