// The installed-pages checksum (docs/PROTOCOL.md, "Verifying what was
// installed"): both ends sum, modulo 2^64, one 64-bit value per page:
//
//   Contribution(region, page, ContentHash(bytes of the page))
//
// A sum does not depend on the order pages arrive in, needs no memory per
// page, and lets the source leave out the pages a destination never installed
// (given back, mapped by no guest region) by subtracting them. It guards
// against pages put in the wrong place, lost, doubled or corrupted on the way;
// it is not a MAC (sealed channels and the token keep an attacker out).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace uffdpc {

inline uint64_t Rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

// A 64-bit bijective finaliser: every input bit affects every output bit.
inline uint64_t Avalanche64(uint64_t x) {
  x ^= x >> 31;
  x *= 0x7fb5d329728ea185ull;
  x ^= x >> 27;
  x *= 0x81dadef4bc2dd44dull;
  x ^= x >> 33;
  return x;
}

// Four independent lanes of xor-multiply-rotate over 64-bit words. Each step
// is a bijection of a lane's state for a given word, so two pages that differ
// in a single word always hash apart; the lanes keep the multiplier busy.
// `len` is a multiple of 32 (every page size is).
inline uint64_t ContentHash(const uint8_t* p, size_t len) {
  constexpr uint64_t kMul = 0x9e3779b97f4a7c15ull;
  uint64_t a = 0x243f6a8885a308d3ull, b = 0x13198a2e03707344ull, c = 0xa4093822299f31d0ull, d = 0x082efa98ec4e6c89ull;
  for (size_t i = 0; i + 32 <= len; i += 32) {
    uint64_t w[4];
    std::memcpy(w, p + i, 32);
    a = Rotl64((a ^ w[0]) * kMul, 29);
    b = Rotl64((b ^ w[1]) * kMul, 29);
    c = Rotl64((c ^ w[2]) * kMul, 29);
    d = Rotl64((d ^ w[3]) * kMul, 29);
  }
  uint64_t h = Avalanche64(a ^ len);
  h = Avalanche64(h ^ b);
  h = Avalanche64(h ^ c);
  return Avalanche64(h ^ d);
}

// Binds a page's content to where it belongs in the image.
inline uint64_t Contribution(uint32_t region, uint64_t page, uint64_t contentHash) {
  return Avalanche64(contentHash ^ Avalanche64((static_cast<uint64_t>(region) << 48) ^ page ^ 0x5851f42d4c957f2dull));
}

}  // namespace uffdpc
