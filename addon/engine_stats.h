// The destination engine's counters and fault-latency histogram, written by
// its parts as pages go in, read by stats() and latencyBuckets(). The keys of
// the stats object are lib/native.ts's EngineStats.
#pragma once
#include <napi.h>

#include <atomic>
#include <cstdint>

#include "histogram.h"

namespace uffdpc {

class TargetMap;

struct EngineStats {
  std::atomic<uint64_t> faults{0}, faultsResident{0}, minorFaults{0}, unexpected{0}, memoryEvents{0};           // the fault loop
  std::atomic<uint64_t> requestsSent{0}, requestsResent{0}, bytesReceived{0}, unmappedPages{0}, packedRuns{0};  // the remote supply
  std::atomic<uint64_t> installed[5] = {};                                                                      // per wire::Reason
  std::atomic<uint64_t> hugeInstalls{0};  // 2 MiB of own memory moved in whole as one transparent huge page
  std::atomic<uint64_t> zeroPages{0}, duplicates{0}, blockedNs{0}, retries{0}, removedPages{0}, zeroFilledAfterRemove{0}, poisonedPages{0};
  std::atomic<uint64_t> rewritten{0}, discarded{0}, switchoverNs{0};  // a live source's precopy
  LatencyHistogram latency;                                           // how long each waited-on fault waited

  // stats(): every counter, with the map's settled pages and times.
  Napi::Object ToJs(Napi::Env env, const TargetMap& map, uint32_t channelGeneration) const;
  // latencyBuckets(boundsNs): for each bound, the faults that waited at most that long.
  Napi::Array LatencyBuckets(Napi::Env env, Napi::Array bounds) const;
};

}  // namespace uffdpc
