// userfaultfd: open, API handshake, (un)register, the resolving ioctls, events.
// Arguments arrive validated by lib/uffd.ts; this layer trusts their types and
// ranges and reports kernel errors as errno-shaped errors.
#include <fcntl.h>
#include <poll.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <vector>

#include "addon.h"
#include "errors.h"
#include "uffd_abi.h"

namespace uffdpc {
namespace {

uint64_t U64(const Napi::Value& v) { return static_cast<uint64_t>(v.As<Napi::Number>().Int64Value()); }

// Result of an ioctl that may make partial progress: bytes done plus the errno
// name for the outcomes a caller is expected to act on (EAGAIN, EEXIST).
Napi::Object Progress(Napi::Env env, int64_t bytes, const char* code) {
  Napi::Object out = Napi::Object::New(env);
  out.Set("bytes", Napi::Number::New(env, static_cast<double>(bytes < 0 ? 0 : bytes)));
  out.Set("code", code ? Napi::Value(Napi::String::New(env, code)) : env.Null());
  return out;
}

Napi::Object ProgressOrThrow(Napi::Env env, int rc, int err, int64_t reported, uint64_t len, const char* request) {
  if (rc == 0) return Progress(env, static_cast<int64_t>(len), nullptr);
  if (err == EAGAIN) return Progress(env, reported, "EAGAIN");
  if (err == EEXIST) return Progress(env, reported, "EEXIST");
  ThrowErrno(env, err, "ioctl", request);
}

// Opens a userfaultfd: the syscall, then /dev/userfaultfd, then the syscall in
// user-mode-only form (what an unprivileged process may still get).
Napi::Value Open(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int flags = info[0].As<Napi::Number>().Int32Value();
  auto opened = [&](int fd, const char* via) {
    Napi::Object out = Napi::Object::New(env);
    out.Set("fd", fd);
    out.Set("via", via);
    return out;
  };
  int fd = static_cast<int>(syscall(SYS_userfaultfd, flags));
  if (fd >= 0) return opened(fd, "syscall");
  int syscallErr = errno;
  int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev >= 0) {
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    int devErr = errno;
    close(dev);
    if (fd >= 0) return opened(fd, "/dev/userfaultfd");
    errno = devErr;
  }
  int devErr = errno;
  fd = static_cast<int>(syscall(SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY));
  if (fd >= 0) return opened(fd, "syscall-user-mode-only");
  Napi::Error error = ErrnoError(env, syscallErr, "userfaultfd");
  error.Set("devErrno", Napi::Number::New(env, -devErr));
  throw error;
}

Napi::Value Api(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = U64(info[1]);
  if (ioctl(fd, UFFDIO_API, &api) != 0) ThrowErrno(env, errno, "ioctl", "UFFDIO_API");
  Napi::Object out = Napi::Object::New(env);
  out.Set("available", Napi::Number::New(env, static_cast<double>(api.features)));
  out.Set("ioctls", Napi::BigInt::New(env, static_cast<uint64_t>(api.ioctls)));
  return out;
}

Napi::Value Register(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uffdio_register reg{};
  reg.range.start = U64(info[1]);
  reg.range.len = U64(info[2]);
  reg.mode = U64(info[3]);
  if (ioctl(info[0].As<Napi::Number>().Int32Value(), UFFDIO_REGISTER, &reg) != 0) ThrowErrno(env, errno, "ioctl", "UFFDIO_REGISTER");
  return Napi::BigInt::New(env, static_cast<uint64_t>(reg.ioctls));
}

Napi::Value Unregister(const Napi::CallbackInfo& info) {
  uffdio_range range{U64(info[1]), U64(info[2])};
  if (ioctl(info[0].As<Napi::Number>().Int32Value(), UFFDIO_UNREGISTER, &range) != 0) ThrowErrno(info.Env(), errno, "ioctl", "UFFDIO_UNREGISTER");
  return info.Env().Undefined();
}

// copy(fd, dst, srcBuffer, srcOffset, len, mode)
Napi::Value Copy(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint8_t* src = info[2].As<Napi::TypedArrayOf<uint8_t>>().Data();
  uffdio_copy copy{};
  copy.dst = U64(info[1]);
  copy.src = reinterpret_cast<uint64_t>(src + U64(info[3]));
  copy.len = U64(info[4]);
  copy.mode = U64(info[5]);
  int rc = ioctl(info[0].As<Napi::Number>().Int32Value(), UFFDIO_COPY, &copy);
  return ProgressOrThrow(env, rc, errno, copy.copy, copy.len, "UFFDIO_COPY");
}

Napi::Value ZeroPage(const Napi::CallbackInfo& info) {
  uffdio_zeropage zero{};
  zero.range = {U64(info[1]), U64(info[2])};
  zero.mode = U64(info[3]);
  int rc = ioctl(info[0].As<Napi::Number>().Int32Value(), UFFDIO_ZEROPAGE, &zero);
  return ProgressOrThrow(info.Env(), rc, errno, zero.zeropage, zero.range.len, "UFFDIO_ZEROPAGE");
}

Napi::Value Continue(const Napi::CallbackInfo& info) {
  uffdio_continue cont{};
  cont.range = {U64(info[1]), U64(info[2])};
  cont.mode = U64(info[3]);
  int rc = ioctl(info[0].As<Napi::Number>().Int32Value(), UFFDIO_CONTINUE, &cont);
  return ProgressOrThrow(info.Env(), rc, errno, cont.mapped, cont.range.len, "UFFDIO_CONTINUE");
}

Napi::Value Poison(const Napi::CallbackInfo& info) {
  uffdio_poison poison{};
  poison.range = {U64(info[1]), U64(info[2])};
  poison.mode = U64(info[3]);
  int rc = ioctl(info[0].As<Napi::Number>().Int32Value(), UFFDIO_POISON, &poison);
  return ProgressOrThrow(info.Env(), rc, errno, poison.updated, poison.range.len, "UFFDIO_POISON");
}

// move(fd, dst, src, len, mode): src is an address in this process.
Napi::Value Move(const Napi::CallbackInfo& info) {
  uffdio_move move{};
  move.dst = U64(info[1]);
  move.src = U64(info[2]);
  move.len = U64(info[3]);
  move.mode = U64(info[4]);
  int rc = ioctl(info[0].As<Napi::Number>().Int32Value(), UFFDIO_MOVE, &move);
  return ProgressOrThrow(info.Env(), rc, errno, move.move, move.len, "UFFDIO_MOVE");
}

Napi::Value Wake(const Napi::CallbackInfo& info) {
  uffdio_range range{U64(info[1]), U64(info[2])};
  if (ioctl(info[0].As<Napi::Number>().Int32Value(), UFFDIO_WAKE, &range) != 0) ThrowErrno(info.Env(), errno, "ioctl", "UFFDIO_WAKE");
  return info.Env().Undefined();
}

Napi::Value WriteProtect(const Napi::CallbackInfo& info) {
  uffdio_writeprotect wp{};
  wp.range = {U64(info[1]), U64(info[2])};
  wp.mode = U64(info[3]);
  if (ioctl(info[0].As<Napi::Number>().Int32Value(), UFFDIO_WRITEPROTECT, &wp) != 0) ThrowErrno(info.Env(), errno, "ioctl", "UFFDIO_WRITEPROTECT");
  return info.Env().Undefined();
}

// pagemapScanWritten(pagemapFd, start, end) -> Buffer of u64 LE pairs
// [start, end): the pages of [start, end) written since they were last
// write-protected (uffd WP_ASYNC), which this same call write-protects again.
// The process whose pagemap it is goes on running; a page it writes after the
// scan passed it shows up in the next scan.
Napi::Value PagemapScanWritten(const Napi::CallbackInfo& info) {
  int fd = info[0].As<Napi::Number>().Int32Value();
  uint64_t start = U64(info[1]), end = U64(info[2]);
  std::vector<uint64_t> out;
  std::vector<page_region> vec(4096);
  while (start < end) {
    pm_scan_arg a{};
    a.size = sizeof a;
    a.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC;
    a.start = start;
    a.end = end;
    a.vec = reinterpret_cast<uint64_t>(vec.data());
    a.vec_len = vec.size();
    a.category_mask = PAGE_IS_WRITTEN;
    a.return_mask = PAGE_IS_WRITTEN;
    long n = ioctl(fd, PAGEMAP_SCAN, &a);
    if (n < 0) {
      if (errno == EINTR) continue;
      ThrowErrno(info.Env(), errno, "ioctl", "PAGEMAP_SCAN");
    }
    for (long i = 0; i < n; i++) {
      if (!out.empty() && out.back() == vec[i].start) {
        out.back() = vec[i].end;  // ranges the kernel split across calls join again
      } else {
        out.push_back(vec[i].start);
        out.push_back(vec[i].end);
      }
    }
    if (a.walk_end <= start) break;  // no progress: never spin
    start = a.walk_end;
  }
  return Napi::Buffer<uint8_t>::Copy(info.Env(), reinterpret_cast<const uint8_t*>(out.data()), out.size() * 8);
}

Napi::Object EventToObject(Napi::Env env, const uffd_msg& msg) {
  Napi::Object ev = Napi::Object::New(env);
  auto num = [&](uint64_t v) { return Napi::Number::New(env, static_cast<double>(v)); };
  switch (msg.event) {
    case UFFD_EVENT_PAGEFAULT:
      ev.Set("type", "pagefault");
      ev.Set("address", num(msg.arg.pagefault.address));
      ev.Set("flags", num(msg.arg.pagefault.flags));
      ev.Set("threadId", num(msg.arg.pagefault.feat.ptid));
      break;
    case UFFD_EVENT_FORK:
      ev.Set("type", "fork");
      ev.Set("fd", num(msg.arg.fork.ufd));
      break;
    case UFFD_EVENT_REMAP:
      ev.Set("type", "remap");
      ev.Set("from", num(msg.arg.remap.from));
      ev.Set("to", num(msg.arg.remap.to));
      ev.Set("length", num(msg.arg.remap.len));
      break;
    case UFFD_EVENT_REMOVE:
      ev.Set("type", "remove");
      ev.Set("start", num(msg.arg.remove.start));
      ev.Set("end", num(msg.arg.remove.end));
      break;
    case UFFD_EVENT_UNMAP:
      ev.Set("type", "unmap");
      ev.Set("start", num(msg.arg.remove.start));
      ev.Set("end", num(msg.arg.remove.end));
      break;
    default:
      ev.Set("type", "unknown");
      ev.Set("event", num(msg.event));
  }
  return ev;
}

// readEvents(fd, max): one read() of up to `max` messages. An fd opened
// non-blocking with nothing pending gives an empty array.
Napi::Value ReadEvents(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  uint32_t max = info[1].As<Napi::Number>().Uint32Value();
  std::vector<uffd_msg> msgs(max);
  ssize_t n;
  do n = read(fd, msgs.data(), max * sizeof(uffd_msg));
  while (n < 0 && errno == EINTR);
  if (n < 0 && errno == EAGAIN) return Napi::Array::New(env, 0);
  if (n < 0) ThrowErrno(env, errno, "read");
  size_t count = static_cast<size_t>(n) / sizeof(uffd_msg);
  Napi::Array out = Napi::Array::New(env, count);
  for (size_t i = 0; i < count; i++) out.Set(i, EventToObject(env, msgs[i]));
  return out;
}

}  // namespace

