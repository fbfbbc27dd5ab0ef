#include "installer.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <ctime>

#include "io.h"
#include "wire.h"

namespace uffdpc {

InstallResult Installer::Install(TargetRegion& r, uint64_t first, uint64_t count, const uint8_t* data, uint32_t reason, const char* channel,
                                 uint32_t generation, bool mayWait) {
  Busy busy(*this);
  if (r.fill) return InstallInCache(r, first, count, data, reason, channel, generation, mayWait);
  uint64_t p = first, end = first + count;
  while (p < end) {
    if (r.received->Test(p) || r.removed->Test(p)) {
      if (r.received->Test(p)) stats_.duplicates++;
      p++;
      continue;
    }
    uint64_t q = p + 1;
    while (q < end && !r.received->Test(q) && !r.removed->Test(q)) q++;
    int64_t done = 0;
    uint64_t run = 0;
    uint64_t dst = r.AddressOf(p, &run);
    q = std::min(q, p + run);  // one ioctl per stretch that is contiguous in the process's memory
    uint64_t len = (q - p) * r.pageSize;
    const uint8_t* src = data ? data + (p - first) * r.pageSize : nullptr;
    int err;
    if (src && MovesHuge(r) && HugeAligned(dst) && len >= kHugeBytes) {
      err = MoveHuge(dst, src, &done);
      if (err == 0) stats_.hugeInstalls++;
      if (err == ENOMEM || err == EINVAL || err == ENOTTY || err == EPERM || err == EBUSY) {
        hugeRuns_.store(false);  // no huge page to be had, or no moving here: small pages from now on
        int64_t moved = done, rest = 0;
        err = Copy(dst + moved, src + moved, len - moved, &rest);
        done = moved + std::max<int64_t>(rest, 0);
      }
    } else {
      // A stretch that reaches an aligned 2 MiB it covers whole goes in up to it, and that 2 MiB next.
      uint64_t huge = (dst + kHugeBytes - 1) & ~(kHugeBytes - 1);
      if (src && MovesHuge(r) && huge > dst && huge + kHugeBytes <= dst + len) len = huge - dst;
      err = src ? Copy(dst, src, len, &done) : Zero(dst, len, &done);
    }
    uint64_t donePages = done > 0 ? static_cast<uint64_t>(done) / r.pageSize : 0;
    Installed(r, p, donePages, reason, data ? data + (p - first) * r.pageSize : nullptr);
    p += donePages;
    if (err == 0) continue;
    if (err == EEXIST) {  // another channel, a zero-fill, or the process itself got there first
      stats_.duplicates++;
      Installed(r, p, 1, reason, data ? data + (p - first) * r.pageSize : nullptr, /*counted=*/false);
      p++;
      continue;
    }
    if (err == EAGAIN) {  // the layout is changing (REMOVE/UNMAP in flight): look again shortly
      stats_.retries++;
      if (!mayWait) return kBusy;
      timespec ts{0, 50000};
      nanosleep(&ts, nullptr);
      if (Leaving()) return kStop;
      continue;
    }
    if (err == ENOENT) {                              // nothing mapped there now: moved (mremap) or unmapped
      uint64_t tried = dst + donePages * r.pageSize;  // the page that failed, past what was installed
      bool settled = LayoutSettled();
      if (settled && r.AddressOf(p) != tried) continue;  // moved: install it at its new place
      if (!settled && !Leaving()) {
        // A memory event read but not applied yet (on the fault thread: one
        // later in the same batch) may have moved the page: it is not given
        // back on a guess, but tried again once the event is applied.
        stats_.retries++;
        if (!mayWait) return kBusy;
        continue;
      }
      GiveBack(tried, tried + r.pageSize);  // unmapped: settled as given back
      p++;
      continue;
    }
    if (err == ESRCH) {  // the process owning the memory is gone
      if (!Leaving()) events_.Emit(ErrnoEvent("target-gone", channel, ESRCH, "ioctl", "the process owning the memory exited", generation));
      return kStop;
    }
    if (!Leaving())
      events_.Emit(ErrnoEvent("install-failed", channel, err, "ioctl",
                              data ? "installing pages failed (UFFDIO_COPY)" : "installing zero pages failed (UFFDIO_ZEROPAGE)", generation));
    return kStop;
  }
  return kOk;
}

// MINOR mode: pages [first, first+count) of r go into the page cache through
// this process's own mapping of the guest's memory file, each written once,
// by whoever claims it first (once mapped, the guest may be writing to it);
// then the pages a thread asked for are mapped with UFFDIO_CONTINUE, which
// wakes it. The rest wait in the cache for their first touch (ServeResident).
InstallResult Installer::InstallInCache(TargetRegion& r, uint64_t first, uint64_t count, const uint8_t* data, uint32_t reason, const char* channel,
                                        uint32_t generation, bool mayWait) {
  uint64_t p = first, end = first + count;
  while (p < end) {
    if (r.removed->Test(p)) {
      p++;
      continue;
    }
    if (!r.received->Claim(p)) {
      stats_.duplicates++;
      p++;
      continue;
    }
    uint64_t q = p + 1;
    while (q < end && !r.removed->Test(q) && r.received->Claim(q)) q++;
    uint8_t* dst = r.fill + p * r.pageSize;
    const uint8_t* src = data ? data + (p - first) * r.pageSize : nullptr;
    if (src)
      std::memcpy(dst, src, (q - p) * r.pageSize);
    else
      std::memset(dst, 0, (q - p) * r.pageSize);
    for (uint64_t k = p; k < q; k++) r.cached->Claim(k);  // before looking for requests: see FaultLoop::OnFault
    Installed(r, p, q - p, reason, src, /*counted=*/true, /*claimed=*/true);
    if (cacheListener_) {
      cacheListener_->Cached(r, p, q - p, dst, reason);
    } else if (ContinueRequested(r, p, q, mayWait, channel, generation) == kStop) {
      return kStop;
    }
    p = q;
  }
  return kOk;
}

// MINOR mode: maps the pages of [p, q) of r that a thread asked for (they
// are in the page cache) with UFFDIO_CONTINUE, which wakes their threads.
InstallResult Installer::ContinueRequested(TargetRegion& r, uint64_t p, uint64_t q, bool mayWait, const char* channel, uint32_t generation) {
  for (uint64_t k = p; k < q;) {
    if (!r.requested->Test(k)) {
      k++;
      continue;
    }
    uint64_t run = 0;
    uint64_t at = r.AddressOf(k, &run);
    uint64_t j = k + 1;
    while (j < q && j < k + run && r.requested->Test(j)) j++;
    int err = Continue(at, (j - k) * r.pageSize, r.pageSize, mayWait);
    if (err == EAGAIN) {
      DeferContinue(at, (j - k) * r.pageSize);
    } else if (err == ESRCH) {
      if (!Leaving()) events_.Emit(ErrnoEvent("target-gone", channel, ESRCH, "ioctl", "the process owning the memory exited", generation));
      return kStop;
    } else if (err) {
      if (!Leaving()) events_.Emit(ErrnoEvent("install-failed", channel, err, "ioctl", "mapping cached pages failed (UFFDIO_CONTINUE)", generation));
      return kStop;
    }
    k = j;
  }
  return kOk;
}

// Marks pages resident: records the wait of any thread that faulted on
// them and settles each exactly once. `pages`: their contents (null for a
// zero run). `counted`: the pages were installed by this call's ioctl
// (false for a page found already present); only those enter the checksum.
// `claimed`: the caller claimed the pages' received bits already (MINOR mode).
void Installer::Installed(TargetRegion& r, uint64_t first, uint64_t count, uint32_t reason, const uint8_t* pages, bool counted, bool claimed) {
  if (count == 0) return;
  bool zero = pages == nullptr;
  if (counted && checksum_.enabled()) checksum_.Add(r, first, count, pages);
  uint64_t now = MonotonicNs(), settled = 0;
  for (uint64_t p = first; p < first + count; p++) {
    if (!claimed && !r.received->Claim(p)) continue;
    if (r.settled->Claim(p)) settled++;
    uint64_t t = r.faultNs->Take(p);
    if (t) {
      uint64_t waited = now > t ? now - t : 0;
      stats_.latency.Record(waited);
      uint32_t w = r.waiters->Take(p);
      stats_.blockedNs += waited * (w ? w : 1);
    }
  }
  if (counted) {
    stats_.installed[reason] += count;
    if (zero) stats_.zeroPages += count;
  }
  map_.Settle(settled, now);
}

// Pages [first, first+count) of r, sent in a precopy round: those not here
// yet are installed; those here already (sent in an earlier round, the
// workload has written them since) are written over, in place: nothing
// runs on this memory before the switchover.
InstallResult Installer::Precopied(TargetRegion& r, uint64_t first, uint64_t count, const uint8_t* data, const char* channel, uint32_t generation) {
  uint64_t p = first, end = first + count;
  while (p < end) {
    bool held = r.received->Test(p);
    uint64_t q = p + 1;
    while (q < end && r.received->Test(q) == held) q++;
    const uint8_t* src = data ? data + (p - first) * r.pageSize : nullptr;
    if (!held) {
      if (Install(r, p, q - p, src, wire::kPrecopy, channel, generation) == kStop) return kStop;
    } else {
      uint8_t* dst = r.fill ? r.fill + p * r.pageSize : ownMemory_ ? reinterpret_cast<uint8_t*>(r.base.load() + p * r.pageSize) : nullptr;
      if (!dst) {
        if (!Leaving()) events_.Emit({"error", channel, "ERR_UNSUPPORTED", "precopy cannot rewrite a page of memory this process does not hold", generation});
        return kStop;
      }
      for (uint64_t k = p; k < q; k++) checksum_.Recount(r, k, dst + (k - p) * r.pageSize, src ? src + (k - p) * r.pageSize : nullptr);
      if (src)
        std::memcpy(dst, src, (q - p) * r.pageSize);
      else
        std::memset(dst, 0, (q - p) * r.pageSize);
      stats_.installed[wire::kPrecopy] += q - p;
      stats_.rewritten += q - p;
    }
    p = q;
  }
  return kOk;
}

// Pages [first, first+count) of r were written at the source after they were
// sent: they become missing again (dropped here; a touch faults and fetches
// them from the paused workload's memory).
void Installer::Discard(TargetRegion& r, uint64_t first, uint64_t count) {
  uint8_t* base = r.fill ? r.fill : ownMemory_ ? reinterpret_cast<uint8_t*>(r.base.load()) : nullptr;
  if (!base) return;  // refused with the precopy run that brought it (Precopied)
  uint64_t dropped = 0;
  for (uint64_t p = first, end = first + count; p < end;) {
    if (!r.received->Test(p)) {
      p++;
      continue;
    }
    uint64_t q = p + 1;
    while (q < end && r.received->Test(q)) q++;
    uint8_t* at = base + p * r.pageSize;
    checksum_.Drop(r, p, q, base);
    // MINOR mode: out of the file (the guest's mapping loses them too); own memory: back to unpopulated.
    if (madvise(at, (q - p) * r.pageSize, r.fill ? MADV_REMOVE : MADV_DONTNEED) != 0) {
      events_.Emit(ErrnoEvent("error", "bulk", errno, "madvise", "dropping pages written at the source failed"));
      p = q;
      continue;
    }
    for (uint64_t k = p; k < q; k++) {
      if (r.fill) r.cached->Clear(k);
      r.received->Clear(k);
      map_.Unsettle(r, k);
    }
    dropped += q - p;
    p = q;
  }
  stats_.discarded += dropped;
}

// The switchover marker: every discard is done; the workload may run here now.
void Installer::SwitchedOver() {
  map_.SetPrecopy(false);
  stats_.switchoverNs = MonotonicNs();
  events_.Emit({"switchover", "bulk", "", "", 0, {{"discarded", double(stats_.discarded.load())}, {"rewritten", double(stats_.rewritten.load())}}});
  map_.CompleteIfWhole(MonotonicNs());
}

// UFFDIO_CONTINUE over [address, address+length): maps the page-cache pages
// there and wakes their threads; pages mapped already (EEXIST) are woken and
// stepped over. 0 or an errno; EAGAIN (the layout is changing) is retried
// only when the caller may wait.
int Installer::Continue(uint64_t address, uint64_t length, uint64_t pageSize, bool mayWait) {
  uint64_t end = address + length;
  while (address < end) {
    uffdio_continue c{{address, end - address}, 0, 0};
    if (ioctl(uffd_, UFFDIO_CONTINUE, &c) == 0) return 0;
    int err = errno;
    if (c.mapped > 0) address += static_cast<uint64_t>(c.mapped);
    if (err == EEXIST) {
      Wake(address, pageSize);
      address += pageSize;
      continue;
    }
    if (err == EAGAIN && mayWait && !Leaving()) {
      timespec ts{0, 50000};
      nanosleep(&ts, nullptr);
      continue;
    }
    return err;
  }
  return 0;
}

// A fault on a page that is there. Installed with UFFDIO_COPY while the
// fault was queued: make sure the thread is awake. MINOR mode, its contents
// in the page cache: map it with UFFDIO_CONTINUE, copying nothing.
void Installer::ServeResident(TargetRegion& r, uint64_t pageAddress, uint64_t faultNs) {
  if (!r.Minor()) {
    stats_.faultsResident++;
    Wake(pageAddress, r.pageSize);
    return;
  }
  stats_.minorFaults++;
  int err = Continue(pageAddress, r.pageSize, r.pageSize, /*mayWait=*/false);
  if (err == EAGAIN)
    deferredContinues_.push_back({pageAddress, r.pageSize});  // the layout is changing: after this batch's events
  else if (err && err != ESRCH)
    events_.Emit(ErrnoEvent("install-failed", "", err, "ioctl", "mapping a cached page failed (UFFDIO_CONTINUE)"));
  uint64_t now = MonotonicNs();
  stats_.latency.Record(now > faultNs ? now - faultNs : 0);
}

// Maps a zero page where the process gave memory back. EEXIST: someone
// mapped it meanwhile, so just wake the thread. EAGAIN: the layout is
// changing and the event saying so is still unread (events are read after
// faults), so retry once this batch of messages has been handled.
void Installer::ZeroFillGivenBack(uint64_t address, uint64_t pageSize) {
  int64_t done = 0;
  int err = Zero(address, pageSize, &done);
  if (err == 0) {
    stats_.zeroFilledAfterRemove++;
  } else if (err == EEXIST) {
    Wake(address, pageSize);
  } else if (err == EAGAIN) {
    deferredZeroFills_.push_back({address, pageSize});
  } else if (err != ENOENT) {
    events_.Emit(ErrnoEvent("install-failed", "", err, "ioctl", "zero-filling a removed page failed (UFFDIO_ZEROPAGE)"));
  }
}

// A fault outside every region: a zero page, or (present already, or not
// ours to fill: a MINOR fault on a cached page) its thread woken to retry.
void Installer::ZeroFillOutside(uint64_t address) {
  int64_t done = 0;
  int err = Zero(address, 4096, &done);
  if (err == EAGAIN) {
    deferredZeroFills_.push_back({address, 4096});
  } else if (err == EINVAL) {
    int cont = Continue(address, 4096, 4096, /*mayWait=*/false);
    if (cont && cont != EEXIST && cont != ENOENT) Wake(address, 4096);
  } else if (err && err != ENOENT) {
    Wake(address, 4096);
  }
}

bool Installer::HasDeferred() {
  if (!deferredZeroFills_.empty() || !deferredContinues_.empty()) return true;
  std::lock_guard<std::mutex> lock(deferredContinuesMu_);
  return !lateContinues_.empty();
}

void Installer::RetryDeferred() {
  std::vector<std::pair<uint64_t, uint64_t>> again;
  again.swap(deferredZeroFills_);
  for (auto& [address, pageSize] : again) ZeroFillGivenBack(address, pageSize);
  // MINOR mode: cached pages whose mapping met a layout change (EAGAIN), here or on a receiver.
  {
    std::lock_guard<std::mutex> lock(deferredContinuesMu_);
    deferredContinues_.insert(deferredContinues_.end(), lateContinues_.begin(), lateContinues_.end());
    lateContinues_.clear();
  }
  std::vector<std::pair<uint64_t, uint64_t>> continues;
  continues.swap(deferredContinues_);
  for (auto& [address, length] : continues) {
    uint64_t page = 0;
    TargetRegion* r = map_.RegionAt(address, &page);
    int err = Continue(address, length, r ? r->pageSize : 4096, /*mayWait=*/false);
    if (err == EAGAIN) deferredContinues_.push_back({address, length});
  }
}

void Installer::GiveBack(uint64_t start, uint64_t end) {
  for (auto& r : map_.regions())
    for (const auto& x : r->Pieces()) {
      uint64_t lo = std::max(start, x.address), hi = std::min(end, x.address + x.pages * r->pageSize);
      if (lo >= hi) continue;
      uint64_t first = (lo - x.address + r->pageSize - 1) / r->pageSize, last = (hi - x.address) / r->pageSize;  // within the piece
      uint64_t settled = 0;
      for (uint64_t p = x.first + first; p < x.first + last; p++) {
        if (!r->removed->Claim(p)) continue;
        stats_.removedPages++;
        r->faultNs->Take(p);
        if (r->settled->Claim(p)) settled++;
      }
      map_.Settle(settled, MonotonicNs());
      // A thread may be waiting on one of these pages for data that will now
      // never be installed: wake it, and its retried fault is zero-filled.
      if (last > first) Wake(x.address + first * r->pageSize, (last - first) * r->pageSize);
    }
}

// Waits (briefly) until the fault thread has applied every memory event it
// read. An install that found nothing mapped (ENOENT) after a move was read
// but before it was applied would otherwise take the page for unmapped.
// False when it cannot tell (on the fault thread itself, or stopping).
bool Installer::LayoutSettled() {
  LayoutGate& gate = map_.layout;
  if (LayoutGate::onFaultThread) return gate.unapplied.load() == 0;
  for (int tries = 0; gate.reading.load() || gate.unapplied.load() > 0; tries++) {
    if (Leaving() || tries >= 20000) return false;  // at most ~1 s
    timespec ts{0, 50000};
    nanosleep(&ts, nullptr);
  }
  return true;
}

// Gives up on every page not resident and not given back: UFFDIO_POISON makes
// a touch raise SIGBUS instead of waiting forever or reading zeros; threads
// waiting on them are woken into that SIGBUS once all are poisoned.
uint64_t Installer::PoisonMissing(int* firstError) {
  uint64_t poisoned = 0;
  *firstError = 0;
  for (auto& r : map_.regions()) {
    for (uint64_t p = r->settled->NextClear(0); p < r->pages && *firstError != ESRCH; p = r->settled->NextClear(p)) {
      uint64_t run = 0;
      uint64_t base = r->AddressOf(p, &run) - p * r->pageSize;  // of this piece: pages up to p+run lie contiguous
      uint64_t q = p + 1;
      while (q < r->pages && q < p + run && !r->settled->Test(q)) q++;
      // ESRCH: the process died (most likely of the SIGBUS just raised); other
      // errors (a page it unmapped) skip that page and go on with the rest.
      while (p < q) {
        uint64_t done = 0;  // pages poisoned from p on
        int err = Poison(base + p * r->pageSize, (q - p) * r->pageSize, r->pageSize, &done);
        for (uint64_t k = p; k < p + done; k++)
          if (r->settled->Claim(k)) poisoned++;
        if (!err) break;
        if (!*firstError) *firstError = err;
        if (err == ESRCH) break;
        p += done + 1;
      }
      p = q;
    }
  }
  // Every missing page is poisoned before any waiting thread wakes (into
  // its SIGBUS), so a guest that survives one SIGBUS finds no page to hang on.
  for (auto& r : map_.regions())
    for (const auto& x : r->Pieces()) Wake(x.address, x.pages * r->pageSize);
  stats_.poisonedPages += poisoned;
  return poisoned;
}

// Poisons [address, address+length); pages that turn out to be present
// (EEXIST: installed meanwhile) are stepped over. 0 or an errno; `*pages`
// counts the pages poisoned (or found present) before it stopped.
int Installer::Poison(uint64_t address, uint64_t length, uint64_t pageSize, uint64_t* pages) {
  uint64_t start = address, end = address + length;
  int retries = 0, err = 0;
  while (address < end) {
    uffdio_poison z{{address, end - address}, UFFDIO_POISON_MODE_DONTWAKE, 0};
    if (ioctl(uffd_, UFFDIO_POISON, &z) == 0) {
      address = end;
      break;
    }
    err = errno;
    if (z.updated > 0) address += static_cast<uint64_t>(z.updated);
    if (err == EAGAIN && ++retries < 1000) {  // the layout is changing: look again shortly
      timespec ts{0, 100000};
      nanosleep(&ts, nullptr);
      continue;
    }
    if (err != EEXIST) break;
    address += pageSize;
    err = 0;
  }
  *pages = (address - start) / pageSize;
  return address < end ? err : 0;
}

void Installer::WaitIdle() const {
  for (int i = 0; installing_.load() != 0 && i < 10000; i++) {
    timespec ts{0, 100000};
    nanosleep(&ts, nullptr);
  }
}

int Installer::Copy(uint64_t dst, const uint8_t* src, uint64_t len, int64_t* done) {
  uffdio_copy c{dst, reinterpret_cast<uint64_t>(src), len, 0, 0};
  if (ioctl(uffd_, UFFDIO_COPY, &c) == 0) {
    *done = static_cast<int64_t>(len);
    return 0;
  }
  *done = c.copy;
  return errno;
}

namespace {
// The installing thread's huge page to fill: 2 MiB aligned, madvised for THP,
// empty again after each move (a move that stopped part way leaves it split: it
// is unmapped then, and the next one maps a fresh one).
struct HugeStage {
  uint8_t* at = nullptr;
  void* mapped = nullptr;
  ~HugeStage() { Drop(); }
  uint8_t* Get() {
    if (at) return at;
    mapped = mmap(nullptr, 2 * Installer::kHugeBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mapped == MAP_FAILED) {
      mapped = nullptr;
      return nullptr;
    }
    at = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(mapped) + Installer::kHugeBytes - 1) & ~(Installer::kHugeBytes - 1));
    madvise(at, Installer::kHugeBytes, MADV_HUGEPAGE);
    return at;
  }
  void Drop() {
    if (mapped) munmap(mapped, 2 * Installer::kHugeBytes);
    at = nullptr;
    mapped = nullptr;
  }
};
thread_local HugeStage hugeStage;
}  // namespace

