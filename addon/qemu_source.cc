// QEMU's postcopy migration stream from a snapshot, native: no JavaScript per
// page. Given the connection to a destination QEMU and the stream's preamble
// (header .. the packaged device state, built in server/qemu-source.ts), a
// writer thread sends the preamble, then the RAM in `ram` section parts:
// pages the destination asks for on the return path (and their window)
// first, the rest in the background; then the section's end and EOF. A
// reader thread parses the return path (REQ_PAGES_ID, REQ_PAGES, SHUT).
// The format is in docs/QEMU-SNAPSHOT.md ("Serving").
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "addon.h"
#include "bitmap.h"
#include "data_plane.h"
#include "errors.h"
#include "events.h"
#include "histogram.h"
#include "image_pages.h"
#include "io.h"
#include "page_scheduler.h"
#include "qemu_stream.h"
#include "threads.h"

namespace uffdpc {
namespace {

using namespace qemu;                       // the stream's constants (qemu_stream.h)
constexpr uint64_t kBackgroundPages = 256;  // a background part: 1 MiB of 4 KiB pages
constexpr int kBackgroundHoldMs = 200;      // the longest the background waits for the guest to ask for a page

struct Block {
  std::string name;
  ImagePages image;
};

void PutBe(std::vector<uint8_t>& out, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; i--) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}

class QemuRamStream : public Napi::ObjectWrap<QemuRamStream>, DataPlane {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(
        env, "QemuRamStream",
        {InstanceMethod<&QemuRamStream::Start>("start"), InstanceMethod<&QemuRamStream::Stop>("stop"), InstanceMethod<&QemuRamStream::Stats>("stats")});
  }

  // new QemuRamStream({fd, preamble: Buffer, section, blocks: [{name, spec}],
  //                    windowForward, windowBackward, background, onEvent});
  // checked in server/qemu-source.ts. Owns `fd` from here on.
  explicit QemuRamStream(const Napi::CallbackInfo& info) : Napi::ObjectWrap<QemuRamStream>(info) {
    Napi::Object o = info[0].As<Napi::Object>();
    fd_ = o.Get("fd").As<Napi::Number>().Int32Value();
    auto preamble = o.Get("preamble").As<Napi::Buffer<uint8_t>>();
    preamble_.assign(preamble.Data(), preamble.Data() + preamble.Length());
    section_ = o.Get("section").As<Napi::Number>().Uint32Value();
    windowForward_ = o.Get("windowForward").As<Napi::Number>().Uint32Value();
    windowBackward_ = o.Get("windowBackward").As<Napi::Number>().Uint32Value();
    background_ = o.Get("background").ToBoolean().Value();
    Napi::Array blocks = o.Get("blocks").As<Napi::Array>();
    try {
      for (uint32_t i = 0; i < blocks.Length(); i++) {
        Napi::Object b = blocks.Get(i).As<Napi::Object>();
        auto block = std::make_unique<Block>();
        block->name = b.Get("name").As<Napi::String>().Utf8Value();
        if (block->name.empty() || block->name.size() > 255) throw CodedError(info.Env(), "ERR_OUT_OF_RANGE", "a RAM block name is 1 to 255 bytes");
        block->image.Open(info.Env(), b.Get("spec").As<Napi::Object>());
        if (block->image.pageSize != 4096) throw CodedError(info.Env(), "ERR_UNSUPPORTED", "QEMU snapshots are served in 4 KiB pages");
        totalPages_ += block->image.pages;
        blocks_.push_back(std::move(block));
      }
    } catch (...) {
      for (auto& b : blocks_) b->image.Release();
      close(fd_);
      throw;
    }
    std::vector<PageScheduler::Region> shapes;
    for (auto& b : blocks_) shapes.push_back({b->image.pages, 1, wire::MaxRunPages(4096)});
    sched_ = std::make_unique<PageScheduler>(std::move(shapes), PageScheduler::Window{windowForward_, windowBackward_});
    sched_->WakeOnWork(mu_, cv_);
    try {
      OpenPlane(info.Env(), o.Get("onEvent").As<Napi::Function>(), "QemuRamStream");
    } catch (...) {
      for (auto& b : blocks_) b->image.Release();
      close(fd_);
      throw;
    }
    OwnSocket(fd_);
    WakeOnStop(mu_, cv_);
  }

