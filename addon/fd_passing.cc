// Unix-socket fd passing (SCM_RIGHTS with a payload), peer credentials
// (SO_PEERCRED), socket pairs, and an awaitable poll() for any fd.
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cerrno>
#include <string>
#include <vector>
#include <cstring>

#include "addon.h"
#include "errors.h"

namespace uffdpc {
namespace {

constexpr size_t kMaxFds = 253;  // SCM_MAX_FD

// socketPair(seqpacket?): a connected pair of unix sockets; SOCK_SEQPACKET keeps message boundaries.
Napi::Value SocketPair(const Napi::CallbackInfo& info) {
  int sv[2];
  int type = info.Length() > 0 && info[0].IsBoolean() && info[0].As<Napi::Boolean>().Value() ? SOCK_SEQPACKET : SOCK_STREAM;
  if (socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv) != 0) ThrowErrno(info.Env(), errno, "socketpair");
  Napi::Array out = Napi::Array::New(info.Env(), 2);
  out.Set(0u, sv[0]);
  out.Set(1u, sv[1]);
  return out;
}

// sendWithFds(socket, payload, fds): one sendmsg; returns bytes sent.
Napi::Value SendWithFds(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int sock = info[0].As<Napi::Number>().Int32Value();
  auto payload = info[1].As<Napi::TypedArrayOf<uint8_t>>();
  Napi::Array fdList = info[2].As<Napi::Array>();
  size_t nfds = fdList.Length();
  iovec iov{payload.Data(), payload.ElementLength()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control(CMSG_SPACE(sizeof(int) * (nfds ? nfds : 1)));
  if (nfds > 0) {
    msg.msg_control = control.data();
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    int* fds = reinterpret_cast<int*>(CMSG_DATA(cmsg));
    for (size_t i = 0; i < nfds; i++) fds[i] = fdList.Get(i).As<Napi::Number>().Int32Value();
  }
  ssize_t n;
  do n = sendmsg(sock, &msg, MSG_NOSIGNAL);
  while (n < 0 && errno == EINTR);
  if (n < 0) ThrowErrno(env, errno, "sendmsg");
  return Napi::Number::New(env, static_cast<double>(n));
}

// receiveNow(socket, maxBytes, maxFds) -> {payload, fds, truncated}: one
// recvmsg that does not block (call it once the socket is readable; see
// addon/fd_watcher.cc). An empty payload means the peer closed the socket.
Napi::Value ReceiveNow(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int sock = info[0].As<Napi::Number>().Int32Value();
  std::vector<uint8_t> payload(info[1].As<Napi::Number>().Uint32Value());
  size_t maxFds = std::min<size_t>(info[2].As<Napi::Number>().Uint32Value(), kMaxFds);
  iovec iov{payload.data(), payload.size()};
  std::vector<char> control(CMSG_SPACE(sizeof(int) * (maxFds ? maxFds : 1)));
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  ssize_t n;
  do n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
  while (n < 0 && errno == EINTR);
  if (n < 0) ThrowErrno(env, errno, "recvmsg");
  Napi::Array fds = Napi::Array::New(env);
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const int* got = reinterpret_cast<const int*>(CMSG_DATA(c));
    for (size_t i = 0; i < count; i++) fds.Set(fds.Length(), got[i]);
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("payload", Napi::Buffer<uint8_t>::Copy(env, payload.data(), static_cast<size_t>(n)));
  out.Set("fds", fds);
  out.Set("truncated", (msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC)) != 0);
  return out;
}

Napi::Value PeerCredentials(const Napi::CallbackInfo& info) {
  ucred cred{};
  socklen_t len = sizeof cred;
  if (getsockopt(info[0].As<Napi::Number>().Int32Value(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0)
    ThrowErrno(info.Env(), errno, "getsockopt", "SO_PEERCRED");
  Napi::Object out = Napi::Object::New(info.Env());
  out.Set("pid", cred.pid);
  out.Set("uid", cred.uid);
  out.Set("gid", cred.gid);
  return out;
}

class PollWorker : public Napi::AsyncWorker {
 public:
  PollWorker(Napi::Env env, int fd, short events, int timeoutMs)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), pfd_{fd, events, 0}, timeoutMs_(timeoutMs) {}
  Napi::Promise Promise() { return deferred_.Promise(); }
  void Execute() override {
    int ready;
    do ready = poll(&pfd_, 1, timeoutMs_);
    while (ready < 0 && errno == EINTR);
    if (ready < 0) err_ = errno;
  }
  void OnOK() override {
    if (err_)
      deferred_.Reject(ErrnoError(Env(), err_, "poll").Value());
    else
      deferred_.Resolve(Napi::Number::New(Env(), pfd_.revents));
  }

 private:
  Napi::Promise::Deferred deferred_;
  pollfd pfd_;
  int timeoutMs_;
  int err_ = 0;
};

// pollFd(fd, events, timeoutMs) -> Promise<revents> (0 on timeout)
Napi::Value PollFd(const Napi::CallbackInfo& info) {
  auto* worker = new PollWorker(info.Env(), info[0].As<Napi::Number>().Int32Value(), static_cast<short>(info[1].As<Napi::Number>().Int32Value()),
                                info[2].As<Napi::Number>().Int32Value());
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
}

// takeSocketFd(fd): a blocking, close-on-exec duplicate of a connected socket
// for a data-plane thread; the JS socket that owned `fd` is destroyed after.
Napi::Value TakeSocketFd(const Napi::CallbackInfo& info) {
  int fd = fcntl(info[0].As<Napi::Number>().Int32Value(), F_DUPFD_CLOEXEC, 3);
  if (fd < 0) ThrowErrno(info.Env(), errno, "fcntl", "F_DUPFD_CLOEXEC");
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0) {
    int err = errno;
    close(fd);
    ThrowErrno(info.Env(), err, "fcntl", "F_SETFL");
  }
  return Napi::Number::New(info.Env(), fd);
}

// sendDatagram(path, payload): one datagram to the unix datagram socket at
// `path` ("@name" is the abstract namespace), from a socket opened for it and
// closed after; returns bytes sent. How a service tells its manager it is
// ready (systemd's NOTIFY_SOCKET). The path and payload are checked in
// lib/fd-passing.ts; the length is checked again here before it is copied.
Napi::Value SendDatagram(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>().Utf8Value();
  auto payload = info[1].As<Napi::TypedArrayOf<uint8_t>>();
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path) {
    Napi::RangeError::New(env, "a unix socket path must be 1 to 107 bytes").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  if (path[0] == '@') addr.sun_path[0] = '\0';
  socklen_t len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + (path[0] == '@' ? 0 : 1));
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) ThrowErrno(env, errno, "socket");
  ssize_t n;
  do n = sendto(fd, payload.Data(), payload.ElementLength(), MSG_NOSIGNAL, reinterpret_cast<const sockaddr*>(&addr), len);
  while (n < 0 && errno == EINTR);
  int err = errno;
  close(fd);
  if (n < 0) ThrowErrno(env, err, "sendto", path);
  return Napi::Number::New(env, static_cast<double>(n));
}

}  // namespace

void InitFdPassing(Napi::Env env, Napi::Object exports) {
  exports.Set("socketPair", Napi::Function::New(env, SocketPair));
  exports.Set("sendWithFds", Napi::Function::New(env, SendWithFds));
  exports.Set("receiveNow", Napi::Function::New(env, ReceiveNow));
  exports.Set("peerCredentials", Napi::Function::New(env, PeerCredentials));
  exports.Set("pollFd", Napi::Function::New(env, PollFd));
  exports.Set("takeSocketFd", Napi::Function::New(env, TakeSocketFd));
  exports.Set("sendDatagram", Napi::Function::New(env, SendDatagram));
  Napi::Object c = Napi::Object::New(env);
  c.Set("POLLIN", POLLIN);
  c.Set("POLLOUT", POLLOUT);
  c.Set("POLLERR", POLLERR);
  c.Set("POLLHUP", POLLHUP);
  c.Set("MAX_FDS", static_cast<uint32_t>(kMaxFds));
  exports.Set("pollConstants", c);
}

}  // namespace uffdpc