// Moves 2 MiB from `src` to `dst` (aligned, all missing) as one huge page.
// 0, or an errno with `*done` the bytes that did go in (EEXIST: the page past
// them was there first; the rest is the caller's to copy).
int Installer::MoveHuge(uint64_t dst, const uint8_t* src, int64_t* done) {
  uint8_t* stage = hugeStage.Get();
  *done = 0;
  if (!stage) return ENOMEM;
  std::memcpy(stage, src, Installer::kHugeBytes);
  uffdio_move m{dst, reinterpret_cast<uint64_t>(stage), Installer::kHugeBytes, 0, 0};
  if (ioctl(uffd_, UFFDIO_MOVE, &m) == 0) {
    *done = static_cast<int64_t>(Installer::kHugeBytes);
    return 0;
  }
  int err = errno;
  *done = m.move > 0 ? m.move : 0;
  hugeStage.Drop();  // split, or part of it still here: a fresh one next time
  return err;
}

int Installer::Zero(uint64_t dst, uint64_t len, int64_t* done) {
  if (!zeroFallback_.load(std::memory_order_relaxed)) {
    uffdio_zeropage z{{dst, len}, 0, 0};
    if (ioctl(uffd_, UFFDIO_ZEROPAGE, &z) == 0) {
      *done = static_cast<int64_t>(len);
      return 0;
    }
    if (errno != EINVAL) {
      *done = z.zeropage;
      return errno;
    }
    zeroFallback_.store(true);  // hugetlbfs has no ZEROPAGE: copy zeros instead
  }
  return Copy(dst, zeros_, len, done);  // runs never exceed the map's maxRunBytes()
}

}  // namespace uffdpc
