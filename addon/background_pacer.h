// The background stream's share of a network link. A page a fault asked for
// goes out on the urgent connection, but over the same link as the bulk
// connection: on a link slower than the machine, every byte of background
// queued at the bottleneck ahead of it (the sender's qdisc, a switch port)
// makes the fault wait. The pacer keeps the bulk connection's bytes not yet
// acknowledged near what the link holds with no queue, delay-based as LEDBAT
// (RFC 6817) is: its window grows while the connection's smoothed round trip
// stays within a target above the lowest round trip seen, and shrinks in
// proportion as it rises beyond. The target is that lowest round trip itself
// (the link's unloaded delay, never under kMinTargetUs): a requested page then
// waits behind at most about one unloaded round trip of background, whatever
// the link's rate or delay, and the background still fills what demand leaves.
// Nothing to tune: the kernel gives every figure for the bulk socket
// (TCP_INFO's round trips and bytes acknowledged, SIOCOUTQ's bytes held).
// Only TCP to another host or namespace is paced: a unix socket or loopback
// has no link to share (Needed()).
#pragma once
#include <arpa/inet.h>
#include <linux/sockios.h>
#include <linux/tcp.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstddef>
#include <cstring>
#include <functional>

#include "io.h"

namespace uffdpc {

class BackgroundPacer {
 public:
  // The figures the source reports (stats): the window now, the lowest and
  // the smoothed round trip last seen, and how often and how long it waited.
  struct Figures {
    uint64_t windowBytes = 0, minRttUs = 0, rttUs = 0, waits = 0, waitNs = 0;
  };

  // Whether `fd` crosses a link: TCP whose peer is not a loopback address.
  static bool Needed(int fd) {
    sockaddr_storage peer{};
    socklen_t len = sizeof peer;
    if (getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &len) != 0) return false;
    if (peer.ss_family == AF_INET) {
      uint32_t a = ntohl(reinterpret_cast<sockaddr_in*>(&peer)->sin_addr.s_addr);
      return (a >> 24) != 127;
    }
    if (peer.ss_family == AF_INET6) {
      const in6_addr& a = reinterpret_cast<sockaddr_in6*>(&peer)->sin6_addr;
      if (IN6_IS_ADDR_LOOPBACK(&a)) return false;
      if (IN6_IS_ADDR_V4MAPPED(&a)) return a.s6_addr[12] != 127;
      return true;
    }
    return false;  // a unix socket
  }

  // demandAt: when demand last came (MonotonicNs of the last request; 0: never).
  BackgroundPacer(int fd, std::function<bool()> stopping, const std::atomic<uint64_t>* demandAt)
      : fd_(fd), stopping_(std::move(stopping)), demandAt_(demandAt) {
    tcp_info info{};
    if (Sample(&info)) ackedBefore_ = info.tcpi_bytes_acked;
  }

