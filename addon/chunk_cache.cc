#include "chunk_cache.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>

#include "addon.h"
#include "errors.h"

namespace uffdpc {

bool ChunkCacheReader::IsZero(uint32_t sourceRegion, uint64_t chunk) const {
  const uint8_t* name = names_[sourceRegion].data() + chunk * 32;
  for (int i = 0; i < 32; i++)
    if (name[i]) return false;
  return true;
}

void ChunkCacheReader::PathOf(uint32_t sourceRegion, uint64_t chunk, std::string* folder, std::string* name) const {
  static const char kHex[] = "0123456789abcdef";
  const uint8_t* bytes = Name(sourceRegion, chunk);
  name->resize(64);
  for (int i = 0; i < 32; i++) {
    (*name)[2 * i] = kHex[bytes[i] >> 4];
    (*name)[2 * i + 1] = kHex[bytes[i] & 15];
  }
  *folder = dir_ + "/" + name->substr(0, 2);
}

bool ChunkCacheReader::Read(uint32_t sourceRegion, uint64_t chunk, uint8_t* out, uint64_t length, bool* damaged) const {
  if (dir_.empty() || sourceRegion >= names_.size() || chunk >= Chunks(sourceRegion)) return false;
  std::string folder, name;
  PathOf(sourceRegion, chunk, &folder, &name);
  std::string path = folder + "/" + name;
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  bool ok = false;
  struct stat st;
  uint8_t footer[kCacheFooterBytes];
  if (fstat(fd, &st) == 0 && static_cast<uint64_t>(st.st_size) == length + kCacheFooterBytes) {
    uint64_t got = 0;
    while (got < length) {
      ssize_t n = pread(fd, out + got, length - got, static_cast<off_t>(got));
      if (n > 0) {
        got += static_cast<uint64_t>(n);
      } else if (n < 0 && errno == EINTR) {
        continue;
      } else {
        break;
      }
    }
    if (got == length && pread(fd, footer, kCacheFooterBytes, static_cast<off_t>(length)) == static_cast<ssize_t>(kCacheFooterBytes)) {
      uint64_t check;
      std::memcpy(&check, footer + 8, 8);  // little-endian, as this machine
      ok = std::memcmp(footer, kCacheMagic, 8) == 0 && check == CacheCheck(out, length);
    }
  }
  if (ok) futimens(fd, nullptr);  // used now: the last to be evicted
  if (!ok && damaged) *damaged = true;
  close(fd);
  return ok;
}

#ifndef F_OFD_SETLK
#define F_OFD_SETLK 37  // open file description locks (Linux 3.15); older headers lack the name
#endif

int LockRange(int fd, uint64_t at, uint64_t length, bool lock) {
  struct flock fl = {};
  fl.l_type = lock ? F_WRLCK : F_UNLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = static_cast<off_t>(at);
  fl.l_len = static_cast<off_t>(length);
  if (fcntl(fd, F_OFD_SETLK, &fl) == 0) return 0;
  return errno == EACCES ? EAGAIN : errno;
}

namespace {

// rangeLock(fd, at, length, lock) -> boolean (LockRange). Arguments are
// checked in lib/store/chunk-cache.ts; here again, as numbers in range.
Napi::Value RangeLockJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 4 || !info[0].IsNumber() || !info[1].IsNumber() || !info[2].IsNumber() || !info[3].IsBoolean())
    throw CodedError(env, "ERR_INVALID_ARG_TYPE", "rangeLock(fd: number, at: number, length: number, lock: boolean)");
  double fdNumber = info[0].As<Napi::Number>().DoubleValue();
  double at = info[1].As<Napi::Number>().DoubleValue(), length = info[2].As<Napi::Number>().DoubleValue();
  bool whole = fdNumber == static_cast<double>(static_cast<int64_t>(fdNumber)) && at == static_cast<double>(static_cast<int64_t>(at)) &&
               length == static_cast<double>(static_cast<int64_t>(length));
  int fd = static_cast<int>(fdNumber);
  if (!whole || !(fdNumber >= 0 && fdNumber <= 2147483647.0) || !(at >= 0 && at < 9007199254740992.0) || !(length >= 1 && length <= 1 << 20))
    throw CodedError(env, "ERR_OUT_OF_RANGE", "rangeLock: a descriptor, an offset from 0 and a length of 1 byte to 1 MiB");
  bool lock = info[3].As<Napi::Boolean>().Value();
  int err = LockRange(fd, static_cast<uint64_t>(at), static_cast<uint64_t>(length), lock);
  if (err == 0 || (lock && err == EAGAIN)) return Napi::Boolean::New(env, err == 0);
  ThrowErrno(env, err, "fcntl", "F_OFD_SETLK");
}

