// FdWatcher: waits for many fds to become readable on one native thread
// (epoll), never on the libuv thread pool, so any number of idle peers (a VMM
// that connected but says nothing) cannot starve other work. JS asks
// watch(fd, timeoutMs, id) and is called back once with {id, ready}; the fd is
// then read on the JS thread without blocking (receiveNow).
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "addon.h"
#include "errors.h"

namespace uffdpc {
namespace {

constexpr size_t kMaxFds = 253;  // SCM_MAX_FD

class FdWatcher;
struct Outcome {
  FdWatcher* watcher;
  double id;
  bool ready;
};

class FdWatcher : public Napi::ObjectWrap<FdWatcher> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "FdWatcher",
                       {InstanceMethod<&FdWatcher::Watch>("watch"), InstanceMethod<&FdWatcher::Cancel>("cancel"), InstanceMethod<&FdWatcher::Close>("close")});
  }

  // new FdWatcher(onOutcome: ({id, ready}) => void)
  explicit FdWatcher(const Napi::CallbackInfo& info) : Napi::ObjectWrap<FdWatcher>(info) {
    epoll_ = epoll_create1(EPOLL_CLOEXEC);
    if (epoll_ < 0) ThrowErrno(info.Env(), errno, "epoll_create1");
    wake_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wake_ < 0) {
      int err = errno;
      close(epoll_);
      ThrowErrno(info.Env(), err, "eventfd");
    }
    epoll_event ev{EPOLLIN, {.u64 = kWakeKey}};
    epoll_ctl(epoll_, EPOLL_CTL_ADD, wake_, &ev);
    tsfn_ = Napi::ThreadSafeFunction::New(info.Env(), info[0].As<Napi::Function>(), "FdWatcher", 0, 1);
    tsfn_.Unref(info.Env());  // an idle watcher keeps nobody alive
    thread_ = std::thread([this] { Loop(); });
  }

  ~FdWatcher() override { Shutdown(); }

 private:
  static constexpr uint64_t kWakeKey = ~0ull;

  // watch(fd, timeoutMs, id): one callback when fd is readable (or hung up), or ready: false after timeoutMs (-1: never).
  Napi::Value Watch(const Napi::CallbackInfo& info) {
    int fd = info[0].As<Napi::Number>().Int32Value();
    int timeoutMs = info[1].As<Napi::Number>().Int32Value();
    double id = info[2].As<Napi::Number>().DoubleValue();
    if (closed_) throw CodedError(info.Env(), "ERR_ENGINE_STATE", "the watcher is closed");
    {
      std::lock_guard<std::mutex> lock(mu_);
      uint64_t key = nextKey_++;
      auto deadline = timeoutMs < 0 ? Clock::time_point::max() : Clock::now() + std::chrono::milliseconds(timeoutMs);
      epoll_event ev{EPOLLIN | EPOLLRDHUP | EPOLLONESHOT, {.u64 = key}};
      if (epoll_ctl(epoll_, EPOLL_CTL_ADD, fd, &ev) != 0) ThrowErrno(info.Env(), errno, "epoll_ctl");
      watched_[key] = {fd, id, deadline};
      if (pending_++ == 0) tsfn_.Ref(info.Env());
    }
    uint64_t one = 1;
    if (write(wake_, &one, sizeof one) < 0) {}  // a new deadline may be the nearest
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
      if (pending_ > 0 && --pending_ == 0) tsfn_.Unref(info.Env());
      break;
    }
    return info.Env().Undefined();
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    Shutdown();
    return info.Env().Undefined();
  }

  void Shutdown() {
    if (closed_) return;
    closed_ = true;
    stop_ = true;
    uint64_t one = 1;
    if (write(wake_, &one, sizeof one) < 0) {}
    if (thread_.joinable()) thread_.join();
    close(epoll_);
    close(wake_);
    tsfn_.Release();
  }

  using Clock = std::chrono::steady_clock;
  struct Watched {
    int fd;
    double id;
    Clock::time_point deadline;
  };

  void Loop() {
    epoll_event events[64];
    while (!stop_) {
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
      std::vector<Outcome> outcomes;
      {
        std::lock_guard<std::mutex> lock(mu_);
        for (int i = 0; i < n; i++) {
          uint64_t key = events[i].data.u64;
          if (key == kWakeKey) {
            uint64_t count;
            if (read(wake_, &count, sizeof count) < 0) {}
            continue;
          }
          auto it = watched_.find(key);
          if (it == watched_.end()) continue;
          epoll_ctl(epoll_, EPOLL_CTL_DEL, it->second.fd, nullptr);
          outcomes.push_back({this, it->second.id, true});
          watched_.erase(it);
        }
        auto now = Clock::now();
        for (auto it = watched_.begin(); it != watched_.end();) {
          if (it->second.deadline > now) {
            ++it;
            continue;
          }
          epoll_ctl(epoll_, EPOLL_CTL_DEL, it->second.fd, nullptr);
          outcomes.push_back({this, it->second.id, false});
          it = watched_.erase(it);
        }
      }
      for (const Outcome& o : outcomes) {
        auto* heap = new Outcome(o);
        if (tsfn_.NonBlockingCall(heap, Deliver) != napi_ok) delete heap;
      }
    }
  }

  static void Deliver(Napi::Env env, Napi::Function callback, Outcome* o) {
    if (env != nullptr && callback != nullptr) {
      o->watcher->Settled(env);
      Napi::Object out = Napi::Object::New(env);
      out.Set("id", o->id);
      out.Set("ready", o->ready);
      callback.Call({out});
    }
    delete o;
  }

  int epoll_ = -1, wake_ = -1;
  Napi::ThreadSafeFunction tsfn_;
  std::thread thread_;
  std::mutex mu_;
  std::map<uint64_t, Watched> watched_;
  uint64_t nextKey_ = 1;
  bool closed_ = false;
  std::atomic<bool> stop_{false};

 public:
  // On the JS thread, once per outcome: an idle watcher stops keeping the process alive.
  void Settled(Napi::Env env) {
    std::lock_guard<std::mutex> lock(mu_);
    if (pending_ > 0 && --pending_ == 0) tsfn_.Unref(env);
  }

 private:
  uint64_t pending_ = 0;
};

}  // namespace

void InitFdWatcher(Napi::Env env, Napi::Object exports) { exports.Set("FdWatcher", FdWatcher::Define(env)); }

}  // namespace uffdpc