  ~QemuRamStream() override { Shutdown(); }

 private:
  Napi::Value Start(const Napi::CallbackInfo& info) {
    if (started_ || Stopped()) return info.Env().Undefined();
    started_ = true;
    startNs_ = MonotonicNs();
    EnlargeSocketBuffer(fd_, SO_SNDBUF, SO_SNDBUFFORCE, 8 << 20);
    Spawn("pc-qemu-rp", -1, [this] { ReadReturnPath(); });
    Spawn("pc-qemu-ram", -1, [this] { WriteStream(); });
    return info.Env().Undefined();
  }

  Napi::Value Stop(const Napi::CallbackInfo& info) {
    Shutdown();
    return info.Env().Undefined();
  }

  void ReleaseReferences() override {
    for (auto& b : blocks_) b->image.Release();
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object s = Napi::Object::New(env);
    auto n = [&](const char* k, uint64_t v) { s.Set(k, Napi::Number::New(env, static_cast<double>(v))); };
    n("requests", latency_.Count());
    n("requestP50Ns", latency_.Quantile(0.5));
    n("requestP90Ns", latency_.Quantile(0.9));
    n("requestP99Ns", latency_.Quantile(0.99));
    n("pagesOnDemand", onDemand_);
    n("pagesWindow", window_);
    n("pagesBackground", backgroundPages_);
    n("zeroPages", zeroPages_);
    n("bytesSent", bytesSent_);
    n("preambleNs", preambleNs_);
    n("residentNs", residentNs_);
    n("totalPages", totalPages_);
    return s;
  }

  // ---- the return path ----

  void ReadReturnPath() {
    uint32_t last = UINT32_MAX;  // the block of the last request (REQ_PAGES names none)
    std::vector<uint8_t> data(65535);
    for (;;) {
      uint8_t head[4];
      int err = ReadFull(fd_, head, sizeof head);
      if (err) return Gone(err);
      uint16_t type = static_cast<uint16_t>(head[0] << 8 | head[1]), len = static_cast<uint16_t>(head[2] << 8 | head[3]);
      if ((err = ReadFull(fd_, data.data(), len))) return Gone(err);
      if (type == kRpShut) {
        uint32_t status = len >= 4 ? (uint32_t(data[0]) << 24 | uint32_t(data[1]) << 16 | uint32_t(data[2]) << 8 | data[3]) : 0;
        std::lock_guard<std::mutex> lock(mu_);
        shut_ = true;
        shutStatus_ = status;
        cv_.notify_all();
        return;
      }
      if (type == kRpPong) continue;
      if (type != kRpReqPagesId && type != kRpReqPages) continue;  // nothing else asks anything of a source serving a snapshot
      if (len < 12) return Violation("a page request shorter than its fields");
      uint64_t start = 0;
      for (int i = 0; i < 8; i++) start = start << 8 | data[i];
      uint32_t length = uint32_t(data[8]) << 24 | uint32_t(data[9]) << 16 | uint32_t(data[10]) << 8 | data[11];
      if (type == kRpReqPagesId) {
        if (len < 13 || len < 13 + data[12]) return Violation("a page request whose block name is cut short");
        std::string name(reinterpret_cast<const char*>(data.data() + 13), data[12]);
        last = UINT32_MAX;
        for (uint32_t b = 0; b < blocks_.size(); b++)
          if (blocks_[b]->name == name) last = b;
        if (last == UINT32_MAX) return Violation("a page request for a RAM block the snapshot does not hold");
      }
      if (last == UINT32_MAX) return Violation("a page request before any block was named");
      const Block& b = *blocks_[last];
      uint64_t bytes = b.image.pages * 4096;
      if (start % 4096 || length == 0 || start >= bytes || length > bytes - start) return Violation("a page request outside the snapshot's RAM");
      sched_->Queue({last, start / 4096, (length + 4095) / 4096, MonotonicNs()});
    }
  }

