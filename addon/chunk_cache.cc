#include "chunk_cache.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "addon.h"
#include "errors.h"

namespace uffdpc {

bool ChunkCacheReader::IsZero(uint32_t sourceRegion, uint64_t chunk) const {
  const uint8_t* name = names_[sourceRegion].data() + chunk * 32;
  for (int i = 0; i < 32; i++)
    if (name[i]) return false;
  return true;
}

bool ChunkCacheReader::Read(uint32_t sourceRegion, uint64_t chunk, uint8_t* out, uint64_t length) const {
  if (dir_.empty() || sourceRegion >= names_.size() || chunk >= Chunks(sourceRegion)) return false;
  static const char kHex[] = "0123456789abcdef";
  char hex[65];
  const uint8_t* name = names_[sourceRegion].data() + chunk * 32;
  for (int i = 0; i < 32; i++) {
    hex[2 * i] = kHex[name[i] >> 4];
    hex[2 * i + 1] = kHex[name[i] & 15];
  }
  hex[64] = 0;
  std::string path = dir_;
  path.append("/").append(hex, 2).append("/").append(hex, 64);
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
  close(fd);
  return ok;
}

namespace {
#ifndef F_OFD_SETLK
#define F_OFD_SETLK 37  // open file description locks (Linux 3.15); older headers lack the name
#endif

// The byte range [at, at + length) of the file `fd`, locked for writing or
// unlocked, as an open file description lock: it belongs to the open file,
// not the process, so two opens in one process exclude each other too, and
// the kernel lets it go when the file is closed (a holder that dies never
// leaves it behind). Never waits: false when another open file holds it.
bool RangeLock(Napi::Env env, int fd, double at, double length, bool lock) {
  struct flock fl = {};
  fl.l_type = lock ? F_WRLCK : F_UNLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = static_cast<off_t>(at);
  fl.l_len = static_cast<off_t>(length);
  if (fcntl(fd, F_OFD_SETLK, &fl) == 0) return true;
  if (lock && (errno == EAGAIN || errno == EACCES)) return false;
  ThrowErrno(env, errno, "fcntl", "F_OFD_SETLK");
}

// rangeLock(fd, at, length, lock) -> boolean (RangeLock). Arguments are
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
  return Napi::Boolean::New(env, RangeLock(env, fd, at, length, info[3].As<Napi::Boolean>().Value()));
}

// cacheCheck(bytes) -> bigint: CacheCheck() of the bytes (a cached chunk file's footer).
Napi::Value CacheCheckJs(const Napi::CallbackInfo& info) {
  auto bytes = info[0].As<Napi::Uint8Array>();
  return Napi::BigInt::New(info.Env(), CacheCheck(bytes.Data(), bytes.ByteLength()));
}
}  // namespace

void InitChunkCache(Napi::Env env, Napi::Object exports) {
  exports.Set("cacheCheck", Napi::Function::New(env, CacheCheckJs, "cacheCheck"));
  exports.Set("rangeLock", Napi::Function::New(env, RangeLockJs, "rangeLock"));
}

}  // namespace uffdpc
