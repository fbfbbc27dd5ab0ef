// The life of a native object that runs data-plane threads (the page server's
// session, the QEMU stream, the fd watcher, the fault engine), written once:
// a stop flag, a wake eventfd, the event sink (events.h), its threads, the
// sockets and fds it owns, and one ordered shutdown:
//
//   BeforeStop()         the owner's own first step (e.g. detach its channels)
//   stop flag            Stopping() is true from here on
//   wake                 the eventfd becomes readable; every waiter registered
//                        with WakeOnStop() is notified (under its mutex)
//   shut sockets         blocked reads and writes return
//   join threads
//   close fds
//   ReleaseReferences()  the owner lets go of JS objects (pinned mappings)
//   close events         the sink's last delivery is queued
//
// All on the JS thread, once: Shutdown() again returns at once. A derived
// class calls Shutdown() from its own destructor (hooks cannot run from this
// one); the base's destructor does the steps without hooks, for a derived
// constructor that threw after OpenPlane().
#pragma once
#include <napi.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "events.h"

namespace uffdpc {

class DataPlane {
 public:
  DataPlane(const DataPlane&) = delete;
  DataPlane& operator=(const DataPlane&) = delete;
  virtual ~DataPlane() { StopPlane(false); }

 protected:
  DataPlane() = default;

  // In the owner's constructor (JS thread): the wake eventfd and the event
  // sink. Throws like Node (errno, syscall) when the eventfd cannot be made.
  void OpenPlane(Napi::Env env, Napi::Function onEvent, const char* name);

  // Starts a named thread (pinned to `cpu` unless it is negative), joined at
  // shutdown. Names starting "pc-" count as the data plane's CPU in the bench.
  void Spawn(const char* name, int cpu, std::function<void()> body);
  // Shut down (SHUT_RDWR) when stopping, closed once the threads are joined; negative: ignored.
  void OwnSocket(int fd);
  // Closed once the threads are joined; negative: ignored.
  void OwnFd(int fd);
  // `cv` is notified under `mu` when stopping; its waiters test Stopping() in their predicate.
  void WakeOnStop(std::mutex& mu, std::condition_variable& cv) { waiters_.push_back({&mu, &cv}); }

  bool Stopping() const { return stop_.load(std::memory_order_acquire); }
  // Shutdown() has run (JS thread).
  bool Stopped() const { return stopped_; }
  // For poll()/epoll: readable from stop on, and after Wake(). The stop flag
  // is the truth; a loop that reads the fd (ClearWake) tests Stopping() after.
  int WakeFd() const { return wakeFd_; }
  void Wake();
  void ClearWake();

  // The ordered shutdown above (JS thread).
  void Shutdown() { StopPlane(true); }
  virtual void BeforeStop() {}
  virtual void ReleaseReferences() {}

  EventSink events_;

 private:
  void StopPlane(bool hooks);

  std::atomic<bool> stop_{false};
  bool stopped_ = false;
  int wakeFd_ = -1;
  std::vector<std::thread> threads_;
  std::vector<int> sockets_, fds_;
  std::vector<std::pair<std::mutex*, std::condition_variable*>> waiters_;
};

}  // namespace uffdpc
