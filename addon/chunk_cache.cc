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
// cacheCheck(bytes) -> bigint: CacheCheck() of the bytes (a cached chunk file's footer).
Napi::Value CacheCheckJs(const Napi::CallbackInfo& info) {
  auto bytes = info[0].As<Napi::Uint8Array>();
  return Napi::BigInt::New(info.Env(), CacheCheck(bytes.Data(), bytes.ByteLength()));
}
}  // namespace

void InitChunkCache(Napi::Env env, Napi::Object exports) { exports.Set("cacheCheck", Napi::Function::New(env, CacheCheckJs, "cacheCheck")); }

}  // namespace uffdpc
