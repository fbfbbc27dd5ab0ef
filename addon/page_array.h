// Per-page counters that cost memory only where pages are actually used:
// chunks of 4096 entries allocated on first use (from any thread), so a huge
// region that is mostly streamed, never faulted on, costs next to nothing.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>

namespace uffdpc {

template <typename T>
class LazyPageArray {
 public:
  static constexpr uint64_t kChunk = 4096;

  explicit LazyPageArray(uint64_t pages) : chunks_((pages + kChunk - 1) / kChunk), table_(new std::atomic<std::atomic<T>*>[chunks_]) {
    for (uint64_t i = 0; i < chunks_; i++) table_[i].store(nullptr, std::memory_order_relaxed);
  }
  ~LazyPageArray() {
    for (uint64_t i = 0; i < chunks_; i++) delete[] table_[i].load(std::memory_order_relaxed);
  }
  LazyPageArray(const LazyPageArray&) = delete;
  LazyPageArray& operator=(const LazyPageArray&) = delete;

  // The entry for `page`, its chunk allocated (zeroed) if needed.
  std::atomic<T>& At(uint64_t page) {
    std::atomic<std::atomic<T>*>& slot = table_[page / kChunk];
    std::atomic<T>* chunk = slot.load(std::memory_order_acquire);
    if (!chunk) {
      auto* fresh = new std::atomic<T>[kChunk]();
      if (slot.compare_exchange_strong(chunk, fresh, std::memory_order_acq_rel))
        chunk = fresh;
      else
        delete[] fresh;  // another thread got there first; `chunk` holds its chunk
    }
    return chunk[page % kChunk];
  }

  // Sets the entry to 0 and returns what it held; never allocates.
  T Take(uint64_t page) {
    std::atomic<T>* chunk = table_[page / kChunk].load(std::memory_order_acquire);
    return chunk ? chunk[page % kChunk].exchange(0, std::memory_order_acq_rel) : 0;
  }

 private:
  uint64_t chunks_;
  std::unique_ptr<std::atomic<std::atomic<T>*>[]> table_;
};

}  // namespace uffdpc
