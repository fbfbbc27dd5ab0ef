// FdWatcher: waits for many fds to become readable on one native thread
// (epoll), never on the libuv thread pool, so any number of idle peers (a VMM
// that connected but says nothing) cannot starve other work. JS asks
// watch(fd, timeoutMs, id) and is called back once with {id, ready}; the fd is
// then read on the JS thread without blocking (receiveNow).
#include <sys/epoll.h>
#include <unistd.h>

#include <chrono>
#include <map>
#include <mutex>
#include <vector>

#include "addon.h"
#include "data_plane.h"
#include "errors.h"

namespace uffdpc {
namespace {

class FdWatcher : public Napi::ObjectWrap<FdWatcher>, DataPlane {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "FdWatcher",
                       {InstanceMethod<&FdWatcher::Watch>("watch"), InstanceMethod<&FdWatcher::Cancel>("cancel"), InstanceMethod<&FdWatcher::Close>("close")});
  }

  // new FdWatcher(onOutcome: ({id, ready}) => void)
  explicit FdWatcher(const Napi::CallbackInfo& info) : Napi::ObjectWrap<FdWatcher>(info) {
    epoll_ = epoll_create1(EPOLL_CLOEXEC);
    if (epoll_ < 0) ThrowErrno(info.Env(), errno, "epoll_create1");
    OwnFd(epoll_);
    OpenPlane(info.Env(), info[0].As<Napi::Function>(), "FdWatcher");
    epoll_event ev{EPOLLIN, {.u64 = kWakeKey}};
    epoll_ctl(epoll_, EPOLL_CTL_ADD, WakeFd(), &ev);
    events_.KeepAliveOnlyWhileOwed(info.Env());  // an idle watcher keeps nobody alive
    Spawn("fd-watcher", -1, [this] { Loop(); });
  }

  ~FdWatcher() override { Shutdown(); }

 private:
  static constexpr uint64_t kWakeKey = ~0ull;

  // watch(fd, timeoutMs, id): one callback when fd is readable (or hung up), or ready: false after timeoutMs (-1: never).
  Napi::Value Watch(const Napi::CallbackInfo& info) {
    int fd = info[0].As<Napi::Number>().Int32Value();
    int timeoutMs = info[1].As<Napi::Number>().Int32Value();
    double id = info[2].As<Napi::Number>().DoubleValue();
    if (Stopped()) throw CodedError(info.Env(), "ERR_ENGINE_STATE", "the watcher is closed");
    {
      std::lock_guard<std::mutex> lock(mu_);
      uint64_t key = nextKey_++;
      auto deadline = timeoutMs < 0 ? Clock::time_point::max() : Clock::now() + std::chrono::milliseconds(timeoutMs);
      epoll_event ev{EPOLLIN | EPOLLRDHUP | EPOLLONESHOT, {.u64 = key}};
      if (epoll_ctl(epoll_, EPOLL_CTL_ADD, fd, &ev) != 0) ThrowErrno(info.Env(), errno, "epoll_ctl");
      watched_[key] = {fd, id, deadline};
    }
    events_.Owe(info.Env());
    Wake();  // a new deadline may be the nearest
    return info.Env().Undefined();
  }

  // cancel(id): stops watching (call it before the fd is closed); no callback follows.
  Napi::Value Cancel(const Napi::CallbackInfo& info) {
    double id = info[0].As<Napi::Number>().DoubleValue();
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = watched_.begin(); it != watched_.end(); ++it) {
      if (it->second.id != id) continue;
      epoll_ctl(epoll_, EPOLL_CTL_DEL, it->second.fd, nullptr);
      watched_.erase(it);
      events_.Forgive(info.Env());
      break;
    }
    return info.Env().Undefined();
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    Shutdown();
    return info.Env().Undefined();
  }

  using Clock = std::chrono::steady_clock;
  struct Watched {
    int fd;
    double id;
    Clock::time_point deadline;
  };

  void Loop() {
    epoll_event events[64];
    while (!Stopping()) {
      int timeout = -1;
      {
        std::lock_guard<std::mutex> lock(mu_);
        auto now = Clock::now();
        for (auto& [key, w] : watched_) {
          if (w.deadline == Clock::time_point::max()) continue;
          long ms = std::chrono::duration_cast<std::chrono::milliseconds>(w.deadline - now).count() + 1;
          if (ms < 0) ms = 0;
          if (timeout < 0 || ms < timeout) timeout = static_cast<int>(ms);
        }
      }
      int n = epoll_wait(epoll_, events, 64, timeout);
      if (n < 0 && errno != EINTR) return;
      std::vector<std::pair<double, bool>> outcomes;  // id, ready
      {
        std::lock_guard<std::mutex> lock(mu_);
        for (int i = 0; i < n; i++) {
          uint64_t key = events[i].data.u64;
          if (key == kWakeKey) {
            ClearWake();
            continue;
          }
          auto it = watched_.find(key);
          if (it == watched_.end()) continue;
          epoll_ctl(epoll_, EPOLL_CTL_DEL, it->second.fd, nullptr);
          outcomes.push_back({it->second.id, true});
          watched_.erase(it);
        }
        auto now = Clock::now();
        for (auto it = watched_.begin(); it != watched_.end();) {
          if (it->second.deadline > now) {
            ++it;
            continue;
          }
          epoll_ctl(epoll_, EPOLL_CTL_DEL, it->second.fd, nullptr);
          outcomes.push_back({it->second.id, false});
          it = watched_.erase(it);
        }
      }
      for (auto [id, ready] : outcomes) {
        NativeEvent e{"outcome", "", "", "", 0, {{"id", id}}};
        e.flags = {{"ready", ready}};
        e.settles = true;  // an idle watcher stops keeping the process alive
        events_.Emit(std::move(e));
      }
    }
  }

  int epoll_ = -1;
  std::mutex mu_;
  std::map<uint64_t, Watched> watched_;
  uint64_t nextKey_ = 1;
};

}  // namespace

void InitFdWatcher(Napi::Env env, Napi::Object exports) { exports.Set("FdWatcher", FdWatcher::Define(env)); }

}  // namespace uffdpc
