// Byte layouts of the native data channels (docs/PROTOCOL.md, "Data channels").
// All fields little-endian. Both ends bounds-check every field before use.
//
//   urgent, destination -> source:  PageRequest, 16 bytes
//     u32 kind = kRequest   u32 region   u64 page
//
//   urgent and bulk, source -> destination:  RunHeader, 24 bytes
//     u32 kind (kDataRun | kZeroRun | kBulkEnd | kDiscardRun | kDiscardMark | kSwitchover)   u32 region
//     u64 first_page   u32 count   u32 reason (kRequested | kWindow | kBackground | kPrefetch | kPrecopy)
//   kDataRun is followed by count * page_size bytes of page data; the others
//   by nothing. kBulkEnd (bulk only) says every page has been sent. A live
//   source's precopy (bulk only): data and zero runs with reason kPrecopy
//   (a page sent again replaces the one sent before), then at the switchover
//   kDiscardRun (pages written since they were sent: missing again) and one
//   kSwitchover (the workload runs at the destination from now on). Before
//   it, discard rounds (kDiscardRun runs while the workload still runs) each
//   end with a kDiscardMark (count: the round's number) when the destination
//   asked for them: it answers `dropped` once every run before it is applied.
//   kPackedRun (bulk only, to a destination that asked for packed runs) is a
//   data run compressed: u32 packed length, then that many bytes, one zstd
//   frame that unpacks to exactly count * page_size bytes.
#pragma once
#include <cstdint>

namespace uffdpc::wire {

constexpr uint32_t kRequest = 0x51455250;      // "PREQ"
constexpr uint32_t kDataRun = 0x41544144;      // "DATA"
constexpr uint32_t kZeroRun = 0x4f52455a;      // "ZERO"
constexpr uint32_t kBulkEnd = 0x20444e45;      // "END "
constexpr uint32_t kDiscardRun = 0x43534944;   // "DISC"
constexpr uint32_t kSwitchover = 0x48435753;   // "SWCH"
constexpr uint32_t kDiscardMark = 0x4b52414d;  // "MARK"
constexpr uint32_t kPackedRun = 0x4b434150;    // "PACK"

// kPrefetch: a page of a replayed working set, streamed ahead of the background.
// kPrecopy: a page of a live source's precopy round, sent while the workload runs there.
enum Reason : uint32_t { kRequested = 0, kWindow = 1, kBackground = 2, kPrefetch = 3, kPrecopy = 4 };

struct PageRequest {
  uint32_t kind;
  uint32_t region;
  uint64_t page;
};
static_assert(sizeof(PageRequest) == 16);

struct RunHeader {
  uint32_t kind;
  uint32_t region;
  uint64_t first_page;
  uint32_t count;
  uint32_t reason;
};
static_assert(sizeof(RunHeader) == 24);

// The largest run on the wire, in bytes; a run holds at most this / page_size
// pages (at least one). Receivers size their buffers from it.
constexpr uint64_t kMaxRunBytes = 2u << 20;

inline uint32_t MaxRunPages(uint64_t pageSize) {
  uint64_t n = kMaxRunBytes / pageSize;
  return n ? static_cast<uint32_t>(n) : 1;
}

}  // namespace uffdpc::wire