// cacheCheck(bytes) -> bigint: CacheCheck() of the bytes (a cached chunk file's footer).
Napi::Value CacheCheckJs(const Napi::CallbackInfo& info) {
  auto bytes = info[0].As<Napi::Uint8Array>();
  return Napi::BigInt::New(info.Env(), CacheCheck(bytes.Data(), bytes.ByteLength()));
}

}  // namespace

#ifndef O_TMPFILE
#define O_TMPFILE (020000000 | O_DIRECTORY)  // Linux 3.11; older headers lack the name
#endif

// Writes one chunk's file (content, then footer) under the name it is read
// by: made nameless in the chunk's folder (O_TMPFILE) and linked to its name
// once whole, so no reader (any process) ever sees half a file, and a crash
// mid-write leaves nothing behind. The folder is made when missing. Where the
// filesystem cannot make a nameless file (or /proc is not mounted), a
// temporary name in the same folder (".tmp.*", which the cache's scan
// removes once old), linked to the name and removed.
KeepResult KeepChunkFile(const std::string& folder, const std::string& name, const uint8_t* data, uint64_t length, uint64_t check) {
  KeepResult result;
  uint8_t footer[kCacheFooterBytes];
  std::memcpy(footer, kCacheMagic, 8);
  std::memcpy(footer + 8, &check, 8);  // little-endian, as this machine
  auto fail = [&](int fd, const char* syscall) {
    result.err = errno ? errno : EIO;
    result.syscall = syscall;
    if (fd >= 0) close(fd);
    return result;
  };
  auto done = [&](int fd, bool made) {
    close(fd);
    result.made = made;
    return result;
  };
  auto writeAll = [&](int fd) {
    struct iovec parts[2] = {{const_cast<uint8_t*>(data), length}, {footer, kCacheFooterBytes}};
    uint64_t total = length + kCacheFooterBytes, written = 0;
    while (written < total) {
      ssize_t n = pwritev(fd, parts, 2, static_cast<off_t>(written));
      if (n < 0 && errno == EINTR) continue;
      if (n == 0) errno = EIO;  // no progress and no error: said as an I/O error, not whatever errno held before
      if (n <= 0) return false;
      written += static_cast<uint64_t>(n);
      // A short write: go on past what was written.
      uint64_t skip = static_cast<uint64_t>(n);
      for (auto& part : parts) {
        uint64_t take = skip < part.iov_len ? skip : part.iov_len;
        part.iov_base = static_cast<uint8_t*>(part.iov_base) + take;
        part.iov_len -= take;
        skip -= take;
      }
    }
    return true;
  };
  std::string path = folder + "/" + name;
  static std::atomic<bool> noProc{false};
  int fd = -1;
  if (!noProc.load(std::memory_order_relaxed)) {
    // A nameless file in the folder (made when missing).
    fd = open(folder.c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600);
    if (fd < 0 && errno == ENOENT) {
      if (mkdir(folder.c_str(), 0700) != 0 && errno != EEXIST) return fail(-1, "mkdir");
      fd = open(folder.c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600);
    }
    if (fd < 0 && errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL) return fail(-1, "open");
  }
  if (fd >= 0) {
    if (!writeAll(fd)) return fail(fd, "pwritev");
    char self[64];
    std::snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
    for (int attempt = 0;; attempt++) {
      if (linkat(AT_FDCWD, self, AT_FDCWD, path.c_str(), AT_SYMLINK_FOLLOW) == 0) return done(fd, true);
      if (errno == EEXIST) return done(fd, false);  // another process kept it meanwhile: the same content
      if (errno != ENOENT) return fail(fd, "linkat");
      if (access(self, F_OK) != 0) break;  // no /proc here: by a temporary name instead, from now on
      // The folder was removed since the file was made in it: made again, and linked once more.
      if (attempt > 0 || (mkdir(folder.c_str(), 0700) != 0 && errno != EEXIST)) return fail(fd, attempt > 0 ? "linkat" : "mkdir");
    }
    noProc.store(true, std::memory_order_relaxed);
    close(fd);
  }
  static std::atomic<uint64_t> kept{0};
  std::string tmp = folder + "/.tmp." + name + "." + std::to_string(getpid()) + "." + std::to_string(++kept);
  fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0 && errno == ENOENT && mkdir(folder.c_str(), 0700) == 0) fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return fail(-1, "open");
  if (!writeAll(fd)) {
    int err = errno;
    unlink(tmp.c_str());
    errno = err;
    return fail(fd, "pwritev");
  }
  // Linked, not renamed: a name already there is left as it is (another process kept the same content).
  bool made = link(tmp.c_str(), path.c_str()) == 0;
  int err = errno;
  unlink(tmp.c_str());
  if (!made && err != EEXIST) {
    errno = err;
    return fail(fd, "link");
  }
  return done(fd, made);
}

