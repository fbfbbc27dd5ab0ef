// A chunk fetched from a snapshot store by the engine itself (docs/STORE.md,
// "Faults fetched in the engine"): one keep-alive HTTP/1.1 connection to an
// S3-compatible endpoint, a GET of the chunk's range of its pack signed with
// AWS Signature Version 4 (as lib/store/signed-get.ts signs), the object
// decoded (raw or zstd) and checked against its name (SHA-256) before the
// caller sees a byte of it. Blocking, one per thread: a cold fault's chunk
// then goes from the fault thread to an installed page with no trip through
// JavaScript. Anything this does not handle (TLS, a sealed chunk, a refusal,
// a network failure, a damaged chunk) is a `false` with the reason: the
// caller hands the piece to JavaScript's feeder, which retries, pauses and
// reports as for every other piece.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "run_packer.h"

namespace uffdpc {

// Where a chunk's object lies: bytes [offset, offset + length) of pack `pack`
// (an index into StoreGets::packs). `pack` < 0: the chunk has no place here
// (a zero chunk, or one stored as its own object): JavaScript fetches it.
struct ChunkPlace {
  int64_t pack = -1;
  uint64_t offset = 0;
  uint32_t length = 0;
};

// How the engine reaches the store (lib/store/object-store.ts, inEngineGets).
struct StoreGets {
  std::string address;  // numeric, resolved by JavaScript
  bool ipv6 = false;
  uint16_t port = 0;
  std::string host;  // the Host header, as signed
  std::string region, keyId, secret, token;
  std::vector<std::string> packs;               // per pack: its object's path, encoded as signed (/BUCKET/KEY)
  std::vector<std::vector<ChunkPlace>> places;  // per source region, per chunk
  uint32_t timeoutMs = 10000;                   // no byte for this long: the GET failed
  uint32_t connections = 4;
};

class ChunkGetter {
 public:
  explicit ChunkGetter(const StoreGets& gets) : gets_(gets) {}
  ~ChunkGetter() { Disconnect(); }
  ChunkGetter(const ChunkGetter&) = delete;
  ChunkGetter& operator=(const ChunkGetter&) = delete;

  // Bytes [offset, offset + length) of pack `pack` (one ranged GET): exactly
  // that many into `object`. False with `*why` otherwise. `leaving` is asked
  // between waits (at most kSliceMs apart): true ends the GET.
  bool GetRange(int64_t pack, uint64_t offset, uint64_t length, std::vector<uint8_t>& object, const std::function<bool()>& leaving, std::string* why);
  // A chunk's object (`n` bytes) decoded into `out` (exactly `length` bytes)
  // and checked against `name`, its SHA-256: nothing else is a chunk.
  bool Decode(const uint8_t* object, size_t n, const uint8_t name[32], uint64_t length, std::vector<uint8_t>& out, std::string* why);
  // A buffer of this getter's for an object (GetRange's `object`).
  std::vector<uint8_t>& buffer() { return object_; }
  // Object bytes received by this getter's GETs (bodies), and GETs sent.
  uint64_t bytes() const { return bytes_; }
  uint64_t gets() const { return gets_sent_; }

  static constexpr int kSliceMs = 50;

 private:
  bool Connect(const std::function<bool()>& leaving, std::string* why);
  void Disconnect();
  // One request on the connection; `*retry`: the connection was found closed before any answer (a keep-alive the store let go).
  bool Exchange(const std::string& request, std::vector<uint8_t>& body, int* status, const std::function<bool()>& leaving, std::string* why, bool* retry);
  std::string Request(int64_t pack, uint64_t offset, uint64_t length);
  // Waits for `events` on the socket: false on a timeout (no progress for timeoutMs) or when leaving.
  bool Wait(short events, const std::function<bool()>& leaving, std::string* why);

  const StoreGets& gets_;
  int fd_ = -1;
  bool reused_ = false;  // the connection has answered before
  std::vector<uint8_t> in_;
  size_t inStart_ = 0;  // in_[inStart_..] is received and not yet consumed
  std::vector<uint8_t> object_;
  Unpacker unpacker_;
  std::string keyDay_;
  uint8_t key_[32] = {};
  uint64_t bytes_ = 0, gets_sent_ = 0;
};

}  // namespace uffdpc
