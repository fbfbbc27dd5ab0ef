// A fixed-size atomic bitmap: one bit per page, set-once claims from several
// threads (sent pages on the source; requested and received pages on the
// destination).
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>

namespace uffdpc {

class AtomicBitmap {
 public:
  explicit AtomicBitmap(uint64_t bits) : bits_(bits), words_(new std::atomic<uint64_t>[(bits + 63) / 64]) {
    for (uint64_t i = 0; i < (bits + 63) / 64; i++) words_[i].store(0, std::memory_order_relaxed);
  }
  uint64_t size() const { return bits_; }
  bool Test(uint64_t i) const { return (words_[i / 64].load(std::memory_order_acquire) >> (i % 64)) & 1; }
  // Sets bit i; true when this call set it (it was clear before).
  bool Claim(uint64_t i) {
    uint64_t mask = 1ull << (i % 64);
    return !(words_[i / 64].fetch_or(mask, std::memory_order_acq_rel) & mask);
  }
  void Clear(uint64_t i) { words_[i / 64].fetch_and(~(1ull << (i % 64)), std::memory_order_acq_rel); }
  // The first clear bit at or after `from`, or size() when there is none.
  uint64_t NextClear(uint64_t from) const {
    while (from < bits_) {
      uint64_t word = ~words_[from / 64].load(std::memory_order_acquire) >> (from % 64);
      if (word) {
        uint64_t at = from + static_cast<uint64_t>(__builtin_ctzll(word));
        return at < bits_ ? at : bits_;
      }
      from = (from / 64 + 1) * 64;
    }
    return bits_;
  }

 private:
  uint64_t bits_;
  std::unique_ptr<std::atomic<uint64_t>[]> words_;
};

}  // namespace uffdpc