  void Gone(int err) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!Stopping() && !shut_) {
      peerGone_ = true;
      if (err > 0 && err != EPIPE && err != ECONNRESET)
        events_.Emit(ErrnoEvent("error", "return-path", err, "read", "reading the destination's return path failed"));
    }
    cv_.notify_all();
  }

  void Violation(const char* message) {
    std::lock_guard<std::mutex> lock(mu_);
    violation_ = message;
    cv_.notify_all();
  }

  // ---- the stream ----

  void WriteStream() {
    if (int err = WriteFull(fd_, preamble_.data(), preamble_.size())) return Failed(err, "writing the stream's preamble failed");
    bytesSent_ += preamble_.size();
    preambleNs_ = MonotonicNs() - startNs_;
    events_.Emit({"running", "", "", "", 0, {{"afterNs", double(preambleNs_.load())}}});
    PageRuns runs;
    // The background waits for the guest: until QEMU asks for its first page (the device state is in and the guest
    // touches its memory), or kBackgroundHoldMs at most. Sent at once, it would compete for QEMU's CPU (its thread that
    // places the pages) with the loading of the device state and the start of the guest.
    const auto holdUntil = std::chrono::steady_clock::now() + std::chrono::milliseconds(kBackgroundHoldMs);
    bool backgroundOpen = false;
    while (!sched_->AllClaimed()) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        auto ready = [&] { return Stopping() || peerGone_ || violation_ || shut_ || sched_->HasWork() || (background_ && backgroundOpen); };
        if (background_ && !backgroundOpen && !cv_.wait_until(lock, holdUntil, ready)) backgroundOpen = true;
        cv_.wait(lock, ready);
        if (Stopping() || shut_) return;
        if (peerGone_) return Emit("error", "ERR_PEER_GONE", "the destination QEMU closed the migration connection");
        if (violation_) return Emit("error", "ERR_PROTOCOL_OUT_OF_RANGE", violation_);
      }
      runs.clear();
      QueuedRequest req;
      bool asked = sched_->TakeRequest(&req);
      backgroundOpen = backgroundOpen || asked;
      if (asked) {
        sched_->Request(req.region, req.first, req.count, runs);
        sched_->Around(req.region, req.first, req.count, UINT64_MAX, runs);
      } else {
        PageRun run;
        if (!background_ || !sched_->NextBackgroundRun(kBackgroundPages, &run)) continue;
        runs.push_back(run);
      }
      int err = Part(runs);
      if (asked) latency_.Record(MonotonicNs() - req.atNs);
      if (err) return Failed(err, "writing RAM to the destination failed");
    }
    // Every page is out: the RAM section's end, and EOF. The destination answers SHUT.
    std::vector<uint8_t> tail;
    tail.push_back(kSectionEnd);
    PutBe(tail, section_, 4);
    PutBe(tail, kFlagEos, 8);
    tail.push_back(kSectionFooter);
    PutBe(tail, section_, 4);
    tail.push_back(kSectionEof);
    if (int err = WriteFull(fd_, tail.data(), tail.size())) return Failed(err, "writing the stream's end failed");
    bytesSent_ += tail.size();
    std::unique_lock<std::mutex> lock(mu_);
    bool answered = cv_.wait_for(lock, std::chrono::seconds(30), [&] { return Stopping() || shut_ || peerGone_ || violation_; });
    if (Stopping()) return;
    if (shut_) {
      residentNs_ = MonotonicNs() - startNs_;
      lock.unlock();
      events_.Emit({"done", "", "", "", 0, {{"status", double(shutStatus_)}}});
      return;
    }
    lock.unlock();
    if (!answered)
      return Emit("error", "ERR_TIMEOUT",
                  "the destination QEMU did not say it finished within 30 s of the last page (no shut on the return path); with postcopy-preempt on, it waits "
                  "for a second channel this source does not open: turn it off");
    Emit("error", peerGone_ ? "ERR_PEER_GONE" : "ERR_PROTOCOL_OUT_OF_RANGE", peerGone_ ? "the destination QEMU closed the migration connection" : violation_);
  }

  // One `ram` section part: the pages of `runs` (all of one block), in
  // address order, as PAGE (straight from the mapped image) or ZERO records.
  int Part(PageRuns& runs) {
    if (runs.empty()) return 0;
    std::sort(runs.begin(), runs.end(), [](const PageRun& a, const PageRun& b) { return a.first < b.first; });
    uint32_t id = runs[0].region;
    Block& b = *blocks_[id];
    uint64_t pages = 0;
    for (const PageRun& run : runs) pages += run.count;
    std::vector<uint8_t> heads;
    heads.reserve(5 + pages * (8 + 1 + 256) + 13);  // never reallocated: the iovecs point into it
    std::vector<iovec> iov;
    iov.reserve(pages * 2 + 2);
    size_t from = heads.size();
    heads.push_back(kSectionPart);
    PutBe(heads, section_, 4);
    for (const PageRun& run : runs) {
      for (uint64_t p = run.first; p < run.first + run.count; p++) {
        bool zero = b.image.IsZero(p);
        bool continues = lastBlock_ == id;
        PutBe(heads, p * 4096 | (zero ? kFlagZero : kFlagPage) | (continues ? kFlagContinue : 0), 8);
        if (!continues) {
          heads.push_back(static_cast<uint8_t>(b.name.size()));
          heads.insert(heads.end(), b.name.begin(), b.name.end());
          lastBlock_ = id;
        }
        if (zero) {
          heads.push_back(0);
          zeroPages_++;
        } else {
          iov.push_back({heads.data() + from, heads.size() - from});
          iov.push_back({const_cast<uint8_t*>(b.image.Page(p)), 4096});
          from = heads.size();
        }
      }
      (run.why == Why::kRequested ? onDemand_ : run.why == Why::kWindow ? window_ : backgroundPages_) += run.count;
    }
    PutBe(heads, kFlagEos, 8);
    heads.push_back(kSectionFooter);
    PutBe(heads, section_, 4);
    iov.push_back({heads.data() + from, heads.size() - from});
    size_t bytes = 0;
    for (auto& v : iov) bytes += v.iov_len;
    int err = WritevFull(fd_, iov.data(), static_cast<int>(iov.size()));
    if (!err) bytesSent_ += bytes;
    return err;
  }

  void Failed(int err, const char* message) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (Stopping()) return;
      if (peerGone_ || err == EPIPE || err == ECONNRESET) {
        events_.Emit({"error", "", "ERR_PEER_GONE", "the destination QEMU closed the migration connection"});
        return;
      }
    }
    events_.Emit(ErrnoEvent("error", "", err, "writev", message));
  }

  void Emit(const char* type, const char* code, const std::string& message) { events_.Emit({type, "", code, message}); }

  int fd_ = -1;
  std::vector<uint8_t> preamble_;
  uint32_t section_ = 0, windowForward_ = 0, windowBackward_ = 0;
  bool background_ = true;
  std::vector<std::unique_ptr<Block>> blocks_;
  uint64_t totalPages_ = 0;
  uint32_t lastBlock_ = UINT32_MAX;  // writer only: the block the last record named
  std::mutex mu_;
  std::condition_variable cv_;
  std::unique_ptr<PageScheduler> sched_;  // which pages go next; the return path fills its request queue
  bool shut_ = false, peerGone_ = false;  // under mu_
  const char* violation_ = nullptr;       // under mu_
  uint32_t shutStatus_ = 0;
  bool started_ = false;
  uint64_t startNs_ = 0;
  LatencyHistogram latency_;
  std::atomic<uint64_t> onDemand_{0}, window_{0}, backgroundPages_{0}, zeroPages_{0}, bytesSent_{0}, preambleNs_{0}, residentNs_{0};
};

}  // namespace

void InitQemuSource(Napi::Env env, Napi::Object exports) { exports.Set("QemuRamStream", QemuRamStream::Define(env)); }

}  // namespace uffdpc
