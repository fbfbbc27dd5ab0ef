#include "fault_loop.h"

#include <poll.h>
#include <unistd.h>

#include "io.h"

namespace uffdpc {

void FaultLoop::Start(int stopFd, int cpu) {
  life_.Spawn("pc-fault", cpu, [this, stopFd] { Run(stopFd); });
}

void FaultLoop::Run(int stopFd) {
  LayoutGate::onFaultThread = true;
  LayoutGate& layout = map_.layout;
  uffd_msg msgs[64];
  // A template's filler has no userfaultfd (-1: poll() skips it), nor do parts without work for this thread.
  constexpr size_t kFixed = 2, kMaxWork = 2;
  pollfd fds[kFixed + kMaxWork] = {{uffd_, POLLIN, 0}, {stopFd, POLLIN, 0}, {-1, POLLIN, 0}, {-1, POLLIN, 0}};
  for (size_t i = 0; i < work_.size() && i < kMaxWork; i++) fds[kFixed + i].fd = work_[i]->WakeFd();
  while (true) {
    int ready = poll(fds, kFixed + kMaxWork, installer_.HasDeferred() ? 1 : -1);
    if (ready == 0) {
      installer_.RetryDeferred();
      continue;
    }
    if (ready < 0 && errno == EINTR) continue;
    if (ready < 0 || (fds[1].revents & POLLIN)) return;
    for (size_t i = 0; i < work_.size() && i < kMaxWork; i++)
      if (fds[kFixed + i].revents & POLLIN) work_[i]->OnWake();
    if (!(fds[0].revents & (POLLIN | POLLERR | POLLHUP))) continue;
    if (fds[0].revents & (POLLERR | POLLHUP)) {  // the process owning the memory is gone
      events_.Emit({"uffd-closed", "", "", "the userfaultfd was hung up"});
      return;
    }
    // Memory events read here are counted before anyone can see their effect (see Installer::LayoutSettled).
    layout.reading.store(true);
    ssize_t n = read(uffd_, msgs, sizeof msgs);
    int readErr = errno;
    for (ssize_t i = 0; i < n / static_cast<ssize_t>(sizeof(uffd_msg)); i++)
      if (msgs[i].event != UFFD_EVENT_PAGEFAULT) layout.unapplied.fetch_add(1);
    layout.reading.store(false);
    errno = readErr;
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    if (n <= 0) {
      events_.Emit(ErrnoEvent("uffd-closed", "", n < 0 ? errno : 0, "read", "reading the userfaultfd failed"));
      return;
    }
    uint64_t now = MonotonicNs();
    for (size_t i = 0; i < static_cast<size_t>(n) / sizeof(uffd_msg); i++) {
      const uffd_msg& m = msgs[i];
      if (m.event == UFFD_EVENT_PAGEFAULT) {
        OnFault(m.arg.pagefault.address, now);
      } else {
        OnMemoryEvent(m);
        layout.unapplied.fetch_sub(1);
      }
    }
    if (installer_.HasDeferred()) installer_.RetryDeferred();
    supply_->Flush();
  }
}

void FaultLoop::OnFault(uint64_t address, uint64_t now) {
  stats_.faults++;
  uint64_t page = 0;
  TargetRegion* found = map_.RegionAt(address, &page);
  if (!found) {
    // Memory the process added to a registered mapping (mremap grew it) holds no image page: it reads as a fresh mapping's, zeros.
    stats_.unexpected++;
    events_.Emit({"unexpected-fault", "", "", "a fault outside every known region: zero-filled", 0, {{"address", double(address)}}});
    installer_.ZeroFillOutside(address & ~uint64_t(4095));
    return;
  }
  TargetRegion& r = *found;
  uint64_t pageAddress = r.AddressOf(page);
  if (r.removed->Test(page)) {  // given back earlier: it reads as zeros, the source is not asked
    installer_.ZeroFillGivenBack(pageAddress, r.pageSize);
    return;
  }
  // Asked for before looking whether it is there: an installer that puts it
  // in the page cache after this look sees the request and maps it (MINOR).
  bool firstAsk = r.requested->Claim(page);
  if (r.Minor() ? r.InCache(page) : r.received->Test(page)) return installer_.ServeResident(r, pageAddress, now);
  r.waiters->At(page).fetch_add(1, std::memory_order_relaxed);
  uint64_t expected = 0;
  r.faultNs->At(page).compare_exchange_strong(expected, now, std::memory_order_acq_rel);
  if (!firstAsk) return;  // asked for already: this thread waits with the others
  if (recordFaults_) {
    std::lock_guard<std::mutex> lock(recordMu_);
    faulted_.push_back((uint64_t(r.sourceRegion) << 48) | r.SourceOf(page));
  }
  supply_->Ask(r, page);
}

void FaultLoop::OnMemoryEvent(const uffd_msg& m) {
  stats_.memoryEvents++;
  switch (m.event) {
    case UFFD_EVENT_REMOVE:
      // A clone's memory given back reads as the template's file again: its next touch is a MINOR fault.
      if (removeGivesBack_) installer_.GiveBack(m.arg.remove.start, m.arg.remove.end);
      events_.Emit({"remove", "", "", "", 0, {{"start", double(m.arg.remove.start)}, {"end", double(m.arg.remove.end)}}});
      break;
    case UFFD_EVENT_UNMAP:
      installer_.GiveBack(m.arg.remove.start, m.arg.remove.end);
      events_.Emit({"unmap", "", "", "", 0, {{"start", double(m.arg.remove.start)}, {"end", double(m.arg.remove.end)}}});
      break;
    case UFFD_EVENT_REMAP: {
      // Memory moved (mremap): a whole region, or part of one (it is then served in pieces), is followed.
      bool followed = false;
      for (auto& r : map_.regions()) followed |= r->Move(m.arg.remap.from, m.arg.remap.to, m.arg.remap.len);
      events_.Emit(
          {"remap",
           "",
           "",
           followed ? "" : "memory that holds no region moved",
           0,
           {{"from", double(m.arg.remap.from)}, {"to", double(m.arg.remap.to)}, {"length", double(m.arg.remap.len)}, {"followed", followed ? 1.0 : 0.0}}});
      break;
    }
    case UFFD_EVENT_FORK:
      events_.Emit({"fork", "", "", "", 0, {{"fd", double(m.arg.fork.ufd)}}});
      break;
    default:
      events_.Emit({"unknown-event", "", "", "", 0, {{"event", double(m.event)}}});
  }
}

}  // namespace uffdpc
