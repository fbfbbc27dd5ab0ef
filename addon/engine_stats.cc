#include "engine_stats.h"

#include "io.h"
#include "target_map.h"
#include "wire.h"

namespace uffdpc {

Napi::Object EngineStats::ToJs(Napi::Env env, const TargetMap& map, uint32_t channelGeneration) const {
  Napi::Object s = Napi::Object::New(env);
  auto n = [&](Napi::Object& into, const char* k, uint64_t v) { into.Set(k, Napi::Number::New(env, static_cast<double>(v))); };
  uint64_t startNs = map.startNs(), completeNs = map.completeNs(), switchedNs = switchoverNs.load();
  n(s, "faults", faults);
  n(s, "faultsOnResidentPages", faultsResident);
  n(s, "minorFaults", minorFaults);
  n(s, "pagesRequested", requestsSent);
  n(s, "pagesInstalledRequested", installed[wire::kRequested]);
  n(s, "pagesInstalledWindow", installed[wire::kWindow]);
  n(s, "pagesInstalledBackground", installed[wire::kBackground]);
  n(s, "pagesInstalledPrefetch", installed[wire::kPrefetch]);
  n(s, "pagesPrecopied", installed[wire::kPrecopy]);
  n(s, "pagesRewritten", rewritten);
  n(s, "pagesDiscarded", discarded);
  n(s, "switchoverNs", switchedNs ? switchedNs - startNs : 0);
  n(s, "zeroPages", zeroPages);
  n(s, "duplicatePages", duplicates);
  n(s, "bytesReceived", bytesReceived);
  n(s, "residentPages", map.residentPages());
  n(s, "totalPages", map.totalPages());
  n(s, "blockedNs", blockedNs);
  n(s, "elapsedNs", startNs ? MonotonicNs() - startNs : 0);
  n(s, "fullResidencyNs", completeNs ? completeNs - startNs : 0);
  n(s, "copyRetries", retries);
  n(s, "unexpectedFaults", unexpected);
  n(s, "memoryEvents", memoryEvents);
  n(s, "removedPages", removedPages);
  n(s, "zeroFilledAfterRemove", zeroFilledAfterRemove);
  n(s, "pagesOutsideRegions", unmappedPages);
  n(s, "packedRuns", packedRuns);
  n(s, "hugeInstalls", hugeInstalls);
  n(s, "outstandingRequests", map.OutstandingRequests());
  n(s, "requestsResent", requestsResent);
  n(s, "poisonedPages", poisonedPages);
  n(s, "channelGeneration", channelGeneration);
  Napi::Object lat = Napi::Object::New(env);
  n(lat, "count", latency.Count());
  n(lat, "p50Ns", latency.Quantile(0.50));
  n(lat, "p90Ns", latency.Quantile(0.90));
  n(lat, "p99Ns", latency.Quantile(0.99));
  n(lat, "maxNs", latency.Max());
  n(lat, "meanNs", latency.Count() ? latency.Sum() / latency.Count() : 0);
  n(lat, "sumNs", latency.Sum());
  s.Set("faultLatency", lat);
  return s;
}

Napi::Array EngineStats::LatencyBuckets(Napi::Env env, Napi::Array bounds) const {
  Napi::Array out = Napi::Array::New(env, bounds.Length());
  for (uint32_t i = 0; i < bounds.Length(); i++) {
    double b = bounds.Get(i).As<Napi::Number>().DoubleValue();
    uint64_t bound = b <= 0 ? 0 : b >= 1.8e19 ? UINT64_MAX : static_cast<uint64_t>(b);
    out.Set(i, Napi::Number::New(env, static_cast<double>(latency.CountAtMost(bound))));
  }
  return out;
}

}  // namespace uffdpc
