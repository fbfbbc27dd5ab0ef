// Packed runs: a bulk run's pages compressed with zstd at a fast level, for
// links slower than the compressor (docs/PROTOCOL.md, "Packed runs"). The
// library is the system's runtime libzstd (libzstd.so.1), opened on first use:
// a machine without its headers still builds the addon, and a machine without
// the library simply never packs (Available() is false; the peer is told so).
//
// One Packer per sending thread and one Unpacker per receiving thread: each
// holds its zstd context and its buffer.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace uffdpc {

// Whether libzstd could be opened (once, on first call; any thread).
bool PackingAvailable();
// The largest packed size of `bytes` bytes (zstd's bound).
size_t PackedBound(size_t bytes);

// zstd's level for packed runs: its fastest standard level, hundreds of MB a
// second a core, about what a gigabit link takes many times over.
constexpr int kRunLevel = 1;

class Packer {
 public:
  // `level`: zstd's level (default: packed runs' fastest one).
  explicit Packer(int level = kRunLevel);
  ~Packer();
  Packer(const Packer&) = delete;
  Packer& operator=(const Packer&) = delete;
  // Compresses src[0..n) into `out` (resized to the packed size). False when
  // it does not pay: the packed form is not at least 1/8 smaller (or zstd
  // failed); the caller then sends the run as it is.
  bool Pack(const uint8_t* src, size_t n, std::vector<uint8_t>& out);
  // Raw bytes packed a second by this thread so far (0 before the first run).
  double BytesPerSecond() const { return ns_ ? static_cast<double>(in_) * 1e9 / static_cast<double>(ns_) : 0; }

 private:
  void* ctx_ = nullptr;
  int level_;
  uint64_t in_ = 0, ns_ = 0;
};

class Unpacker {
 public:
  Unpacker();
  ~Unpacker();
  Unpacker(const Unpacker&) = delete;
  Unpacker& operator=(const Unpacker&) = delete;
  // Decompresses src[0..n) into dst, which must come out exactly `want`
  // bytes long. False for anything else (corrupt, short, long).
  bool Unpack(const uint8_t* src, size_t n, uint8_t* dst, size_t want);

 private:
  void* ctx_ = nullptr;
};

}  // namespace uffdpc