  // On the thread that writes, before its first write: its timer slack made
  // fine, so a wait of tens of microseconds is not stretched to the default 50.
  void WriteFromThisThread() { prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0); }

  // Writes every byte of iov[0..count) in slices that fit the window,
  // waiting for acknowledgements between them. 0 or an errno.
  int WritevFull(iovec* iov, int count) {
    while (count > 0) {
      size_t room = WaitForRoom();
      if (stopping_()) return EPIPE;
      // One slice: at most `room` bytes of the iovecs, advanced in place.
      iovec slice[kSliceIovecs];
      int n = 0;
      size_t bytes = 0;
      for (int i = 0; i < count && n < kSliceIovecs && bytes < room; i++, n++) {
        slice[n] = iov[i];
        if (bytes + slice[n].iov_len > room) slice[n].iov_len = room - bytes;
        bytes += slice[n].iov_len;
      }
      if (int err = uffdpc::WritevFull(fd_, slice, n)) return err;
      AdvanceIovecs(iov, count, bytes);
    }
    return 0;
  }

  // The fastest delivery measured so far, bytes a second (0: none yet). The writing thread's.
  double LinkBytesPerSecond() const { return maxRate_; }

  // The window in force now (the writing thread's). While faults are being
  // served, the delay-based one; while none are, at least a millisecond of
  // the link at its fastest, so the thread wakes far less often (the first
  // fault after a quiet spell may wait that millisecond; the rest do not).
  size_t WindowNow(uint64_t now) const {
    if (DemandActive(now)) return static_cast<size_t>(window_);
    return static_cast<size_t>(std::max(window_, maxRate_ * kQuietQueueNs / 1e9));
  }

  // (any thread)
  Figures figures() const {
    return {windowBytes_.load(std::memory_order_relaxed), minRttUs_.load(std::memory_order_relaxed), rttUs_.load(std::memory_order_relaxed),
            waits_.load(std::memory_order_relaxed), waitNs_.load(std::memory_order_relaxed)};
  }

 private:
  // Large enough that the first 10 ms show what the path can carry (the floor
  // below is learnt from them); the delay-based rule brings it down within a
  // few round trips where a link's queue is what it fills.
  static constexpr double kInitialWindow = 256 << 10;
  static constexpr double kMinWindow = 12 << 10;         // three pages: enough to keep acknowledgements coming
  static constexpr double kMaxWindow = 8 << 20;          // the bulk socket's send buffer
  static constexpr size_t kMinSlice = 4 << 10;           // one page: a smaller slice costs a syscall for little
  static constexpr uint32_t kMinTargetUs = 75;           // below this a round trip is the hosts' own scheduling noise (README: 50 cost the background)
  static constexpr uint64_t kRateIntervalNs = 10000000;  // the delivery rate is measured over this much time
  static constexpr uint64_t kDemandActiveNs = 2000000;   // a request this recent means faults are being served
  static constexpr uint64_t kMinSleepNs = 5000;
  static constexpr double kQuietQueueNs = 1e6;         // the link time the window may hold while no fault is served
  static constexpr uint64_t kMaxWaitNs = 1000000;      // re-read the socket at least every millisecond
  static constexpr uint64_t kMaxOversleepNs = 200000;  // a sleep later than this is a stall, not the timer's lateness
  static constexpr int kSliceIovecs = 64;

  bool Sample(tcp_info* info) {
    socklen_t len = sizeof *info;
    return getsockopt(fd_, IPPROTO_TCP, TCP_INFO, info, &len) == 0 && len >= offsetof(tcp_info, tcpi_delivery_rate) + sizeof info->tcpi_delivery_rate;
  }

  // The window, moved by what was acknowledged since the last look.
  void Update(const tcp_info& info) {
    uint64_t acked = info.tcpi_bytes_acked - ackedBefore_;
    ackedBefore_ = info.tcpi_bytes_acked;
    minRttUs_.store(info.tcpi_min_rtt, std::memory_order_relaxed);
    rttUs_.store(info.tcpi_rtt, std::memory_order_relaxed);
    if (acked == 0 || info.tcpi_min_rtt == 0) return;
    double target = std::max<uint32_t>(info.tcpi_min_rtt, kMinTargetUs);
    double queued = info.tcpi_rtt > info.tcpi_min_rtt ? info.tcpi_rtt - info.tcpi_min_rtt : 0;
    double offTarget = std::clamp((target - queued) / target, -1.0, 1.0);
    // Grow only while the window was what held the stream back.
    if (offTarget > 0 && !windowLimited_) return;
    // Never below what the fastest delivery seen carries in one target delay:
    // where the path is slowed by the hosts' CPUs rather than by a link's
    // queue, the round trip rises as much, but demand does not wait behind it.
    // (Measured over 10 ms at least: the kernel's own per-ack estimate also
    // sees bursts a token bucket lets through at memory speed.)
    uint64_t now = MonotonicNs();
    if (rateSince_ == 0) {
      rateSince_ = now;
      rateAckedSince_ = info.tcpi_bytes_acked;
    } else if (now - rateSince_ >= kRateIntervalNs) {
      maxRate_ = std::max(maxRate_, static_cast<double>(info.tcpi_bytes_acked - rateAckedSince_) * 1e9 / static_cast<double>(now - rateSince_));
      rateSince_ = now;
      rateAckedSince_ = info.tcpi_bytes_acked;
    }
    double floor = std::max(kMinWindow, maxRate_ * target / 1e6);
    window_ = std::clamp(window_ + offTarget * static_cast<double>(acked), floor, kMaxWindow);
    windowBytes_.store(static_cast<uint64_t>(window_), std::memory_order_relaxed);
    windowLimited_ = false;
  }

  // Bytes the socket holds: not sent yet, and sent but not acknowledged.
  size_t Held() {
    int held = 0;
    if (ioctl(fd_, SIOCOUTQ, &held) != 0 || held < 0) return 0;
    return static_cast<size_t>(held);
  }

  // Waits until at least a slice fits the window (or stopping); the room.
  size_t WaitForRoom() {
    uint64_t since = 0;  // when the wait began (0: no wait yet)
    for (;;) {
      tcp_info info{};
      if (!Sample(&info)) return SIZE_MAX;  // not TCP after all: write unpaced
      Update(info);
      size_t held = Held();
      size_t window = WindowNow(MonotonicNs());
      // Written again once a quarter of the window is free (a page at
      // least): fewer, larger writes and fewer wakeups for the same queue.
      size_t slice = std::max(kMinSlice, window / 4);
      if (held + slice <= window || held == 0) {
        if (since) {
          waits_.fetch_add(1, std::memory_order_relaxed);
          waitNs_.fetch_add(MonotonicNs() - since, std::memory_order_relaxed);
        }
        return std::max(window > held ? window - held : 0, kMinSlice);
      }
      windowLimited_ = true;
      if (stopping_()) return 0;
      uint64_t t0 = MonotonicNs();
      if (!since) since = t0;
      // About the time the link takes to drain what is over the window.
      double rate = info.tcpi_delivery_rate > 0 ? static_cast<double>(info.tcpi_delivery_rate) : 125e6;
      uint64_t ns = static_cast<uint64_t>(static_cast<double>(held + slice - window) / rate * 1e9);
      if (ns <= oversleepNs_ && DemandActive(t0)) {
        // Sooner than a sleep would wake, while faults are being served:
        // look again at once (a sleep would leave the link idle under them).
        // With no demand the thread sleeps, and the link may idle a little.
        CpuRelax();
        continue;
      }
      // Wake a sleep's usual lateness early, so the link does not run dry.
      uint64_t sleep = std::min(ns > oversleepNs_ + kMinSleepNs ? ns - oversleepNs_ : kMinSleepNs, kMaxWaitNs);
      timespec ts{0, static_cast<long>(sleep)};
      nanosleep(&ts, nullptr);
      uint64_t slept = MonotonicNs() - t0;
      uint64_t late = slept > sleep ? slept - sleep : 0;
      oversleepNs_ = (oversleepNs_ * 7 + std::min(late, kMaxOversleepNs)) / 8;
    }
  }

  bool DemandActive(uint64_t now) const {
    uint64_t at = demandAt_ ? demandAt_->load(std::memory_order_relaxed) : 0;
    return at != 0 && now - at < kDemandActiveNs;
  }

  static void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }

  int fd_;
  std::function<bool()> stopping_;
  const std::atomic<uint64_t>* demandAt_;
  double window_ = kInitialWindow;
  double maxRate_ = 0;  // bytes a second: the fastest delivery over kRateIntervalNs seen on the bulk connection
  uint64_t rateSince_ = 0, rateAckedSince_ = 0;
  uint64_t oversleepNs_ = 30000;  // how late a sleep wakes here, on average (kept as it is measured)
  bool windowLimited_ = false;
  uint64_t ackedBefore_ = 0;
  std::atomic<uint64_t> windowBytes_{static_cast<uint64_t>(kInitialWindow)}, minRttUs_{0}, rttUs_{0}, waits_{0}, waitNs_{0};
};

}  // namespace uffdpc