namespace {

// KeepChunkFile on a thread of libuv's pool, for JavaScript (one trip, no event-loop turn per syscall).
class KeepWorker : public Napi::AsyncWorker {
 public:
  KeepWorker(Napi::Env env, std::string folder, std::string name, Napi::Uint8Array content, uint64_t check)
      : Napi::AsyncWorker(env),
        deferred_(Napi::Promise::Deferred::New(env)),
        folder_(std::move(folder)),
        name_(std::move(name)),
        content_(Napi::Persistent(content)),
        data_(content.Data()),
        length_(content.ByteLength()),
        check_(check) {}
  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override { result_ = KeepChunkFile(folder_, name_, data_, length_, check_); }
  void OnOK() override {
    if (result_.err) {
      Napi::Error e = ErrnoError(Env(), result_.err, result_.syscall);
      e.Value().Set("path", folder_ + "/" + name_);
      deferred_.Reject(e.Value());
    } else
      deferred_.Resolve(Napi::Boolean::New(Env(), result_.made));
  }

 private:
  Napi::Promise::Deferred deferred_;
  std::string folder_, name_;
  Napi::Reference<Napi::Uint8Array> content_;  // kept alive while the pool's thread reads it
  const uint8_t* data_;
  uint64_t length_;
  uint64_t check_;
  KeepResult result_;
};

// cacheKeep(folder, name, content, check) -> Promise<boolean> (KeepWorker):
// true when this call made the file, false when one of that name was there.
// Arguments are checked in lib/store/chunk-cache.ts; here again.
Napi::Value CacheKeepJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 4 || !info[0].IsString() || !info[1].IsString() || !info[2].IsTypedArray() || !info[3].IsBigInt())
    throw CodedError(env, "ERR_INVALID_ARG_TYPE", "cacheKeep(folder: string, name: string, content: Uint8Array, check: bigint)");
  std::string folder = info[0].As<Napi::String>().Utf8Value(), name = info[1].As<Napi::String>().Utf8Value();
  if (folder.empty() || name.empty() || name.size() > 128 || name.find('/') != std::string::npos || name[0] == '.')
    throw CodedError(env, "ERR_INVALID_ARG_VALUE", "cacheKeep: a folder and a plain file name");
  auto content = info[2].As<Napi::TypedArray>();
  if (content.TypedArrayType() != napi_uint8_array) throw CodedError(env, "ERR_INVALID_ARG_TYPE", "cacheKeep: content is a Uint8Array");
  bool lossless = false;
  uint64_t check = info[3].As<Napi::BigInt>().Uint64Value(&lossless);
  if (!lossless) throw CodedError(env, "ERR_OUT_OF_RANGE", "cacheKeep: check is a 64-bit unsigned bigint");
  auto* worker = new KeepWorker(env, std::move(folder), std::move(name), content.As<Napi::Uint8Array>(), check);
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
}
}  // namespace

void InitChunkCache(Napi::Env env, Napi::Object exports) {
  exports.Set("cacheCheck", Napi::Function::New(env, CacheCheckJs, "cacheCheck"));
  exports.Set("cacheKeep", Napi::Function::New(env, CacheKeepJs, "cacheKeep"));
  exports.Set("rangeLock", Napi::Function::New(env, RangeLockJs, "rangeLock"));
}

}  // namespace uffdpc
