// The destination engine's life as its parts see it. The engine is a
// DataPlane (data_plane.h): one stop flag, threads joined and condition
// variables woken at its ordered shutdown. Its parts (fault_loop.h, the
// supplies, installer.h) start their long-lived threads through it and test
// whether to go on, never holding the engine itself.
#pragma once
#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>

namespace uffdpc {

class EngineLife {
 public:
  virtual bool Stopping() const = 0;
  // A thread joined at shutdown (after the stop flag is set and the waiters are woken).
  virtual void Spawn(const char* name, int cpu, std::function<void()> body) = 0;
  // `cv` is notified under `mu` at shutdown; its waiters test Stopping() in their predicate.
  virtual void WakeOnStop(std::mutex& mu, std::condition_variable& cv) = 0;
  // Closed at shutdown, once every thread is joined (or when the engine could not be built); negative: ignored.
  virtual void OwnFd(int fd) = 0;

  // True once a thread must go without a word: the engine is stopping, or its
  // data channels are being detached (a receiver's read fails on purpose).
  bool Leaving() const { return Stopping() || detaching.load(); }
  std::atomic<bool> detaching{false};  // written by the remote supply around a detach

 protected:
  ~EngineLife() = default;
};

}  // namespace uffdpc
