// The host's chunk cache (lib/store/chunk-cache.ts) as native code reads it:
// the fault thread serves a fault whose chunk is cached without a trip
// through JavaScript, and chunk_cache.cc's KeepWorker writes the files for
// JavaScript, on libuv's pool. A cached chunk is a file named by the SHA-256
// of its content (checked when it came from the store) under DIR/hh/,
// holding the content and a 16-byte footer: the magic "uffdpcc1" and
// CacheCheck() of the content (u64, little-endian), which every read checks
// (docs/STORE.md, "The host cache").
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "page_checksum.h"

namespace uffdpc {

inline constexpr char kCacheMagic[8] = {'u', 'f', 'f', 'd', 'p', 'c', 'c', '1'};
inline constexpr uint64_t kCacheFooterBytes = 16;

// A cached file's check of its content, any length: ContentHash over the
// whole 32-byte words, then the tail and the length folded in.
inline uint64_t CacheCheck(const uint8_t* data, uint64_t length) {
  uint64_t whole = length & ~uint64_t{31};
  uint8_t tail[32] = {};
  std::memcpy(tail, data + whole, length - whole);
  return Avalanche64(ContentHash(data, whole) ^ Avalanche64(ContentHash(tail, 32) ^ length));
}

// The byte range [at, at + length) of the file `fd`, locked for writing or
// unlocked, as an open file description lock: it belongs to the open file,
// not the process, so two opens in one process exclude each other too, and
// the kernel lets it go when the file is closed (a holder that dies never
// leaves it behind). Never waits: 0, EAGAIN while another open file holds it,
// or the errno of a filesystem that cannot lock.
int LockRange(int fd, uint64_t at, uint64_t length, bool lock);

// A chunk's slot in the cache directory's lock file (lib/store/chunk-cache.ts,
// lockSlotOffset): the first 4 bytes of its name, modulo kCacheLockSlots, 8 bytes a slot.
inline constexpr uint64_t kCacheLockSlots = 1 << 20, kCacheSlotBytes = 8;
inline uint64_t CacheLockSlot(const uint8_t name[32]) {
  uint32_t head = (uint32_t{name[0]} << 24) | (uint32_t{name[1]} << 16) | (uint32_t{name[2]} << 8) | name[3];
  return (head % kCacheLockSlots) * kCacheSlotBytes;
}

// What writing a chunk's file came to: `made` (false: a file of that name
// was there, the same content), or the errno and the call that failed.
struct KeepResult {
  bool made = false;
  int err = 0;
  const char* syscall = nullptr;
};
// Writes a chunk's file `folder`/`name` (its content, then the footer with
// `check`), whole or not at all (chunk_cache.cc). Any thread.
KeepResult KeepChunkFile(const std::string& folder, const std::string& name, const uint8_t* data, uint64_t length, uint64_t check);

class ChunkCacheReader {
 public:
  // `dir`: the cache's directory (empty: no cache, only zero chunks are known
  // here). `names`: per source region, 32 bytes per chunk (its SHA-256; all
  // zero: a zero chunk, never stored).
  ChunkCacheReader(std::string dir, std::vector<std::vector<uint8_t>> names) : dir_(std::move(dir)), names_(std::move(names)) {}

  uint64_t Chunks(uint32_t sourceRegion) const { return names_[sourceRegion].size() / 32; }
  bool IsZero(uint32_t sourceRegion, uint64_t chunk) const;
  // The chunk's content, exactly `length` bytes, into `out`, checked; false
  // when the cache has no such file, or it is damaged (JavaScript then
  // fetches it, and replaces a damaged file). A read counts as a use: the
  // file's time is set to now, the order in which the cache evicts.
  // `damaged` (when given): set when a file was there and failed its check.
  bool Read(uint32_t sourceRegion, uint64_t chunk, uint8_t* out, uint64_t length, bool* damaged = nullptr) const;
  const std::string& dir() const { return dir_; }
  // The chunk's name: its SHA-256, 32 bytes.
  const uint8_t* Name(uint32_t sourceRegion, uint64_t chunk) const { return names_[sourceRegion].data() + chunk * 32; }
  // Its file's folder (DIR/hh) and name (64 hex digits).
  void PathOf(uint32_t sourceRegion, uint64_t chunk, std::string* folder, std::string* name) const;

 private:
  std::string dir_;
  std::vector<std::vector<uint8_t>> names_;
};

}  // namespace uffdpc
