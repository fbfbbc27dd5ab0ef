// A lock-free log-linear latency histogram (16 sub-buckets per power of two,
// ~6% resolution), updated from data-plane threads and read from JS.
#pragma once
#include <atomic>
#include <cstdint>

namespace uffdpc {

class LatencyHistogram {
 public:
  static constexpr int kSubBits = 4;
  static constexpr int kSub = 1 << kSubBits;
  static constexpr int kBuckets = 64 * kSub;

  void Record(uint64_t ns) {
    counts_[Index(ns)].fetch_add(1, std::memory_order_relaxed);
    total_.fetch_add(1, std::memory_order_relaxed);
    sum_.fetch_add(ns, std::memory_order_relaxed);
    uint64_t m = max_.load(std::memory_order_relaxed);
    while (ns > m && !max_.compare_exchange_weak(m, ns, std::memory_order_relaxed)) {}
  }

  uint64_t Count() const { return total_.load(std::memory_order_relaxed); }
  uint64_t Sum() const { return sum_.load(std::memory_order_relaxed); }
  uint64_t Max() const { return max_.load(std::memory_order_relaxed); }

  // How many observations lie in buckets wholly at or below `bound` (a
  // Prometheus bucket's count; at most one ~6% bucket short of exact).
  uint64_t CountAtMost(uint64_t bound) const {
    uint64_t n = 0;
    for (int i = 0; i < kBuckets && UpperEdge(i) <= bound; i++) n += counts_[i].load(std::memory_order_relaxed);
    return n;
  }

  // The upper edge of the bucket holding the q-quantile (0 < q <= 1); 0 when empty.
  uint64_t Quantile(double q) const {
    uint64_t total = Count();
    if (total == 0) return 0;
    uint64_t rank = static_cast<uint64_t>(q * static_cast<double>(total));
    if (rank == 0) rank = 1;
    uint64_t seen = 0;
    for (int i = 0; i < kBuckets; i++) {
      seen += counts_[i].load(std::memory_order_relaxed);
      if (seen >= rank) {
        uint64_t edge = UpperEdge(i);
        uint64_t m = Max();
        return edge < m ? edge : m;
      }
    }
    return Max();
  }

 private:
  static int Index(uint64_t v) {
    if (v < kSub) return static_cast<int>(v);
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - kSubBits;
    return ((shift + 1) << kSubBits) + static_cast<int>((v >> shift) & (kSub - 1));
  }
  static uint64_t UpperEdge(int index) {
    if (index < kSub) return static_cast<uint64_t>(index);
    int shift = (index >> kSubBits) - 1;
    uint64_t sub = static_cast<uint64_t>(index & (kSub - 1));
    return ((static_cast<uint64_t>(kSub) + sub + 1) << shift) - 1;
  }

  std::atomic<uint64_t> counts_[kBuckets] = {};
  std::atomic<uint64_t> total_{0}, sum_{0}, max_{0};
};

}  // namespace uffdpc