void InitUffd(Napi::Env env, Napi::Object exports) {
  exports.Set("uffdOpen", Napi::Function::New(env, Open));
  exports.Set("uffdApi", Napi::Function::New(env, Api));
  exports.Set("uffdRegister", Napi::Function::New(env, Register));
  exports.Set("uffdUnregister", Napi::Function::New(env, Unregister));
  exports.Set("uffdCopy", Napi::Function::New(env, Copy));
  exports.Set("uffdZeroPage", Napi::Function::New(env, ZeroPage));
  exports.Set("uffdContinue", Napi::Function::New(env, Continue));
  exports.Set("uffdPoison", Napi::Function::New(env, Poison));
  exports.Set("uffdMove", Napi::Function::New(env, Move));
  exports.Set("uffdWake", Napi::Function::New(env, Wake));
  exports.Set("uffdWriteProtect", Napi::Function::New(env, WriteProtect));
  exports.Set("uffdReadEvents", Napi::Function::New(env, ReadEvents));
  exports.Set("pagemapScanWritten", Napi::Function::New(env, PagemapScanWritten));
  Napi::Object c = Napi::Object::New(env);
  c.Set("UFFD_USER_MODE_ONLY", UFFD_USER_MODE_ONLY);
  c.Set("O_NONBLOCK", O_NONBLOCK);
  c.Set("O_CLOEXEC", O_CLOEXEC);
  exports.Set("uffdConstants", c);
}

}  // namespace uffdpc
