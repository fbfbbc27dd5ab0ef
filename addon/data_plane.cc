#include "data_plane.h"

#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

#include "errors.h"
#include "threads.h"

namespace uffdpc {

void DataPlane::OpenPlane(Napi::Env env, Napi::Function onEvent, const char* name) {
  wakeFd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wakeFd_ < 0) ThrowErrno(env, errno, "eventfd");
  events_.Open(env, onEvent, name);
}

void DataPlane::Spawn(const char* name, int cpu, std::function<void()> body) {
  threads_.emplace_back([name, cpu, body = std::move(body)] {
    NameAndPinThisThread(name, cpu);
    body();
  });
}

void DataPlane::OwnSocket(int fd) {
  if (fd >= 0) sockets_.push_back(fd);
}

void DataPlane::OwnFd(int fd) {
  if (fd >= 0) fds_.push_back(fd);
}

void DataPlane::Wake() {
  uint64_t one = 1;
  if (wakeFd_ >= 0 && write(wakeFd_, &one, sizeof one) < 0) {}  // full (it is already readable): nothing to add
}

void DataPlane::ClearWake() {
  uint64_t count;
  if (wakeFd_ >= 0 && read(wakeFd_, &count, sizeof count) < 0) {}  // EAGAIN: nothing rang
}

void DataPlane::StopPlane(bool hooks) {
  if (stopped_) return;
  stopped_ = true;
  if (hooks) BeforeStop();
  stop_.store(true, std::memory_order_release);
  Wake();
  for (auto [mu, cv] : waiters_) {
    std::lock_guard<std::mutex> lock(*mu);
    cv->notify_all();
  }
  for (int fd : sockets_) shutdown(fd, SHUT_RDWR);
  for (std::thread& t : threads_)
    if (t.joinable()) t.join();
  threads_.clear();
  for (int fd : sockets_) close(fd);
  for (int fd : fds_) close(fd);
  sockets_.clear();
  fds_.clear();
  if (wakeFd_ >= 0) close(wakeFd_);
  wakeFd_ = -1;
  if (hooks) ReleaseReferences();
  events_.Close();
}

}  // namespace uffdpc
