// A workload thread: touches pages of a region in a given order, timing each
// first touch. Tests use it to raise faults off the JS thread; benchmarks use it
// as the same workload the floor runs (one thread, every page once).
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <time.h>

#include <utility>

#include "addon.h"
#include "errors.h"
#include "mapping.h"

namespace uffdpc {
namespace {

inline uint64_t NowNs() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return static_cast<uint64_t>(t.tv_sec) * 1000000000ull + t.tv_nsec;
}

class TouchWorker : public Napi::AsyncWorker {
 public:
  TouchWorker(Napi::Env env, uintptr_t base, size_t pageSize, const uint32_t* order, size_t count, bool write, int cpu)
      : Napi::AsyncWorker(env),
        cpu_(cpu),
        deferred_(Napi::Promise::Deferred::New(env)),
        base_(base),
        pageSize_(pageSize),
        order_(order, order + count),
        write_(write),
        latency_(count),
        firstBytes_(count) {}
  Napi::Promise Promise() { return deferred_.Promise(); }

  // Holds the mapping the pages belong to: it cannot be unmapped while this
  // thread may still touch it.
  void Pin(Napi::Object mapping) {
    mapping_ = Mapping::Unwrap(mapping);
    mapping_->Pin();
    keepAlive_ = Napi::Persistent(mapping);
  }

  ~TouchWorker() override {
    if (mapping_) mapping_->Unpin();
  }

  void Execute() override {
    // A pool thread: pin it for this run only, then give its CPUs back.
    cpu_set_t old;
    bool pinned = false;
    if (cpu_ >= 0 && pthread_getaffinity_np(pthread_self(), sizeof old, &old) == 0) {
      cpu_set_t one;
      CPU_ZERO(&one);
      CPU_SET(cpu_, &one);
      pinned = pthread_setaffinity_np(pthread_self(), sizeof one, &one) == 0;
    }
    RunTouches();
    if (pinned) pthread_setaffinity_np(pthread_self(), sizeof old, &old);
  }

  void RunTouches() {
    startCpu_ = sched_getcpu();
    uint64_t t0 = NowNs();
    for (size_t k = 0; k < order_.size(); k++) {
      volatile uint8_t* p = reinterpret_cast<volatile uint8_t*>(base_ + order_[k] * pageSize_);
      uint64_t a = NowNs();
      // A locked cmpxchg is a write access whatever it compares, so write mode
      // raises write faults while leaving the byte as it was.
      uint8_t v = write_ ? __sync_val_compare_and_swap(p, 0, 0) : *p;
      latency_[k] = static_cast<double>(NowNs() - a);
      firstBytes_[k] = v;
    }
    totalNs_ = NowNs() - t0;
    endCpu_ = sched_getcpu();
  }

  void OnOK() override {
    Napi::Env env = Env();
    Napi::Object out = Napi::Object::New(env);
    auto lat = Napi::Float64Array::New(env, latency_.size());
    std::copy(latency_.begin(), latency_.end(), lat.Data());
    auto bytes = Napi::Uint8Array::New(env, firstBytes_.size());
    std::copy(firstBytes_.begin(), firstBytes_.end(), bytes.Data());
    out.Set("latencyNs", lat);
    out.Set("firstBytes", bytes);
    out.Set("totalNs", Napi::Number::New(env, static_cast<double>(totalNs_)));
    out.Set("startCpu", startCpu_);
    out.Set("endCpu", endCpu_);
    deferred_.Resolve(out);
  }

 private:
  int cpu_;
  Napi::Promise::Deferred deferred_;
  uintptr_t base_;
  size_t pageSize_;
  std::vector<uint32_t> order_;
  bool write_;
  std::vector<double> latency_;
  std::vector<uint8_t> firstBytes_;
  uint64_t totalNs_ = 0;
  int startCpu_ = -1, endCpu_ = -1;
  Mapping* mapping_ = nullptr;
  Napi::ObjectReference keepAlive_;
};

// touchPages(address, pageSize, order: Uint32Array, write, cpu, mapping?) -> Promise<{latencyNs, firstBytes, totalNs}>
// `mapping`, when given, is pinned until the touches are done.
Napi::Value TouchPages(const Napi::CallbackInfo& info) {
  auto order = info[2].As<Napi::Uint32Array>();
  auto* worker = new TouchWorker(info.Env(), static_cast<uintptr_t>(info[0].As<Napi::Number>().Int64Value()),
                                 static_cast<size_t>(info[1].As<Napi::Number>().Int64Value()), order.Data(), order.ElementLength(),
                                 info[3].As<Napi::Boolean>().Value(), info[4].IsNumber() ? info[4].As<Napi::Number>().Int32Value() : -1);
  if (info.Length() > 5 && info[5].IsObject()) {
    Napi::Object mapping = info[5].As<Napi::Object>();
    if (!Mapping::Unwrap(mapping)->mapped()) {
      delete worker;
      throw CodedError(info.Env(), "ERR_MAPPING_UNMAPPED", "the mapping was unmapped");
    }
    worker->Pin(mapping);
  }
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
}

// shuffledOrder(pages, seed): 0..pages-1 shuffled exactly as the floor does it
// (glibc srand/rand, Fisher-Yates from the end), so both run the same workload.
Napi::Value ShuffledOrder(const Napi::CallbackInfo& info) {
  uint32_t pages = info[0].As<Napi::Number>().Uint32Value();
  unsigned seed = info[1].As<Napi::Number>().Uint32Value();
  auto order = Napi::Uint32Array::New(info.Env(), pages);
  uint32_t* o = order.Data();
  for (uint32_t i = 0; i < pages; i++) o[i] = i;
  char state[128];
  random_data data{};
  initstate_r(seed, state, sizeof state, &data);
  for (size_t i = pages ? pages - 1 : 0; i > 0; i--) {
    int32_t r;
    random_r(&data, &r);
    size_t j = static_cast<size_t>(r) % (i + 1);
    std::swap(o[i], o[j]);
  }
  return order;
}

}  // namespace

void InitWorkload(Napi::Env env, Napi::Object exports) {
  exports.Set("touchPages", Napi::Function::New(env, TouchPages));
  exports.Set("shuffledOrder", Napi::Function::New(env, ShuffledOrder));
}

}  // namespace uffdpc
