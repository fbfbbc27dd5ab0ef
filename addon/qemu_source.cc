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
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "addon.h"
#include "bitmap.h"
#include "errors.h"
#include "events.h"
#include "histogram.h"
#include "image_pages.h"
#include "io.h"
#include "qemu_stream.h"
#include "threads.h"

namespace uffdpc {
namespace {

using namespace qemu;                       // the stream's constants (qemu_stream.h)
constexpr uint64_t kBackgroundPages = 256;  // a background part: 1 MiB of 4 KiB pages

struct Block {
  std::string name;
  ImagePages image;
  std::unique_ptr<AtomicBitmap> sent;
};

struct Request {
  uint32_t block;
  uint64_t first, count, atNs;
};

void PutBe(std::vector<uint8_t>& out, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; i--) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}

class QemuRamStream : public Napi::ObjectWrap<QemuRamStream> {
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
        block->sent = std::make_unique<AtomicBitmap>(block->image.pages);
        totalPages_ += block->image.pages;
        blocks_.push_back(std::move(block));
      }
    } catch (...) {
      for (auto& b : blocks_) b->image.Release();
      close(fd_);
      throw;
    }
    events_.Open(info.Env(), o.Get("onEvent").As<Napi::Function>(), "QemuRamStream");
  }

  ~QemuRamStream() override { Shutdown(); }

 private:
  Napi::Value Start(const Napi::CallbackInfo& info) {
    if (started_) return info.Env().Undefined();
    started_ = true;
    startNs_ = MonotonicNs();
    EnlargeSocketBuffer(fd_, SO_SNDBUF, SO_SNDBUFFORCE, 8 << 20);
    reader_ = std::thread([this] {
      NameAndPinThisThread("pc-qemu-rp", -1);
      ReadReturnPath();
    });
    writer_ = std::thread([this] {
      NameAndPinThisThread("pc-qemu-ram", -1);
      WriteStream();
    });
    return info.Env().Undefined();
  }

  Napi::Value Stop(const Napi::CallbackInfo& info) {
    Shutdown();
    return info.Env().Undefined();
  }

  void Shutdown() {
    if (stopped_) return;
    stopped_ = true;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      cv_.notify_all();
    }
    if (fd_ >= 0) shutdown(fd_, SHUT_RDWR);
    if (writer_.joinable()) writer_.join();
    if (reader_.joinable()) reader_.join();
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
    for (auto& b : blocks_) b->image.Release();
    events_.Close();
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
      std::lock_guard<std::mutex> lock(mu_);
      requests_.push_back({last, start / 4096, (length + 4095) / 4096, MonotonicNs()});
      cv_.notify_all();
    }
  }

  void Gone(int err) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stop_ && !shut_) {
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
    uint32_t bgBlock = 0;
    uint64_t bgPage = 0;
    while (sentPages_ < totalPages_) {
      Request req{UINT32_MAX, 0, 0, 0};
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || peerGone_ || violation_ || shut_ || !requests_.empty() || background_; });
        if (stop_ || shut_) return;
        if (peerGone_) return Emit("error", "ERR_PEER_GONE", "the destination QEMU closed the migration connection");
        if (violation_) return Emit("error", "ERR_PROTOCOL_OUT_OF_RANGE", violation_);
        if (!requests_.empty()) {
          req = requests_.front();
          requests_.pop_front();
        }
      }
      int err = 0;
      if (req.block != UINT32_MAX) {
        Block& b = *blocks_[req.block];
        uint64_t lo = req.first > windowBackward_ ? req.first - windowBackward_ : 0;
        uint64_t hi = std::min<uint64_t>(b.image.pages, req.first + req.count + windowForward_);
        err = Part(req.block, lo, hi, req.first, req.first + req.count);
        latency_.Record(MonotonicNs() - req.atNs);
      } else {
        while (bgBlock < blocks_.size() && bgPage >= blocks_[bgBlock]->image.pages) {
          bgBlock++;
          bgPage = 0;
        }
        if (bgBlock >= blocks_.size()) break;
        uint64_t end = std::min<uint64_t>(blocks_[bgBlock]->image.pages, bgPage + kBackgroundPages);
        err = Part(bgBlock, bgPage, end, 0, 0);
        bgPage = end;
      }
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
    bool answered = cv_.wait_for(lock, std::chrono::seconds(30), [&] { return stop_ || shut_ || peerGone_ || violation_; });
    if (stop_) return;
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

  // One `ram` section part: pages [lo, hi) of block `id` not sent yet, as
  // PAGE (straight from the mapped image) or ZERO records. Pages in
  // [askedLo, askedHi) count as on demand, the rest of a request as window.
  int Part(uint32_t id, uint64_t lo, uint64_t hi, uint64_t askedLo, uint64_t askedHi) {
    Block& b = *blocks_[id];
    std::vector<uint8_t> heads;
    heads.reserve(5 + (hi - lo) * (8 + 1 + 256) + 13);  // never reallocated: the iovecs point into it
    std::vector<iovec> iov;
    iov.reserve((hi - lo) * 2 + 2);
    size_t from = heads.size();
    heads.push_back(kSectionPart);
    PutBe(heads, section_, 4);
    bool any = false;
    for (uint64_t p = lo; p < hi; p++) {
      if (!b.sent->Claim(p)) continue;
      any = true;
      sentPages_++;
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
      if (p >= askedLo && p < askedHi)
        onDemand_++;
      else if (askedHi > askedLo)
        window_++;
      else
        backgroundPages_++;
    }
    if (!any) return 0;
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
      if (stop_) return;
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
  std::deque<Request> requests_;                         // under mu_
  bool stop_ = false, shut_ = false, peerGone_ = false;  // under mu_
  const char* violation_ = nullptr;                      // under mu_
  uint32_t shutStatus_ = 0;
  EventSink events_;
  std::thread reader_, writer_;
  bool started_ = false, stopped_ = false;
  uint64_t startNs_ = 0;
  LatencyHistogram latency_;
  std::atomic<uint64_t> sentPages_{0}, onDemand_{0}, window_{0}, backgroundPages_{0}, zeroPages_{0}, bytesSent_{0}, preambleNs_{0}, residentNs_{0};
};

}  // namespace

void InitQemuSource(Napi::Env env, Napi::Object exports) { exports.Set("QemuRamStream", QemuRamStream::Define(env)); }

}  // namespace uffdpc
