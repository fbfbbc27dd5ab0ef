// The destination's data plane. A fault thread reads the userfaultfd and sends
// one request per missing page (however many threads fault on it); a receiver
// thread per data channel reads runs and installs each contiguous run with one
// UFFDIO_COPY / UFFDIO_ZEROPAGE, keeping the received bitmap, the latency
// histogram and the counters. No JavaScript runs per page.
//
// The data channels come and go while the engine lives: attachChannels()
// starts receivers on a new pair (a new generation) and has the fault thread
// re-send every request still unanswered; detachChannels() stops them. In
// between (a paused session) the fault thread keeps reading the userfaultfd:
// faults are recorded as requested and wait, memory events are followed, and
// nothing that arrived only in part is ever installed.
//
// Where missing pages come from is chosen once, when the engine is built (a
// PageSupply): a remote source over the data channels (RemoteSupply), or an
// image mapped in this process (ImageSupply), whose pages the fault thread
// installs itself while a fill thread installs the prefault window, a
// replayed working set and the background, in that order of priority.
#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "addon.h"
#include "bitmap.h"
#include "errors.h"
#include "events.h"
#include "histogram.h"
#include "image_pages.h"
#include "page_array.h"
#include "page_checksum.h"
#include "secure_channel.h"
#include "threads.h"
#include "io.h"
#include "uffd_abi.h"
#include "wire.h"

namespace uffdpc {
namespace {

// A range of the faulting process's memory, backed by pages
// [sourcePage, sourcePage + pages) of source region `sourceRegion`.
struct TargetRegion {
  std::atomic<uint64_t> base{0};  // page 0's address while the region is in one piece (it moves on REMAP)
  uint64_t length = 0, pageSize = 0, pages = 0;
  // Where the region's pages are once the process moved part of it (mremap):
  // pages [first, first+pages) at `address`, sorted by first. Empty while it is
  // in one piece (at `base`). Read under piecesMu; moves are rare.
  struct Piece {
    uint64_t first, pages, address;
  };
  std::atomic<bool> split{false};
  mutable std::mutex piecesMu;
  std::vector<Piece> pieces;
  // Page p's address now; `run` (if given): how many pages from p on lie contiguous there.
  uint64_t AddressOf(uint64_t p, uint64_t* run = nullptr) const {
    if (!split.load(std::memory_order_acquire)) {
      if (run) *run = pages - p;
      return base.load(std::memory_order_acquire) + p * pageSize;
    }
    std::lock_guard<std::mutex> lock(piecesMu);
    for (const Piece& x : pieces)
      if (p >= x.first && p < x.first + x.pages) {
        if (run) *run = x.first + x.pages - p;
        return x.address + (p - x.first) * pageSize;
      }
    if (run) *run = 1;
    return 0;  // not reached: the pieces cover every page
  }
  // The region's pieces now (one while it is whole).
  std::vector<Piece> Pieces() const {
    if (!split.load(std::memory_order_acquire)) return {{0, pages, base.load(std::memory_order_acquire)}};
    std::lock_guard<std::mutex> lock(piecesMu);
    return pieces;
  }
  // The page at `address`, when the region holds it.
  bool PageAt(uint64_t address, uint64_t* page) const {
    for (const Piece& x : Pieces())
      if (address >= x.address && address < x.address + x.pages * pageSize) {
        *page = x.first + (address - x.address) / pageSize;
        return true;
      }
    return false;
  }
  // The process moved [from, from+len) to `to` (mremap): the pages there follow. Returns whether any did.
  bool Move(uint64_t from, uint64_t to, uint64_t len) {
    std::vector<Piece> now = Pieces(), next;
    bool moved = false;
    for (const Piece& x : now) {
      uint64_t lo = std::max(from, x.address), hi = std::min(from + len, x.address + x.pages * pageSize);
      if (lo >= hi) {
        next.push_back(x);
        continue;
      }
      moved = true;
      uint64_t a = x.first + (lo - x.address) / pageSize, b = x.first + (hi - x.address + pageSize - 1) / pageSize;
      if (a > x.first) next.push_back({x.first, a - x.first, x.address});
      next.push_back({a, b - a, to + (lo - from)});
      if (b < x.first + x.pages) next.push_back({b, x.first + x.pages - b, x.address + (b - x.first) * pageSize});
    }
    if (!moved) return false;
    std::sort(next.begin(), next.end(), [](const Piece& l, const Piece& r) { return l.first < r.first; });
    std::vector<Piece> merged;  // neighbours that are contiguous in memory again become one piece
    for (const Piece& x : next) {
      if (!merged.empty() && merged.back().address + merged.back().pages * pageSize == x.address)
        merged.back().pages += x.pages;
      else
        merged.push_back(x);
    }
    std::lock_guard<std::mutex> lock(piecesMu);
    if (merged.size() == 1) {  // in one piece again (a whole region moved): the fast path
      base.store(merged[0].address, std::memory_order_release);
      split.store(false, std::memory_order_release);
      pieces.clear();
    } else {
      pieces = std::move(merged);
      split.store(true, std::memory_order_release);
    }
    return true;
  }
  uint32_t index = 0;  // among the engine's regions
  uint32_t sourceRegion = 0;
  uint64_t sourcePage = 0;
  uint64_t ratio = 1;  // source pages per page here (512: a 2 MiB huge page from a 4 KiB-page image)
  // The first source page behind page p of this region.
  uint64_t SourceOf(uint64_t p) const { return sourcePage + p * ratio; }
  // Source pages this region covers.
  uint64_t SourceSpan() const { return pages * ratio; }
  std::unique_ptr<AtomicBitmap> received, requested;
  std::unique_ptr<AtomicBitmap> removed;             // given back by the process (REMOVE/UNMAP): zero-filled, never fetched
  std::unique_ptr<AtomicBitmap> settled;             // resident or given back: counted toward completion exactly once
  std::unique_ptr<AtomicBitmap> checked;             // installed here from the source's data: in the installed-pages checksum
  std::unique_ptr<LazyPageArray<uint64_t>> faultNs;  // first fault time of a waited-on page, 0 if none
  std::unique_ptr<LazyPageArray<uint32_t>> waiters;  // faults seen on the page while it was missing
  // MINOR mode: the guest's memory file mapped in this process too. Contents
  // go into the page cache through it, and the guest's threads are released
  // with UFFDIO_CONTINUE (null: pages are installed with UFFDIO_COPY).
  uint8_t* fill = nullptr;
  std::shared_ptr<AtomicBitmap> cached;  // MINOR mode: the page's contents are in the page cache (shared with a template's clones)
};

// Counts the installs under way (see InstalledChecksum).
struct InstallingNow {
  explicit InstallingNow(std::atomic<int>& n) : n_(n) { n_.fetch_add(1); }
  ~InstallingNow() { n_.fetch_sub(1); }
  std::atomic<int>& n_;
};

// What an install came to: done; the layout is changing and the caller may not
// wait (retry elsewhere); or the engine must stop installing.
enum InstallResult { kOk, kBusy, kStop };

class FaultEngine : public Napi::ObjectWrap<FaultEngine> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "FaultEngine",
                       {InstanceMethod<&FaultEngine::Start>("start"), InstanceMethod<&FaultEngine::Stop>("stop"),
                        InstanceMethod<&FaultEngine::AttachChannels>("attachChannels"), InstanceMethod<&FaultEngine::DetachChannels>("detachChannels"),
                        InstanceMethod<&FaultEngine::PoisonMissing>("poisonMissing"), InstanceMethod<&FaultEngine::Stats>("stats"),
                        InstanceMethod<&FaultEngine::ReceivedBitmap>("receivedBitmap"), InstanceMethod<&FaultEngine::HeldBitmap>("heldBitmap"),
                        InstanceMethod<&FaultEngine::MarkResident>("markResident"), InstanceMethod<&FaultEngine::InstalledChecksum>("installedChecksum"),
                        InstanceMethod<&FaultEngine::LatencyBuckets>("latencyBuckets"), InstanceMethod<&FaultEngine::Prefetch>("prefetch"),
                        InstanceMethod<&FaultEngine::StartBackground>("startBackground"), InstanceMethod<&FaultEngine::FaultedPages>("faultedPages")});
  }

  // new FaultEngine({uffd, sourceRegions: [{pages, pageSize}],
  //                  regions: [{base, length, pageSize, sourceRegion, sourcePage}], cpu,
  //                  checksumInstalled, recordFaults, onEvent,
  //                  image?: [ServedRegionSpec per source region], window?: {forward, backward}, background?});
  // validated in client/fault-engine.ts. The engine owns the data channels it
  // is given (attachChannels), not the uffd. With `image`, pages come from it
  // (ImageSupply) and the engine takes no data channels.
  explicit FaultEngine(const Napi::CallbackInfo& info) : Napi::ObjectWrap<FaultEngine>(info) {
    Napi::Object o = info[0].As<Napi::Object>();
    // A template's filler serves no process: it has no userfaultfd.
    fillsTemplate_ = o.Get("fillsTemplate").ToBoolean().Value();
    if (!fillsTemplate_) {
      uffd_ = o.Get("uffd").As<Napi::Number>().Int32Value();
      // poll() on a blocking userfaultfd always reports POLLERR; the engine is
      // the fd's only reader, so it makes it non-blocking.
      int fl = fcntl(uffd_, F_GETFL);
      if (fl < 0 || fcntl(uffd_, F_SETFL, fl | O_NONBLOCK) < 0) ThrowErrno(info.Env(), errno, "fcntl", "F_SETFL");
    }
    Napi::Array sources = o.Get("sourceRegions").As<Napi::Array>();
    for (uint32_t i = 0; i < sources.Length(); i++) {
      Napi::Object r = sources.Get(i).As<Napi::Object>();
      sourcePages_.push_back(static_cast<uint64_t>(r.Get("pages").As<Napi::Number>().Int64Value()));
      sourcePageSize_.push_back(static_cast<uint64_t>(r.Get("pageSize").As<Napi::Number>().Int64Value()));
    }
    Napi::Array regions = o.Get("regions").As<Napi::Array>();
    for (uint32_t i = 0; i < regions.Length(); i++) {
      Napi::Object r = regions.Get(i).As<Napi::Object>();
      auto t = std::make_unique<TargetRegion>();
      t->index = i;
      t->base = static_cast<uint64_t>(r.Get("base").As<Napi::Number>().Int64Value());
      t->sourceRegion = r.Get("sourceRegion").As<Napi::Number>().Uint32Value();
      t->sourcePage = static_cast<uint64_t>(r.Get("sourcePage").As<Napi::Number>().Int64Value());
      t->length = static_cast<uint64_t>(r.Get("length").As<Napi::Number>().Int64Value());
      t->pageSize = static_cast<uint64_t>(r.Get("pageSize").As<Napi::Number>().Int64Value());
      t->pages = t->length / t->pageSize;
      t->ratio = t->pageSize / sourcePageSize_[t->sourceRegion];  // checked in TypeScript: a power of two, at least 1
      Napi::Value fill = r.Get("fillAddress");
      if (fill.IsNumber() && fill.As<Napi::Number>().Int64Value() != 0) {
        t->fill = reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(fill.As<Napi::Number>().Int64Value()));
        t->cached = std::make_shared<AtomicBitmap>(t->pages);
      }
      t->received = std::make_unique<AtomicBitmap>(t->pages);
      t->requested = std::make_unique<AtomicBitmap>(t->pages);
      t->removed = std::make_unique<AtomicBitmap>(t->pages);
      t->settled = std::make_unique<AtomicBitmap>(t->pages);
      t->checked = std::make_unique<AtomicBitmap>(t->pages);
      t->faultNs = std::make_unique<LazyPageArray<uint64_t>>(t->pages);
      t->waiters = std::make_unique<LazyPageArray<uint32_t>>(t->pages);
      totalPages_ += t->pages;
      maxRunBytes_ = std::max<uint64_t>(maxRunBytes_, wire::MaxRunPages(t->pageSize) * t->pageSize);
      regions_.push_back(std::move(t));
    }
    // calloc of this size maps fresh zero pages: no memory is touched until read.
    zeros_.reset(static_cast<uint8_t*>(calloc(1, maxRunBytes_)));
    checksum_.reset(new std::atomic<uint64_t>[sourcePages_.size()]());
    for (uint64_t size : sourcePageSize_) zeroHash_.push_back(size <= maxRunBytes_ ? ContentHash(zeros_.get(), size) : 0);
    checksumInstalled_ = o.Get("checksumInstalled").ToBoolean().Value();
    // A live source: precopy rounds come first; the memory is this process's own (restore), written directly.
    precopy_.store(o.Get("precopy").ToBoolean().Value());
    ownMemory_ = o.Get("ownMemory").ToBoolean().Value();
    recordFaults_ = o.Get("recordFaults").ToBoolean().Value();
    if (fillsTemplate_) {  // checked in TypeScript: one region per source region, each whole, in the file's mapping
      template_ = std::make_shared<TemplateShare>();
      template_->filler = this;
      for (auto& r : regions_) {
        template_->cached.push_back(r->cached);
        template_->contents.push_back(r->fill);
      }
    }
    Napi::Value clone = o.Get("template");
    if (clone.IsObject()) {
      FaultEngine* filler = FaultEngine::Unwrap(clone.As<Napi::Object>());
      if (!filler->fillsTemplate_ || filler->stopped_ || filler->sourcePageSize_ != sourcePageSize_ || filler->sourcePages_ != sourcePages_)
        throw CodedError(info.Env(), "ERR_ENGINE_STATE", "a clone needs a running template engine over the same image");
      for (auto& r : regions_)
        if (r->ratio != 1 || r->fill) throw CodedError(info.Env(), "ERR_UNSUPPORTED", "a template's clone maps the image's own pages, privately");
      template_ = filler->template_;
    }
    demandFd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (demandFd_ < 0) ThrowErrno(info.Env(), errno, "eventfd");
    Napi::Value image = o.Get("image");
    if (IsClone()) {
      supply_ = std::make_unique<TemplateSupply>(*this);
    } else if (image.IsArray()) {
      Napi::Array specs = image.As<Napi::Array>();
      if (specs.Length() != sourcePages_.size()) throw CodedError(info.Env(), "ERR_IMAGE_INVALID", "the image needs one region per source region");
      try {
        for (uint32_t i = 0; i < specs.Length(); i++) {
          auto pages = std::make_unique<ImagePages>();
          pages->Open(info.Env(), specs.Get(i).As<Napi::Object>());
          image_.push_back(std::move(pages));
          if (image_.back()->pages != sourcePages_[i] || image_.back()->pageSize != sourcePageSize_[i])
            throw CodedError(info.Env(), "ERR_IMAGE_INVALID", "an image region does not match its source region");
        }
        // The working set's pages, looked up by the fault thread: allocated once, here.
        for (uint64_t pages : sourcePages_) prefetchSet_.push_back(std::make_unique<AtomicBitmap>(pages));
        // A working set to replay is here before the fill thread starts: not one background run goes ahead of it.
        Napi::Value prefetch = o.Get("prefetch");
        if (prefetch.IsTypedArray()) AddPrefetch(info.Env(), prefetch.As<Napi::TypedArrayOf<uint8_t>>());
      } catch (...) {
        for (auto& pages : image_) pages->Release();  // the destructor does not run when a constructor throws
        throw;
      }
      Napi::Object window = o.Get("window").As<Napi::Object>();
      windowForward_ = window.Get("forward").As<Napi::Number>().Uint32Value();
      windowBackward_ = window.Get("backward").As<Napi::Number>().Uint32Value();
      backgroundOn_ = o.Get("background").ToBoolean().Value();
      supply_ = std::make_unique<ImageSupply>(*this);
    } else {
      supply_ = std::make_unique<RemoteSupply>(*this);
    }
    Napi::Value cpu = o.Get("cpu");
    cpu_ = cpu.IsNumber() ? cpu.As<Napi::Number>().Int32Value() : -1;
    stopFd_ = eventfd(0, EFD_CLOEXEC);
    if (stopFd_ < 0) ThrowErrno(info.Env(), errno, "eventfd");
    resendFd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (resendFd_ < 0) {
      int err = errno;
      close(stopFd_);
      close(demandFd_);
      ThrowErrno(info.Env(), err, "eventfd");
    }
    events_.Open(info.Env(), o.Get("onEvent").As<Napi::Function>(), "FaultEngine");
  }

  ~FaultEngine() override { Shutdown(); }

 private:
  // start(): the fault thread runs from now on; pages flow once channels are attached.
  Napi::Value Start(const Napi::CallbackInfo& info) {
    if (started_ || stopped_) return info.Env().Undefined();
    started_ = true;
    startNs_ = MonotonicNs();
    if (IsClone()) JoinTemplate();
    faultThread_ = std::thread([this] {
      NameAndPinThisThread("pc-fault", cpu_);
      FaultLoop();
    });
    if (!image_.empty())
      fillThread_ = std::thread([this] {
        NameAndPinThisThread("pc-fill", cpu_);
        FillLoop();
      });
    return info.Env().Undefined();
  }

  // attachChannels(urgentFd, bulkFd, keys?) -> generation. The engine owns
  // both fds from this call on (it closes them even when it refuses them).
  // keys: {urgentDown, urgentUp, bulkDown}, 32 bytes each: the channels carry
  // sealed records (addon/secure_channel.h).
  Napi::Value AttachChannels(const Napi::CallbackInfo& info) {
    int urgent = info[0].As<Napi::Number>().Int32Value();
    int bulk = info[1].As<Napi::Number>().Int32Value();
    bool encrypted = info.Length() > 2 && info[2].IsObject();
    uint8_t urgentDown[32], urgentUp[32], bulkDown[32];
    bool badKeys = false;
    if (encrypted) {
      Napi::Object k = info[2].As<Napi::Object>();
      for (auto [name, into] : {std::pair{"urgentDown", urgentDown}, std::pair{"urgentUp", urgentUp}, std::pair{"bulkDown", bulkDown}}) {
        Napi::Value v = k.Get(name);
        if (!v.IsBuffer() || v.As<Napi::Buffer<uint8_t>>().Length() != 32) {
          badKeys = true;
          break;
        }
        std::memcpy(into, v.As<Napi::Buffer<uint8_t>>().Data(), 32);
      }
    }
    if (!started_ || stopped_ || attached_ || badKeys || !image_.empty()) {
      close(urgent);
      close(bulk);
      if (badKeys) throw CodedError(info.Env(), "ERR_OUT_OF_RANGE", "a data-channel key must be a 32-byte Buffer");
      if (!image_.empty()) throw CodedError(info.Env(), "ERR_ENGINE_STATE", "an engine serving a local image takes no data channels");
      throw CodedError(info.Env(), "ERR_ENGINE_STATE", attached_ ? "data channels are already attached" : "the engine is not running");
    }
    auto key = [&](const uint8_t* k, uint32_t direction, bool seal) { return encrypted ? std::make_unique<Aead>(k, direction, seal) : nullptr; };
    EnlargeSocketBuffer(bulk, SO_RCVBUF, SO_RCVBUFFORCE, 8 << 20);
    uint32_t generation = generation_.load() + 1;
    {
      // The generation first: a write that fails on the new fd reports the new generation.
      std::lock_guard<std::mutex> lock(urgentMu_);
      generation_.store(generation);
      urgentFd_.store(urgent);
      urgentWriter_ = std::make_unique<ChannelWriter>(urgent, key(urgentUp, kUrgentUp, true));
      urgentBroken_ = false;
    }
    bulkFd_ = bulk;
    attached_ = true;
    auto urgentIn = std::make_shared<ChannelReader>(urgent, key(urgentDown, kUrgentDown, false));
    auto bulkIn = std::make_shared<ChannelReader>(bulk, key(bulkDown, kBulkDown, false));
    urgentThread_ = std::thread([this, urgentIn, generation] {
      NameAndPinThisThread("pc-urgent-rx", cpu_);
      ReceiveLoop(*urgentIn, "urgent", generation);
    });
    bulkThread_ = std::thread([this, bulkIn, generation] {
      NameAndPinThisThread("pc-bulk-rx", cpu_);
      ReceiveLoop(*bulkIn, "bulk", generation);
    });
    // Requests the old channels never answered go out first, from the fault thread.
    uint64_t one = 1;
    if (write(resendFd_, &one, sizeof one) < 0) {}
    return Napi::Number::New(info.Env(), generation);
  }

  // detachChannels(): stops the receivers and closes the channels. A run that
  // arrived only in part is dropped; faults keep waiting for the next attach.
  Napi::Value DetachChannels(const Napi::CallbackInfo& info) {
    Detach();
    return info.Env().Undefined();
  }

  void Detach() {
    if (!attached_) return;
    detaching_.store(true);
    // Unblocks a receiver in read() and a fault thread in write(); the fds stay
    // open (so their numbers cannot be reused) until the threads let go.
    shutdown(urgentFd_.load(), SHUT_RDWR);
    shutdown(bulkFd_, SHUT_RDWR);
    for (std::thread* t : {&urgentThread_, &bulkThread_})
      if (t->joinable()) t->join();
    {
      std::lock_guard<std::mutex> lock(urgentMu_);
      close(urgentFd_.load());
      urgentFd_.store(-1);
      urgentWriter_.reset();
    }
    close(bulkFd_);
    bulkFd_ = -1;
    attached_ = false;
    detaching_.store(false);
  }

  Napi::Value Stop(const Napi::CallbackInfo& info) {
    Shutdown();
    return info.Env().Undefined();
  }

  void Shutdown() {
    if (stopped_) return;
    stopped_ = true;
    LeaveTemplate();
    Detach();
    stop_.store(true);
    uint64_t one = 1;
    if (write(stopFd_, &one, sizeof one) < 0) {}
    {
      std::lock_guard<std::mutex> lock(fillMu_);
      fillCv_.notify_all();
    }
    if (faultThread_.joinable()) faultThread_.join();
    if (fillThread_.joinable()) fillThread_.join();
    for (auto& pages : image_) pages->Release();
    for (int fd : {stopFd_, resendFd_, demandFd_})
      if (fd >= 0) close(fd);
    stopFd_ = resendFd_ = demandFd_ = -1;
    events_.Close();
  }

  // poisonMissing() -> pages poisoned. Gives up on every page not resident and
  // not given back: UFFDIO_POISON makes a touch raise SIGBUS instead of
  // waiting forever or reading zeros; threads waiting on them are woken into
  // that SIGBUS once all are poisoned. Call with the channels detached.
  Napi::Value PoisonMissing(const Napi::CallbackInfo& info) {
    if (attached_) throw CodedError(info.Env(), "ERR_ENGINE_STATE", "detach the data channels before poisoning");
    uint64_t poisoned = 0;
    int firstError = 0;
    for (auto& r : regions_) {
      for (uint64_t p = r->settled->NextClear(0); p < r->pages && firstError != ESRCH; p = r->settled->NextClear(p)) {
        uint64_t run = 0;
        uint64_t base = r->AddressOf(p, &run) - p * r->pageSize;  // of this piece: pages up to p+run lie contiguous
        uint64_t q = p + 1;
        while (q < r->pages && q < p + run && !r->settled->Test(q)) q++;
        // ESRCH: the process died (most likely of the SIGBUS just raised); other
        // errors (a page it unmapped) skip that page and go on with the rest.
        while (p < q) {
          uint64_t done = 0;  // pages poisoned from p on
          int err = Poison(base + p * r->pageSize, (q - p) * r->pageSize, r->pageSize, &done);
          for (uint64_t k = p; k < p + done; k++)
            if (r->settled->Claim(k)) poisoned++;
          if (!err) break;
          if (!firstError) firstError = err;
          if (err == ESRCH) break;
          p += done + 1;
        }
        p = q;
      }
    }
    // Every missing page is poisoned before any waiting thread wakes (into
    // its SIGBUS), so a guest that survives one SIGBUS finds no page to hang on.
    for (auto& r : regions_)
      for (const auto& x : r->Pieces()) {
        uffdio_range range{x.address, x.pages * r->pageSize};
        ioctl(uffd_, UFFDIO_WAKE, &range);
      }
    poisonedPages_ += poisoned;
    if (firstError && firstError != ESRCH && poisoned == 0) ThrowErrno(info.Env(), firstError, "ioctl", "UFFDIO_POISON");
    return Napi::Number::New(info.Env(), static_cast<double>(poisoned));
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object s = Napi::Object::New(env);
    auto n = [&](Napi::Object& into, const char* k, uint64_t v) { into.Set(k, Napi::Number::New(env, static_cast<double>(v))); };
    n(s, "faults", faults_);
    n(s, "faultsOnResidentPages", faultsResident_);
    n(s, "minorFaults", minorFaults_);
    n(s, "pagesRequested", requestsSent_);
    n(s, "pagesInstalledRequested", installed_[wire::kRequested]);
    n(s, "pagesInstalledPrefault", installed_[wire::kPrefault]);
    n(s, "pagesInstalledBackground", installed_[wire::kBackground]);
    n(s, "pagesInstalledPrefetch", installed_[wire::kPrefetch]);
    n(s, "pagesPrecopied", installed_[wire::kPrecopy]);
    n(s, "pagesRewritten", rewritten_);
    n(s, "pagesDiscarded", discarded_);
    n(s, "switchoverNs", switchoverNs_ ? switchoverNs_ - startNs_ : 0);
    n(s, "zeroPages", zeroPages_);
    n(s, "duplicatePages", duplicates_);
    n(s, "bytesReceived", bytesReceived_);
    n(s, "residentPages", resident_);
    n(s, "totalPages", totalPages_);
    n(s, "blockedNs", blockedNs_);
    n(s, "elapsedNs", startNs_ ? MonotonicNs() - startNs_ : 0);
    n(s, "fullResidencyNs", completeNs_ ? completeNs_ - startNs_ : 0);
    n(s, "copyRetries", retries_);
    n(s, "unexpectedFaults", unexpected_);
    n(s, "memoryEvents", memoryEvents_);
    n(s, "removedPages", removedPages_);
    n(s, "zeroFilledAfterRemove", zeroFilledAfterRemove_);
    n(s, "pagesOutsideRegions", unmappedPages_);
    n(s, "outstandingRequests", OutstandingRequests());
    n(s, "requestsResent", requestsResent_);
    n(s, "poisonedPages", poisonedPages_);
    n(s, "channelGeneration", generation_);
    Napi::Object lat = Napi::Object::New(env);
    n(lat, "count", latency_.Count());
    n(lat, "p50Ns", latency_.Quantile(0.50));
    n(lat, "p90Ns", latency_.Quantile(0.90));
    n(lat, "p99Ns", latency_.Quantile(0.99));
    n(lat, "maxNs", latency_.Max());
    n(lat, "meanNs", latency_.Count() ? latency_.Sum() / latency_.Count() : 0);
    n(lat, "sumNs", latency_.Sum());
    s.Set("faultLatency", lat);
    return s;
  }

  // receivedBitmap(region) -> Buffer, one bit per page (bit p of byte p/8).
  Napi::Value ReceivedBitmap(const Napi::CallbackInfo& info) {
    uint32_t id = info[0].As<Napi::Number>().Uint32Value();
    if (id >= regions_.size()) throw CodedError(info.Env(), "ERR_OUT_OF_RANGE", "no such region");
    const TargetRegion& r = *regions_[id];
    auto out = Napi::Buffer<uint8_t>::New(info.Env(), (r.pages + 7) / 8);
    std::memset(out.Data(), 0, out.Length());
    for (uint64_t p = 0; p < r.pages; p++)
      if (r.received->Test(p)) out.Data()[p / 8] |= static_cast<uint8_t>(1u << (p % 8));
    return out;
  }

  // Poisons [address, address+length); pages that turn out to be present
  // (EEXIST: installed meanwhile) are stepped over. 0 or an errno; `*pages`
  // counts the pages poisoned (or found present) before it stopped.
  int Poison(uint64_t address, uint64_t length, uint64_t pageSize, uint64_t* pages) {
    uint64_t start = address, end = address + length;
    int retries = 0, err = 0;
    while (address < end) {
      uffdio_poison z{{address, end - address}, UFFDIO_POISON_MODE_DONTWAKE, 0};
      if (ioctl(uffd_, UFFDIO_POISON, &z) == 0) {
        address = end;
        break;
      }
      err = errno;
      if (z.updated > 0) address += static_cast<uint64_t>(z.updated);
      if (err == EAGAIN && ++retries < 1000) {  // the layout is changing: look again shortly
        timespec ts{0, 100000};
        nanosleep(&ts, nullptr);
        continue;
      }
      if (err != EEXIST) break;
      address += pageSize;
      err = 0;
    }
    *pages = (address - start) / pageSize;
    return address < end ? err : 0;
  }

  // heldBitmap(sourceRegion) -> Buffer, one bit per page of the source region
  // (bit p of byte p/8): what the source need not send. A page is held when it
  // is resident, was given back, or no target region maps it.
  Napi::Value HeldBitmap(const Napi::CallbackInfo& info) {
    uint32_t id = info[0].As<Napi::Number>().Uint32Value();
    if (id >= sourcePages_.size()) throw CodedError(info.Env(), "ERR_OUT_OF_RANGE", "no such source region");
    uint64_t pages = sourcePages_[id];
    auto out = Napi::Buffer<uint8_t>::New(info.Env(), (pages + 7) / 8);
    std::memset(out.Data(), 0xff, out.Length());
    if (pages % 8) out.Data()[pages / 8] = static_cast<uint8_t>((1u << (pages % 8)) - 1);  // no bits past the end
    for (auto& r : regions_) {
      if (r->sourceRegion != id) continue;
      for (uint64_t p = 0; p < r->pages; p++) {
        if (r->received->Test(p) || r->removed->Test(p)) continue;
        for (uint64_t s = r->SourceOf(p); s < r->SourceOf(p + 1); s++) out.Data()[s / 8] &= static_cast<uint8_t>(~(1u << (s % 8)));
      }
    }
    return out;
  }

  // latencyBuckets(boundsNs) -> for each bound, the faults that waited at most that long.
  Napi::Value LatencyBuckets(const Napi::CallbackInfo& info) {
    Napi::Array bounds = info[0].As<Napi::Array>();
    Napi::Array out = Napi::Array::New(info.Env(), bounds.Length());
    for (uint32_t i = 0; i < bounds.Length(); i++) {
      double b = bounds.Get(i).As<Napi::Number>().DoubleValue();
      uint64_t bound = b <= 0 ? 0 : b >= 1.8e19 ? UINT64_MAX : static_cast<uint64_t>(b);
      out.Set(i, Napi::Number::New(info.Env(), static_cast<double>(latency_.CountAtMost(bound))));
    }
    return out;
  }

  // installedChecksum() -> per source region {region, sum, pages, skip}: the
  // installed-pages checksum (page_checksum.h) of every page this engine put
  // in from the source's data, and the pages it leaves out as flat [first,
  // count, ...] source-page ranges (given back, found present, mapped by no
  // region, not yet installed); skip is null past kMaxSkipRanges ranges.
  Napi::Value InstalledChecksum(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    // An install that copied its pages before the last page settled may still
    // be adding them to the sum: wait for it (bounded), so the sum and the
    // pages it leaves out agree.
    for (int i = 0; installing_.load() != 0 && i < 10000; i++) {
      timespec ts{0, 100000};
      nanosleep(&ts, nullptr);
    }
    Napi::Array out = Napi::Array::New(env, sourcePages_.size());
    for (uint32_t id = 0; id < sourcePages_.size(); id++) {
      std::vector<const TargetRegion*> targets;
      for (auto& r : regions_)
        if (r->sourceRegion == id) targets.push_back(r.get());
      std::sort(targets.begin(), targets.end(), [](const TargetRegion* a, const TargetRegion* b) { return a->sourcePage < b->sourcePage; });
      std::vector<double> skip;
      bool tooMany = false;
      auto leaveOut = [&](uint64_t first, uint64_t count) {
        if (count == 0 || tooMany) return;
        if (!skip.empty() && skip[skip.size() - 2] + skip.back() == double(first)) {
          skip.back() += double(count);
          return;
        }
        if (skip.size() / 2 >= kMaxSkipRanges) {
          tooMany = true;
          return;
        }
        skip.push_back(double(first));
        skip.push_back(double(count));
      };
      uint64_t cursor = 0;
      for (const TargetRegion* t : targets) {
        leaveOut(cursor, t->sourcePage - cursor);
        for (uint64_t p = t->checked->NextClear(0); p < t->pages; p = t->checked->NextClear(p)) {
          uint64_t q = p;
          while (q < t->pages && !t->checked->Test(q)) q++;
          leaveOut(t->SourceOf(p), (q - p) * t->ratio);
          p = q;
        }
        cursor = t->sourcePage + t->SourceSpan();
      }
      leaveOut(cursor, sourcePages_[id] - cursor);
      uint64_t skipped = 0;
      for (size_t k = 1; k < skip.size(); k += 2) skipped += static_cast<uint64_t>(skip[k]);
      const uint64_t checkedPages = tooMany ? 0 : sourcePages_[id] - skipped;
      Napi::Object o = Napi::Object::New(env);
      o.Set("region", id);
      o.Set("sum", Napi::BigInt::New(env, checksum_[id].load()));
      o.Set("pages", double(checkedPages));
      if (tooMany) {
        o.Set("skip", env.Null());
      } else {
        Napi::Array a = Napi::Array::New(env, skip.size());
        for (size_t k = 0; k < skip.size(); k++) a.Set(static_cast<uint32_t>(k), skip[k]);
        o.Set("skip", a);
      }
      out.Set(id, o);
    }
    return out;
  }

  // markResident(region, bitmap) -> pages newly marked. Pages of target region
  // `region` found present already (a handler taking over from one that
  // died): they settle without being fetched. Bitmap: bit p of byte p/8.
  Napi::Value MarkResident(const Napi::CallbackInfo& info) {
    uint32_t id = info[0].As<Napi::Number>().Uint32Value();
    auto bits = info[1].As<Napi::TypedArrayOf<uint8_t>>();
    if (id >= regions_.size()) throw CodedError(info.Env(), "ERR_OUT_OF_RANGE", "no such region");
    TargetRegion& r = *regions_[id];
    if (bits.ByteLength() != (r.pages + 7) / 8) throw CodedError(info.Env(), "ERR_OUT_OF_RANGE", "the bitmap does not fit the region");
    uint64_t marked = 0;
    for (uint64_t p = 0; p < r.pages; p++) {
      if (!((bits.Data()[p / 8] >> (p % 8)) & 1) || !r.received->Claim(p)) continue;
      if (r.fill) r.cached->Claim(p);  // mapped in the guest, so in the page cache: never written again
      if (r.settled->Claim(p)) marked++;
    }
    Settle(marked, MonotonicNs());
    return Napi::Number::New(info.Env(), static_cast<double>(marked));
  }

  // Pages asked for and not yet settled (resident or given back).
  uint64_t OutstandingRequests() const {
    uint64_t n = 0;
    for (auto& r : regions_)
      for (uint64_t p = 0; p < r->pages; p++)
        if (r->requested->Test(p) && !r->settled->Test(p)) n++;
    return n;
  }

  // Sends the batched requests on the current urgent channel. With no channel
  // (paused) or a broken one, they stay recorded as requested and go out again
  // when channels are attached.
  void SendRequests(std::vector<wire::PageRequest>& reqs) {
    if (reqs.empty()) return;
    std::lock_guard<std::mutex> lock(urgentMu_);
    if (urgentWriter_ && !urgentBroken_) {
      int err = urgentWriter_->Write(reqs.data(), reqs.size() * sizeof(wire::PageRequest));
      if (err) {
        urgentBroken_ = true;
        if (!stop_.load() && !detaching_.load()) events_.Emit(ErrnoEvent("error", "urgent", err, "write", "sending a page request failed", generation_.load()));
      } else {
        requestsSent_ += reqs.size();
      }
    }
    reqs.clear();
  }

  // After an attach: every page asked for and still missing is asked for again.
  void ResendOutstanding(std::vector<wire::PageRequest>& reqs) {
    for (auto& r : regions_) {
      for (uint64_t p = 0; p < r->pages; p++) {
        if (!r->requested->Test(p) || r->settled->Test(p)) continue;
        reqs.push_back({wire::kRequest, r->sourceRegion, r->SourceOf(p)});
        requestsResent_++;
        if (reqs.size() == 256) SendRequests(reqs);
      }
    }
    SendRequests(reqs);
  }

  void FaultLoop() {
    onFaultThread_ = true;
    uffd_msg msgs[64];
    std::vector<wire::PageRequest> reqs;  // requests sent again after an attach
    reqs.reserve(256);
    // A template's filler has no userfaultfd (-1: poll() skips it); its faults are its clones' demands.
    pollfd fds[4] = {{uffd_, POLLIN, 0}, {stopFd_, POLLIN, 0}, {resendFd_, POLLIN, 0}, {demandFd_, POLLIN, 0}};
    while (!stop_.load()) {
      int ready = poll(fds, 4, deferredZeroFills_.empty() && deferredContinues_.empty() && !HasLateContinues() ? -1 : 1);
      if (ready == 0) {
        RetryDeferredZeroFills();
        continue;
      }
      if (ready < 0 && errno == EINTR) continue;
      if (ready < 0 || (fds[1].revents & POLLIN)) return;
      if (fds[2].revents & POLLIN) {
        uint64_t count;
        if (read(resendFd_, &count, sizeof count) < 0) {}
        ResendOutstanding(reqs);
      }
      if (fds[3].revents & POLLIN) ServeDemands();
      if (!(fds[0].revents & (POLLIN | POLLERR | POLLHUP))) continue;
      if (fds[0].revents & (POLLERR | POLLHUP)) {  // the process owning the memory is gone
        events_.Emit({"uffd-closed", "", "", "the userfaultfd was hung up"});
        return;
      }
      // Memory events read here are counted before anyone can see their effect (see LayoutSettled).
      readingUffd_.store(true);
      ssize_t n = read(uffd_, msgs, sizeof msgs);
      int readErr = errno;
      for (ssize_t i = 0; i < n / static_cast<ssize_t>(sizeof(uffd_msg)); i++)
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT) eventsUnapplied_.fetch_add(1);
      readingUffd_.store(false);
      errno = readErr;
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
      if (n <= 0) {
        events_.Emit(ErrnoEvent("uffd-closed", "", n < 0 ? errno : 0, "read", "reading the userfaultfd failed"));
        return;
      }
      uint64_t now = MonotonicNs();
      for (size_t i = 0; i < static_cast<size_t>(n) / sizeof(uffd_msg); i++) {
        const uffd_msg& m = msgs[i];
        if (m.event == UFFD_EVENT_PAGEFAULT) {
          OnFault(m.arg.pagefault.address, now);
        } else {
          OnMemoryEvent(m);
          eventsUnapplied_.fetch_sub(1);
        }
      }
      if (!deferredZeroFills_.empty() || !deferredContinues_.empty() || HasLateContinues()) RetryDeferredZeroFills();
      supply_->Flush();
    }
  }

  // The region holding `address`, and its page there.
  TargetRegion* RegionAt(uint64_t address, uint64_t* page) {
    for (auto& r : regions_)
      if (r->PageAt(address, page)) return r.get();
    return nullptr;
  }

  void OnFault(uint64_t address, uint64_t now) {
    faults_++;
    uint64_t page = 0;
    TargetRegion* found = RegionAt(address, &page);
    if (!found) {
      // Memory the process added to a registered mapping (mremap grew it) holds no image page: it reads as a fresh mapping's, zeros.
      unexpected_++;
      events_.Emit({"unexpected-fault", "", "", "a fault outside every known region: zero-filled", 0, {{"address", double(address)}}});
      ZeroFillOutside(address & ~uint64_t(4095));
      return;
    }
    TargetRegion& r = *found;
    uint64_t pageAddress = r.AddressOf(page);
    if (r.removed->Test(page)) {  // given back earlier: it reads as zeros, the source is not asked
      ZeroFillGivenBack(pageAddress, r.pageSize);
      return;
    }
    // Asked for before looking whether it is there: an installer that puts it
    // in the page cache after this look sees the request and maps it (MINOR).
    bool firstAsk = r.requested->Claim(page);
    if (Minor(r) ? InCache(r, page) : r.received->Test(page)) return ServeResident(r, pageAddress, now);
    r.waiters->At(page).fetch_add(1, std::memory_order_relaxed);
    uint64_t expected = 0;
    r.faultNs->At(page).compare_exchange_strong(expected, now, std::memory_order_acq_rel);
    if (!firstAsk) return;  // asked for already: this thread waits with the others
    if (recordFaults_) {
      std::lock_guard<std::mutex> lock(recordMu_);
      faulted_.push_back((uint64_t(r.sourceRegion) << 48) | r.SourceOf(page));
    }
    lastFault_.store((uint64_t(r.index) << 48) | page, std::memory_order_relaxed);
    faultSeq_.fetch_add(1, std::memory_order_release);
    supply_->Ask(r, page);
  }

  // A fault on a page that is there. Installed with UFFDIO_COPY while the
  // fault was queued: make sure the thread is awake. MINOR mode, its contents
  // in the page cache: map it with UFFDIO_CONTINUE, copying nothing.
  void ServeResident(TargetRegion& r, uint64_t pageAddress, uint64_t faultNs) {
    if (!Minor(r)) {
      faultsResident_++;
      uffdio_range range{pageAddress, r.pageSize};
      ioctl(uffd_, UFFDIO_WAKE, &range);
      return;
    }
    minorFaults_++;
    int err = Continue(pageAddress, r.pageSize, r.pageSize, /*mayWait=*/false);
    if (err == EAGAIN)
      deferredContinues_.push_back({pageAddress, r.pageSize});  // the layout is changing: after this batch's events
    else if (err && err != ESRCH)
      events_.Emit(ErrnoEvent("install-failed", "", err, "ioctl", "mapping a cached page failed (UFFDIO_CONTINUE)"));
    uint64_t now = MonotonicNs();
    latency_.Record(now > faultNs ? now - faultNs : 0);
  }

  // UFFDIO_CONTINUE over [address, address+length): maps the page-cache pages
  // there and wakes their threads; pages mapped already (EEXIST) are woken and
  // stepped over. 0 or an errno; EAGAIN (the layout is changing) is retried
  // only when the caller may wait.
  int Continue(uint64_t address, uint64_t length, uint64_t pageSize, bool mayWait) {
    uint64_t end = address + length;
    while (address < end) {
      uffdio_continue c{{address, end - address}, 0, 0};
      if (ioctl(uffd_, UFFDIO_CONTINUE, &c) == 0) return 0;
      int err = errno;
      if (c.mapped > 0) address += static_cast<uint64_t>(c.mapped);
      if (err == EEXIST) {
        uffdio_range range{address, pageSize};
        ioctl(uffd_, UFFDIO_WAKE, &range);
        address += pageSize;
        continue;
      }
      if (err == EAGAIN && mayWait && !Leaving()) {
        timespec ts{0, 50000};
        nanosleep(&ts, nullptr);
        continue;
      }
      return err;
    }
    return 0;
  }

  // ---- where missing pages come from ----

  class PageSupply {
   public:
    virtual ~PageSupply() = default;
    // Fault thread: a thread waits on page `page` of r, asked for the first time.
    virtual void Ask(TargetRegion& r, uint64_t page) = 0;
    // Fault thread: the end of a batch of userfaultfd messages.
    virtual void Flush() = 0;
  };

  // Asks the source over the urgent channel, a batch per read of the userfaultfd.
  class RemoteSupply final : public PageSupply {
   public:
    explicit RemoteSupply(FaultEngine& e) : e_(e) { reqs_.reserve(256); }
    void Ask(TargetRegion& r, uint64_t page) override { reqs_.push_back({wire::kRequest, r.sourceRegion, r.SourceOf(page)}); }
    void Flush() override { e_.SendRequests(reqs_); }

   private:
    FaultEngine& e_;
    std::vector<wire::PageRequest> reqs_;
  };

  // Installs the page from the mapped image at once, on the fault thread, and
  // leaves its window to the fill thread. A page the kernel cannot take yet
  // (EAGAIN: the layout is changing, and the event saying so is read by this
  // very thread) goes to the fill thread too, which retries it.
  class ImageSupply final : public PageSupply {
   public:
    explicit ImageSupply(FaultEngine& e) : e_(e) {}
    void Ask(TargetRegion& r, uint64_t page) override {
      InstallResult result = e_.InstallFromImage(r, page, 1, wire::kRequested, /*mayWait=*/false);
      if (result == kStop) return;
      if (result == kBusy || e_.windowForward_ || e_.windowBackward_ || e_.InWorkingSet(r, page)) e_.QueueFill(r, page);
    }
    void Flush() override {}

   private:
    FaultEngine& e_;
  };

  // ---- the local image: fill thread, prefetch (working-set replay), background ----

  // Installs pages [first, first+count) of r from the image, a data or zero
  // run at a time. `mayWait`: retry while the layout changes (not on the fault thread).
  InstallResult InstallFromImage(TargetRegion& r, uint64_t first, uint64_t count, uint32_t reason, bool mayWait) {
    const ImagePages& img = *image_[r.sourceRegion];
    uint64_t p = first, end = first + count;
    while (p < end) {
      bool zero = ImageZero(img, r, p);
      uint64_t q = p + 1;
      while (q < end && ImageZero(img, r, q) == zero) q++;
      InstallResult result = Install(r, p, q - p, zero ? nullptr : img.Page(r.SourceOf(p)), reason, "image", 0, mayWait);
      if (result != kOk) return result;
      p = q;
    }
    return kOk;
  }

  // Page p of r is all zeros in the image (every source page behind it).
  static bool ImageZero(const ImagePages& img, const TargetRegion& r, uint64_t p) {
    for (uint64_t s = r.SourceOf(p); s < r.SourceOf(p + 1); s++)
      if (!img.IsZero(s)) return false;
    return true;
  }

  void QueueFill(TargetRegion& r, uint64_t page) {
    std::lock_guard<std::mutex> lock(fillMu_);
    fillQueue_.push_back({&r, page});
    fillCv_.notify_one();
  }

  // prefetch(entries: Buffer of u64 LE, region << 48 | page, in order): the
  // pages of a working set, installed ahead of the background (local image).
  Napi::Value Prefetch(const Napi::CallbackInfo& info) {
    if (image_.empty()) throw CodedError(info.Env(), "ERR_ENGINE_STATE", "only an engine serving a local image replays a working set itself");
    AddPrefetch(info.Env(), info[0].As<Napi::TypedArrayOf<uint8_t>>());
    return info.Env().Undefined();
  }

  void AddPrefetch(Napi::Env env, Napi::TypedArrayOf<uint8_t> bytes) {
    if (bytes.ByteLength() % 8) throw CodedError(env, "ERR_OUT_OF_RANGE", "prefetch entries are 8 bytes each");
    std::vector<uint64_t> entries(bytes.ByteLength() / 8);
    std::memcpy(entries.data(), bytes.Data(), bytes.ByteLength());
    for (uint64_t e : entries) {
      uint64_t region = e >> 48, page = e & ((1ull << 48) - 1);
      if (region >= sourcePages_.size() || page >= sourcePages_[region]) throw CodedError(env, "ERR_OUT_OF_RANGE", "a prefetch entry lies outside the image");
    }
    std::lock_guard<std::mutex> lock(fillMu_);
    for (uint64_t e : entries) prefetchSet_[e >> 48]->Claim(e & ((1ull << 48) - 1));
    prefetch_.insert(prefetch_.end(), entries.begin(), entries.end());
    fillCv_.notify_one();
  }

  // startBackground(): a local image's background fill starts (or goes on) now.
  Napi::Value StartBackground(const Napi::CallbackInfo& info) {
    std::lock_guard<std::mutex> lock(fillMu_);
    backgroundOn_ = true;
    fillCv_.notify_one();
    return info.Env().Undefined();
  }

  // faultedPages() -> Buffer of u64 LE (region << 48 | page): every page a
  // thread faulted on while it was missing, in first-touch order (recordFaults).
  Napi::Value FaultedPages(const Napi::CallbackInfo& info) {
    std::lock_guard<std::mutex> lock(recordMu_);
    auto out = Napi::Buffer<uint8_t>::Copy(info.Env(), reinterpret_cast<const uint8_t*>(faulted_.data()), faulted_.size() * 8);
    return out;
  }

  void FillLoop() {
    while (!stop_.load()) {
      std::pair<TargetRegion*, uint64_t> item{nullptr, 0};
      {
        std::unique_lock<std::mutex> lock(fillMu_);
        fillCv_.wait(lock, [&] {
          return stop_.load() || !fillQueue_.empty() || prefetchNext_ < prefetch_.size() || (backgroundOn_ && !backgroundDone_ && !fillFailed_);
        });
        if (stop_.load()) return;
        if (!fillQueue_.empty()) {
          item = fillQueue_.front();
          fillQueue_.pop_front();
        }
      }
      if (item.first) {
        FillAround(*item.first, item.second);
      } else if (!PrefetchBatch()) {
        BackgroundRun();
      }
    }
  }

  // A faulted page (again, if the fault thread could not install it) and its window.
  void FillAround(TargetRegion& r, uint64_t page) {
    if (InstallFromImage(r, page, 1, wire::kRequested, true) == kStop) return StopFilling();
    // A page of the working set being replayed brings its cluster of the set at once.
    if (InWorkingSet(r, page) && InstallCluster(r, page) == kStop) return StopFilling();
    uint64_t hi = std::min<uint64_t>(r.pages, page + 1 + windowForward_), lo = page > windowBackward_ ? page - windowBackward_ : 0;
    if (hi > page + 1 && InstallFromImage(r, page + 1, hi - page - 1, wire::kPrefault, true) == kStop) return StopFilling();
    if (page > lo && InstallFromImage(r, lo, page - lo, wire::kPrefault, true) == kStop) return StopFilling();
  }

  // Installs the next batch of the working set, at most one run's bytes, in
  // its order: each entry with the pages of the set contiguous to it, as one
  // run (a cold start touches clusters: code, heap), so a scattered order
  // still goes in with few ioctls. False when none is left.
  bool PrefetchBatch() {
    uint64_t bytes = 0;
    bool any = false;
    while (bytes < wire::kMaxRunBytes) {
      uint64_t e;
      {
        std::lock_guard<std::mutex> lock(fillMu_);
        if (prefetchNext_ >= prefetch_.size()) break;
        e = prefetch_[prefetchNext_++];
      }
      any = true;
      uint32_t region = static_cast<uint32_t>(e >> 48);
      uint64_t page = e & ((1ull << 48) - 1);
      for (auto& r : regions_) {
        if (r->sourceRegion != region || page < r->sourcePage || page >= r->sourcePage + r->SourceSpan()) continue;
        uint64_t at = (page - r->sourcePage) / r->ratio;
        if (r->received->Test(at) || r->removed->Test(at)) break;  // in already, with its cluster or on demand
        uint64_t pages = 0;
        if (InstallCluster(*r, at, &pages) == kStop) {
          StopFilling();
          return false;
        }
        bytes += pages * r->pageSize;
        break;
      }
    }
    return any;
  }

  bool InWorkingSet(const TargetRegion& r, uint64_t page) const { return !prefetchSet_.empty() && prefetchSet_[r.sourceRegion]->Test(r.SourceOf(page)); }

  // Page `at` of r and the pages of the working set contiguous to it, still
  // missing, as one run (at most one run's bytes). `*pages`: how many it covered.
  InstallResult InstallCluster(TargetRegion& r, uint64_t at, uint64_t* pages = nullptr) {
    const AtomicBitmap& set = *prefetchSet_[r.sourceRegion];
    auto wanted = [&](uint64_t p) { return set.Test(r.SourceOf(p)) && !r.received->Test(p) && !r.removed->Test(p); };
    uint64_t maxRun = wire::MaxRunPages(r.pageSize), lo = at, hi = at + 1;
    while (lo > 0 && hi - lo < maxRun && wanted(lo - 1)) lo--;
    while (hi < r.pages && hi - lo < maxRun && wanted(hi)) hi++;
    if (pages) *pages = hi - lo;
    return InstallFromImage(r, lo, hi - lo, wire::kPrefetch, true);
  }

  // One background run: the next missing pages after the last fault, then on
  // to the following regions; done once every page is settled.
  void BackgroundRun() {
    if (resident_.load() >= totalPages_) {
      std::lock_guard<std::mutex> lock(fillMu_);
      backgroundDone_ = true;
      return;
    }
    uint64_t seq = faultSeq_.load(std::memory_order_acquire);
    if (seq != bgSeenSeq_) {  // follow the workload: continue after its last fault
      bgSeenSeq_ = seq;
      uint64_t last = lastFault_.load(std::memory_order_relaxed);
      bgRegion_ = static_cast<size_t>(last >> 48) % regions_.size();
      bgCursor_ = (last & ((1ull << 48) - 1)) + 1;
    }
    TargetRegion& r = *regions_[bgRegion_];
    uint64_t p = r.settled->NextClear(bgCursor_);
    if (p >= r.pages) {
      bgRegion_ = (bgRegion_ + 1) % regions_.size();
      bgCursor_ = 0;
      return;
    }
    uint64_t n = 1, maxRun = wire::MaxRunPages(r.pageSize);
    while (p + n < r.pages && n < maxRun && !r.settled->Test(p + n)) n++;
    bgCursor_ = p + n;
    if (InstallFromImage(r, p, n, wire::kBackground, true) == kStop) StopFilling();
  }

  // An install failed for good (the process is gone): nothing more is filled.
  void StopFilling() {
    std::lock_guard<std::mutex> lock(fillMu_);
    fillFailed_ = true;
    fillQueue_.clear();
    prefetchNext_ = prefetch_.size();
  }

  // Maps a zero page where the process gave memory back. EEXIST: someone
  // mapped it meanwhile, so just wake the thread. EAGAIN: the layout is
  // changing and the event saying so is still unread (events are read after
  // faults), so retry once this batch of messages has been handled.
  void ZeroFillGivenBack(uint64_t address, uint64_t pageSize) {
    int64_t done = 0;
    int err = Zero(address, pageSize, &done);
    if (err == 0) {
      zeroFilledAfterRemove_++;
    } else if (err == EEXIST) {
      uffdio_range range{address, pageSize};
      ioctl(uffd_, UFFDIO_WAKE, &range);
    } else if (err == EAGAIN) {
      deferredZeroFills_.push_back({address, pageSize});
    } else if (err != ENOENT) {
      events_.Emit(ErrnoEvent("install-failed", "", err, "ioctl", "zero-filling a removed page failed (UFFDIO_ZEROPAGE)"));
    }
  }

  // Waits (briefly) until the fault thread has applied every memory event it
  // read. An install that found nothing mapped (ENOENT) after a move was read
  // but before it was applied would otherwise take the page for unmapped.
  // False when it cannot tell (on the fault thread itself, or stopping).
  bool LayoutSettled() {
    if (onFaultThread_) return eventsUnapplied_.load() == 0;
    for (int tries = 0; readingUffd_.load() || eventsUnapplied_.load() > 0; tries++) {
      if (Leaving() || tries >= 20000) return false;  // at most ~1 s
      timespec ts{0, 50000};
      nanosleep(&ts, nullptr);
    }
    return true;
  }

  // A fault outside every region: a zero page, or (present already, or not
  // ours to fill: a MINOR fault on a cached page) its thread woken to retry.
  void ZeroFillOutside(uint64_t address) {
    int64_t done = 0;
    int err = Zero(address, 4096, &done);
    if (err == EAGAIN) {
      deferredZeroFills_.push_back({address, 4096});
    } else if (err == EINVAL) {
      int cont = Continue(address, 4096, 4096, /*mayWait=*/false);
      if (cont && cont != EEXIST && cont != ENOENT) {
        uffdio_range range{address, 4096};
        ioctl(uffd_, UFFDIO_WAKE, &range);
      }
    } else if (err && err != ENOENT) {
      uffdio_range range{address, 4096};
      ioctl(uffd_, UFFDIO_WAKE, &range);
    }
  }

  void RetryDeferredZeroFills() {
    std::vector<std::pair<uint64_t, uint64_t>> again;
    again.swap(deferredZeroFills_);
    for (auto& [address, pageSize] : again) ZeroFillGivenBack(address, pageSize);
    // MINOR mode: cached pages whose mapping met a layout change (EAGAIN), here or on a receiver.
    {
      std::lock_guard<std::mutex> lock(deferredContinuesMu_);
      deferredContinues_.insert(deferredContinues_.end(), lateContinues_.begin(), lateContinues_.end());
      lateContinues_.clear();
    }
    std::vector<std::pair<uint64_t, uint64_t>> continues;
    continues.swap(deferredContinues_);
    for (auto& [address, length] : continues) {
      uint64_t page = 0;
      TargetRegion* r = RegionAt(address, &page);
      int err = Continue(address, length, r ? r->pageSize : 4096, /*mayWait=*/false);
      if (err == EAGAIN) deferredContinues_.push_back({address, length});
    }
  }

  bool HasLateContinues() {
    std::lock_guard<std::mutex> lock(deferredContinuesMu_);
    return !lateContinues_.empty();
  }

  // The process gave memory back (balloon, DONTNEED) or unmapped it: those
  // pages are settled as zeros and never fetched again.
  void GiveBack(uint64_t start, uint64_t end) {
    for (auto& r : regions_)
      for (const auto& x : r->Pieces()) {
        uint64_t lo = std::max(start, x.address), hi = std::min(end, x.address + x.pages * r->pageSize);
        if (lo >= hi) continue;
        uint64_t first = (lo - x.address + r->pageSize - 1) / r->pageSize, last = (hi - x.address) / r->pageSize;  // within the piece
        uint64_t settled = 0;
        for (uint64_t p = x.first + first; p < x.first + last; p++) {
          if (!r->removed->Claim(p)) continue;
          removedPages_++;
          r->faultNs->Take(p);
          if (r->settled->Claim(p)) settled++;
        }
        Settle(settled, MonotonicNs());
        // A thread may be waiting on one of these pages for data that will now
        // never be installed: wake it, and its retried fault is zero-filled.
        uffdio_range range{x.address + first * r->pageSize, (last - first) * r->pageSize};
        if (last > first) ioctl(uffd_, UFFDIO_WAKE, &range);
      }
  }

  void OnMemoryEvent(const uffd_msg& m) {
    memoryEvents_++;
    switch (m.event) {
      case UFFD_EVENT_REMOVE:
        // A clone's memory given back reads as the template's file again: its next touch is a MINOR fault.
        if (!IsClone()) GiveBack(m.arg.remove.start, m.arg.remove.end);
        events_.Emit({"remove", "", "", "", 0, {{"start", double(m.arg.remove.start)}, {"end", double(m.arg.remove.end)}}});
        break;
      case UFFD_EVENT_UNMAP:
        GiveBack(m.arg.remove.start, m.arg.remove.end);
        events_.Emit({"unmap", "", "", "", 0, {{"start", double(m.arg.remove.start)}, {"end", double(m.arg.remove.end)}}});
        break;
      case UFFD_EVENT_REMAP: {
        // Memory moved (mremap): a whole region, or part of one (it is then served in pieces), is followed.
        bool followed = false;
        for (auto& r : regions_) followed |= r->Move(m.arg.remap.from, m.arg.remap.to, m.arg.remap.len);
        events_.Emit(
            {"remap",
             "",
             "",
             followed ? "" : "memory that holds no region moved",
             0,
             {{"from", double(m.arg.remap.from)}, {"to", double(m.arg.remap.to)}, {"length", double(m.arg.remap.len)}, {"followed", followed ? 1.0 : 0.0}}});
        break;
      }
      case UFFD_EVENT_FORK:
        events_.Emit({"fork", "", "", "", 0, {{"fd", double(m.arg.fork.ufd)}}});
        break;
      default:
        events_.Emit({"unknown-event", "", "", "", 0, {{"event", double(m.event)}}});
    }
  }

  // True once this receiver must go without a word: the engine is stopping or
  // its channels are being detached.
  bool Leaving() const { return stop_.load() || detaching_.load(); }

  void ReceiveLoop(ChannelReader& in, const char* channel, uint32_t generation) {
    auto report = [&](const char* type, const std::string& code, const char* message) {
      if (!Leaving()) events_.Emit({type, channel, code, message, generation});
    };
    void* raw = nullptr;
    if (posix_memalign(&raw, 4096, maxRunBytes_) != 0) {
      if (!Leaving()) events_.Emit(ErrnoEvent("error", channel, ENOMEM, "posix_memalign", "cannot allocate the receive buffer", generation));
      return;
    }
    std::unique_ptr<uint8_t, decltype(&free)> buffer(static_cast<uint8_t*>(raw), &free);
    while (!Leaving()) {
      wire::RunHeader h;
      int err = in.ReadFull(&h, sizeof h);
      if (err == kBadRecord) return Tampered(in, report);
      if (err) {
        if (!Leaving()) events_.Emit(ErrnoEvent("closed", channel, err > 0 ? err : 0, "read", "the source closed the channel", generation));
        return;
      }
      bytesReceived_ += sizeof h;
      if (h.kind == wire::kBulkEnd) {
        report("background-done", "", "");
        continue;
      }
      if (h.kind == wire::kSwitchover) {
        if (std::strcmp(channel, "bulk") != 0 || !precopy_.load()) {
          report("error", "ERR_PROTOCOL_MALFORMED", "a switchover outside a live source's precopy; channel closed");
          shutdown(in.fd(), SHUT_RDWR);
          return;
        }
        SwitchedOver();
        continue;
      }
      const char* bad = Validate(h);
      if (bad) {
        report("error", bad, "the source sent a run outside the negotiated regions; channel closed");
        shutdown(in.fd(), SHUT_RDWR);
        return;
      }
      uint64_t pageSize = sourcePageSize_[h.region];
      const uint8_t* runData = nullptr;  // the run's pages: in `buffer`, or in place in a sealed record
      if (h.kind == wire::kDataRun) {
        // A run is installed only once all of it is here: a cut mid-run drops it.
        if ((err = in.ReadView(buffer.get(), h.count * pageSize, &runData))) {
          if (err == kBadRecord) return Tampered(in, report);
          if (!Leaving()) events_.Emit(ErrnoEvent("closed", channel, err > 0 ? err : EPIPE, "read", "the source closed the channel mid-run", generation));
          return;
        }
        bytesReceived_ += h.count * pageSize;
      }
      // Install the part of the run each target region covers; the rest of the
      // image is not mapped by this destination.
      uint64_t first = h.first_page, end = h.first_page + h.count, covered = 0;
      for (auto& r : regions_) {
        if (r->sourceRegion != h.region) continue;
        uint64_t lo = std::max(first, r->sourcePage), hi = std::min(end, r->sourcePage + r->SourceSpan());
        if (lo >= hi) continue;
        if (r->ratio > 1 && ((lo - r->sourcePage) % r->ratio || (hi - r->sourcePage) % r->ratio)) {
          report("error", "ERR_PROTOCOL_OUT_OF_RANGE", "the source sent a run that splits a huge page; channel closed");
          shutdown(in.fd(), SHUT_RDWR);
          return;
        }
        covered += hi - lo;
        if (h.kind == wire::kDiscardRun) {
          Discard(*r, (lo - r->sourcePage) / r->ratio, (hi - lo) / r->ratio);
          continue;
        }
        const uint8_t* data = h.kind == wire::kDataRun ? runData + (lo - first) * pageSize : nullptr;
        if (h.reason == wire::kPrecopy) {
          if (Precopied(*r, (lo - r->sourcePage) / r->ratio, (hi - lo) / r->ratio, data, channel, generation) == kStop) return;
          continue;
        }
        if (Install(*r, (lo - r->sourcePage) / r->ratio, (hi - lo) / r->ratio, data, h.reason, channel, generation) == kStop) return;
      }
      unmappedPages_ += h.count - covered;
    }
  }

  // A sealed record failed authentication (tampered, replayed, cut short):
  // nothing of it was used; the channel ends.
  template <typename Report>
  void Tampered(ChannelReader& in, Report& report) {
    report("error", "ERR_DATA_TAMPERED", "a record on the channel failed authentication; nothing of it was installed");
    shutdown(in.fd(), SHUT_RDWR);
  }

  // Every field is checked before any of it is used to compute an address.
  const char* Validate(const wire::RunHeader& h) const {
    if (h.kind != wire::kDataRun && h.kind != wire::kZeroRun && h.kind != wire::kDiscardRun) return "ERR_PROTOCOL_MALFORMED";
    if (h.region >= sourcePages_.size() || h.reason > wire::kPrecopy) return "ERR_PROTOCOL_OUT_OF_RANGE";
    // Precopy runs and discards come from a live source, before its switchover only.
    if ((h.reason == wire::kPrecopy || h.kind == wire::kDiscardRun) && (!precopy_.load() || h.reason != wire::kPrecopy)) return "ERR_PROTOCOL_MALFORMED";
    uint64_t pages = sourcePages_[h.region];
    if (h.count == 0 || h.count > wire::MaxRunPages(sourcePageSize_[h.region])) return "ERR_PROTOCOL_OUT_OF_RANGE";
    if (uint64_t(h.count) * sourcePageSize_[h.region] > maxRunBytes_) return "ERR_PROTOCOL_OUT_OF_RANGE";  // the receive buffer's size
    if (h.first_page >= pages || h.count > pages - h.first_page) return "ERR_PROTOCOL_OUT_OF_RANGE";
    return nullptr;
  }

  // Installs pages [first, first+count) of region r that are neither resident
  // nor given back, a contiguous stretch per ioctl. Returns false when the
  // engine must stop.
  InstallResult Install(TargetRegion& r, uint64_t first, uint64_t count, const uint8_t* data, uint32_t reason, const char* channel, uint32_t generation,
                        bool mayWait = true) {
    InstallingNow guard(installing_);
    if (r.fill) return InstallInCache(r, first, count, data, reason, channel, generation, mayWait);
    uint64_t p = first, end = first + count;
    while (p < end) {
      if (r.received->Test(p) || r.removed->Test(p)) {
        if (r.received->Test(p)) duplicates_++;
        p++;
        continue;
      }
      uint64_t q = p + 1;
      while (q < end && !r.received->Test(q) && !r.removed->Test(q)) q++;
      int64_t done = 0;
      uint64_t run = 0;
      uint64_t dst = r.AddressOf(p, &run);
      q = std::min(q, p + run);  // one ioctl per stretch that is contiguous in the process's memory
      uint64_t len = (q - p) * r.pageSize;
      int err = data ? Copy(dst, data + (p - first) * r.pageSize, len, &done) : Zero(dst, len, &done);
      uint64_t donePages = done > 0 ? static_cast<uint64_t>(done) / r.pageSize : 0;
      Installed(r, p, donePages, reason, data ? data + (p - first) * r.pageSize : nullptr);
      p += donePages;
      if (err == 0) continue;
      if (err == EEXIST) {  // another channel, a zero-fill, or the process itself got there first
        duplicates_++;
        Installed(r, p, 1, reason, data ? data + (p - first) * r.pageSize : nullptr, /*counted=*/false);
        p++;
        continue;
      }
      if (err == EAGAIN) {  // the layout is changing (REMOVE/UNMAP in flight): look again shortly
        retries_++;
        if (!mayWait) return kBusy;
        timespec ts{0, 50000};
        nanosleep(&ts, nullptr);
        if (Leaving()) return kStop;
        continue;
      }
      if (err == ENOENT) {                                         // nothing mapped there now: moved (mremap) or unmapped
        uint64_t tried = dst + donePages * r.pageSize;             // the page that failed, past what was installed
        if (LayoutSettled() && r.AddressOf(p) != tried) continue;  // moved: install it at its new place
        GiveBack(tried, tried + r.pageSize);                       // unmapped: settled as given back
        p++;
        continue;
      }
      if (err == ESRCH) {  // the process owning the memory is gone
        if (!Leaving()) events_.Emit(ErrnoEvent("target-gone", channel, ESRCH, "ioctl", "the process owning the memory exited", generation));
        return kStop;
      }
      if (!Leaving())
        events_.Emit(ErrnoEvent("install-failed", channel, err, "ioctl",
                                data ? "installing pages failed (UFFDIO_COPY)" : "installing zero pages failed (UFFDIO_ZEROPAGE)", generation));
      return kStop;
    }
    return kOk;
  }

  // MINOR mode: pages [first, first+count) of r go into the page cache through
  // this process's own mapping of the guest's memory file, each written once,
  // by whoever claims it first (once mapped, the guest may be writing to it);
  // then the pages a thread asked for are mapped with UFFDIO_CONTINUE, which
  // wakes it. The rest wait in the cache for their first touch (ServeResident).
  InstallResult InstallInCache(TargetRegion& r, uint64_t first, uint64_t count, const uint8_t* data, uint32_t reason, const char* channel, uint32_t generation,
                               bool mayWait) {
    uint64_t p = first, end = first + count;
    while (p < end) {
      if (r.removed->Test(p)) {
        p++;
        continue;
      }
      if (!r.received->Claim(p)) {
        duplicates_++;
        p++;
        continue;
      }
      uint64_t q = p + 1;
      while (q < end && !r.removed->Test(q) && r.received->Claim(q)) q++;
      uint8_t* dst = r.fill + p * r.pageSize;
      const uint8_t* src = data ? data + (p - first) * r.pageSize : nullptr;
      if (src)
        std::memcpy(dst, src, (q - p) * r.pageSize);
      else
        std::memset(dst, 0, (q - p) * r.pageSize);
      for (uint64_t k = p; k < q; k++) r.cached->Claim(k);  // before looking for requests: see OnFault
      Installed(r, p, q - p, reason, src, /*counted=*/true, /*claimed=*/true);
      if (fillsTemplate_) {
        NotifyClones(r, p, q - p, dst, reason);
      } else if (ContinueRequested(r, p, q, mayWait, channel, generation) == kStop) {
        return kStop;
      }
      p = q;
    }
    return kOk;
  }

  // MINOR mode: maps the pages of [p, q) of r that a thread asked for (they
  // are in the page cache) with UFFDIO_CONTINUE, which wakes their threads.
  InstallResult ContinueRequested(TargetRegion& r, uint64_t p, uint64_t q, bool mayWait, const char* channel, uint32_t generation) {
    for (uint64_t k = p; k < q;) {
      if (!r.requested->Test(k)) {
        k++;
        continue;
      }
      uint64_t run = 0;
      uint64_t at = r.AddressOf(k, &run);
      uint64_t j = k + 1;
      while (j < q && j < k + run && r.requested->Test(j)) j++;
      int err = Continue(at, (j - k) * r.pageSize, r.pageSize, mayWait);
      if (err == EAGAIN) {
        deferredContinuesMu_.lock();
        lateContinues_.push_back({at, (j - k) * r.pageSize});
        deferredContinuesMu_.unlock();
      } else if (err == ESRCH) {
        if (!Leaving()) events_.Emit(ErrnoEvent("target-gone", channel, ESRCH, "ioctl", "the process owning the memory exited", generation));
        return kStop;
      } else if (err) {
        if (!Leaving()) events_.Emit(ErrnoEvent("install-failed", channel, err, "ioctl", "mapping cached pages failed (UFFDIO_CONTINUE)", generation));
        return kStop;
      }
      k = j;
    }
    return kOk;
  }

  // ---- templates: one image filled once into a shared memory file, for many clones ----

  // A clone's guest maps the template's file privately: its pages are released
  // with UFFDIO_CONTINUE (MINOR mode) like a guest's own memory file's.
  bool IsClone() const { return template_ && !fillsTemplate_; }
  bool Minor(const TargetRegion& r) const { return r.fill || IsClone(); }
  // MINOR mode: page p of r is in the page cache (its own file's, or the template's).
  bool InCache(const TargetRegion& r, uint64_t p) const { return r.fill ? r.cached->Test(p) : template_->cached[r.sourceRegion]->Test(r.SourceOf(p)); }

  // Faults on pages the template does not hold yet go to its filler, a batch
  // per read of the userfaultfd; the filler's installs release them (FromTemplate).
  class TemplateSupply final : public PageSupply {
   public:
    explicit TemplateSupply(FaultEngine& e) : e_(e) {}
    void Ask(TargetRegion& r, uint64_t page) override { demands_.push_back((uint64_t(r.sourceRegion) << 48) | r.SourceOf(page)); }
    void Flush() override {
      if (demands_.empty()) return;
      std::lock_guard<std::mutex> lock(e_.template_->mu);
      if (e_.template_->filler) e_.template_->filler->AddDemands(demands_);
      demands_.clear();
    }

   private:
    FaultEngine& e_;
    std::vector<uint64_t> demands_;
  };

  // Filler: pages its clones' guests wait on (source region << 48 | page).
  void AddDemands(const std::vector<uint64_t>& demands) {
    {
      std::lock_guard<std::mutex> lock(demandMu_);
      demands_.insert(demands_.end(), demands.begin(), demands.end());
    }
    uint64_t one = 1;
    if (write(demandFd_, &one, sizeof one) < 0) {}
  }

  // Filler, fault thread: asks for each demanded page not yet in the file, as for a fault of its own.
  void ServeDemands() {
    uint64_t count;
    if (read(demandFd_, &count, sizeof count) < 0) {}
    std::vector<uint64_t> demands;
    {
      std::lock_guard<std::mutex> lock(demandMu_);
      demands.swap(demands_);
    }
    for (uint64_t d : demands) {
      uint64_t region = d >> 48, page = d & ((1ull << 48) - 1);
      if (region >= regions_.size() || page >= regions_[region]->pages) continue;  // clones place their regions on the same image
      TargetRegion& r = *regions_[region];
      if (r.cached->Test(page) || !r.requested->Claim(page) || r.cached->Test(page)) continue;
      lastFault_.store((region << 48) | page, std::memory_order_relaxed);
      faultSeq_.fetch_add(1, std::memory_order_release);
      supply_->Ask(r, page);
    }
    supply_->Flush();
  }

  // Filler: pages [first, first+count) of r are in the file now (at `data`,
  // null for zeros written there): every clone counts them in and maps those
  // its guest waits on.
  void NotifyClones(TargetRegion& r, uint64_t first, uint64_t count, const uint8_t* data, uint32_t reason) {
    std::lock_guard<std::mutex> lock(template_->mu);
    for (FaultEngine* clone : template_->clones) clone->FromTemplate(r.sourceRegion, first, count, data, reason);
  }

  // Clone (under the template's lock): source pages [first, first+count) of
  // `region` are in the template's file, at `data`. They are mapped into the
  // guest at once (read-only, copy on write), waited on or not: its threads
  // wake, and it then runs without faulting on what the template holds. The
  // pages stay the template's; only page tables are added.
  void FromTemplate(uint32_t region, uint64_t first, uint64_t count, const uint8_t* data, uint32_t reason) {
    if (Leaving() || targetGone_) return;
    InstallingNow guard(installing_);
    for (auto& r : regions_) {
      if (r->sourceRegion != region) continue;
      uint64_t lo = std::max(first, r->sourcePage), hi = std::min(first + count, r->sourcePage + r->pages);
      if (lo >= hi) continue;
      uint64_t a = lo - r->sourcePage, b = hi - r->sourcePage;
      Installed(*r, a, b - a, reason, data + (lo - first) * r->pageSize);
      for (uint64_t k = a; k < b;) {  // a stretch per piece of the region (one, unless the process moved part of it)
        uint64_t run = 0;
        uint64_t at = r->AddressOf(k, &run);
        uint64_t len = std::min(run, b - k) * r->pageSize;
        k += std::min(run, b - k);
        int err = Continue(at, len, r->pageSize, /*mayWait=*/false);
        if (err == EAGAIN) {  // the layout is changing: the fault thread maps them after the event
          std::lock_guard<std::mutex> lock(deferredContinuesMu_);
          lateContinues_.push_back({at, len});
        } else if (err == ESRCH) {
          targetGone_ = true;
          if (!Leaving()) events_.Emit(ErrnoEvent("target-gone", "template", ESRCH, "ioctl", "the process owning the memory exited", 0));
          return;
        } else if (err && err != ENOENT) {  // ENOENT: unmapped meanwhile (its event settles it)
          if (!Leaving()) events_.Emit(ErrnoEvent("install-failed", "template", err, "ioctl", "mapping template pages failed (UFFDIO_CONTINUE)", 0));
        }
      }
    }
  }

  // Clone, at start: joins the template and counts in what its file holds already.
  void JoinTemplate() {
    std::lock_guard<std::mutex> lock(template_->mu);
    if (!template_->filler) {
      events_.Emit({"error", "template", "ERR_ENGINE_STATE", "the template this clone maps has stopped filling", 0});
      return;
    }
    template_->clones.push_back(this);
    for (uint32_t region = 0; region < template_->cached.size(); region++) {
      const AtomicBitmap& cached = *template_->cached[region];
      for (uint64_t p = 0; p < cached.size();) {
        if (!cached.Test(p)) {
          p++;
          continue;
        }
        uint64_t q = p + 1;
        while (q < cached.size() && cached.Test(q)) q++;
        FromTemplate(region, p, q - p, template_->contents[region] + p * sourcePageSize_[region], wire::kBackground);
        p = q;
      }
    }
  }

  // Leaves the template (a clone) or closes it to new clones (its filler); no call reaches this engine after.
  void LeaveTemplate() {
    if (!template_) return;
    std::lock_guard<std::mutex> lock(template_->mu);
    if (fillsTemplate_) template_->filler = nullptr;
    auto& clones = template_->clones;
    clones.erase(std::remove(clones.begin(), clones.end(), this), clones.end());
  }

  int Copy(uint64_t dst, const uint8_t* src, uint64_t len, int64_t* done) {
    uffdio_copy c{dst, reinterpret_cast<uint64_t>(src), len, 0, 0};
    if (ioctl(uffd_, UFFDIO_COPY, &c) == 0) {
      *done = static_cast<int64_t>(len);
      return 0;
    }
    *done = c.copy;
    return errno;
  }

  int Zero(uint64_t dst, uint64_t len, int64_t* done) {
    if (!zeroFallback_.load(std::memory_order_relaxed)) {
      uffdio_zeropage z{{dst, len}, 0, 0};
      if (ioctl(uffd_, UFFDIO_ZEROPAGE, &z) == 0) {
        *done = static_cast<int64_t>(len);
        return 0;
      }
      if (errno != EINVAL) {
        *done = z.zeropage;
        return errno;
      }
      zeroFallback_.store(true);  // hugetlbfs has no ZEROPAGE: copy zeros instead
    }
    return Copy(dst, zeros_.get(), len, done);  // runs never exceed maxRunBytes_
  }

  // Marks pages resident: records the wait of any thread that faulted on
  // them and settles each exactly once. `pages`: their contents (null for a
  // zero run). `counted`: the pages were installed by this call's ioctl
  // (false for a page found already present); only those enter the checksum.
  // `claimed`: the caller claimed the pages' received bits already (MINOR mode).
  void Installed(TargetRegion& r, uint64_t first, uint64_t count, uint32_t reason, const uint8_t* pages, bool counted = true, bool claimed = false) {
    if (count == 0) return;
    bool zero = pages == nullptr;
    if (counted && checksumInstalled_) {
      uint64_t sum = 0;
      for (uint64_t p = first; p < first + count; p++)
        if (r.checked->Claim(p)) sum += PageSum(r, p, zero ? nullptr : pages + (p - first) * r.pageSize);
      checksum_[r.sourceRegion].fetch_add(sum, std::memory_order_relaxed);
    }
    uint64_t now = MonotonicNs(), settled = 0;
    for (uint64_t p = first; p < first + count; p++) {
      if (!claimed && !r.received->Claim(p)) continue;
      if (r.settled->Claim(p)) settled++;
      uint64_t t = r.faultNs->Take(p);
      if (t) {
        uint64_t waited = now > t ? now - t : 0;
        latency_.Record(waited);
        uint32_t w = r.waiters->Take(p);
        blockedNs_ += waited * (w ? w : 1);
      }
    }
    if (counted) {
      installed_[reason] += count;
      if (zero) zeroPages_ += count;
    }
    Settle(settled, now);
  }

  // ---- a live source's precopy ----

  // Pages [first, first+count) of r, sent in a precopy round: those not here
  // yet are installed; those here already (sent in an earlier round, the
  // workload has written them since) are written over, in place: nothing
  // runs on this memory before the switchover.
  InstallResult Precopied(TargetRegion& r, uint64_t first, uint64_t count, const uint8_t* data, const char* channel, uint32_t generation) {
    uint64_t p = first, end = first + count;
    while (p < end) {
      bool held = r.received->Test(p);
      uint64_t q = p + 1;
      while (q < end && r.received->Test(q) == held) q++;
      const uint8_t* src = data ? data + (p - first) * r.pageSize : nullptr;
      if (!held) {
        if (Install(r, p, q - p, src, wire::kPrecopy, channel, generation) == kStop) return kStop;
      } else {
        uint8_t* dst = r.fill ? r.fill + p * r.pageSize : ownMemory_ ? reinterpret_cast<uint8_t*>(r.base.load() + p * r.pageSize) : nullptr;
        if (!dst) {
          if (!Leaving()) events_.Emit({"error", channel, "ERR_UNSUPPORTED", "precopy cannot rewrite a page of memory this process does not hold", generation});
          return kStop;
        }
        for (uint64_t k = p; k < q; k++) Recount(r, k, dst + (k - p) * r.pageSize, src ? src + (k - p) * r.pageSize : nullptr);
        if (src)
          std::memcpy(dst, src, (q - p) * r.pageSize);
        else
          std::memset(dst, 0, (q - p) * r.pageSize);
        installed_[wire::kPrecopy] += q - p;
        rewritten_ += q - p;
      }
      p = q;
    }
    return kOk;
  }

  // Page p of r's share of the installed-pages checksum, holding `bytes`
  // (null: zeros): hashed as the source holds it, per source page.
  uint64_t PageSum(const TargetRegion& r, uint64_t p, const uint8_t* bytes) const {
    uint64_t size = sourcePageSize_[r.sourceRegion], sum = 0;
    for (uint64_t s = 0; s < r.ratio; s++)
      sum += Contribution(r.sourceRegion, r.SourceOf(p) + s, bytes ? ContentHash(bytes + s * size, size) : zeroHash_[r.sourceRegion]);
    return sum;
  }

  // Page k of r, in the installed-pages checksum, changes from `from` to `to` (null: zeros).
  void Recount(TargetRegion& r, uint64_t k, const uint8_t* from, const uint8_t* to) {
    if (!checksumInstalled_ || !r.checked->Test(k)) return;
    checksum_[r.sourceRegion].fetch_add(PageSum(r, k, to) - PageSum(r, k, from), std::memory_order_relaxed);
  }

  // Pages [first, first+count) of r were written at the source after they were
  // sent: they become missing again (dropped here; a touch faults and fetches
  // them from the paused workload's memory).
  void Discard(TargetRegion& r, uint64_t first, uint64_t count) {
    uint8_t* base = r.fill ? r.fill : ownMemory_ ? reinterpret_cast<uint8_t*>(r.base.load()) : nullptr;
    if (!base) return;  // refused with the precopy run that brought it (Precopied)
    uint64_t dropped = 0;
    for (uint64_t p = first, end = first + count; p < end;) {
      if (!r.received->Test(p)) {
        p++;
        continue;
      }
      uint64_t q = p + 1;
      while (q < end && r.received->Test(q)) q++;
      uint8_t* at = base + p * r.pageSize;
      if (checksumInstalled_) {
        uint64_t delta = 0;
        for (uint64_t k = p; k < q; k++) {
          if (!r.checked->Test(k)) continue;
          delta -= PageSum(r, k, base + k * r.pageSize);
          r.checked->Clear(k);
        }
        checksum_[r.sourceRegion].fetch_add(delta, std::memory_order_relaxed);
      }
      // MINOR mode: out of the file (the guest's mapping loses them too); own memory: back to unpopulated.
      if (madvise(at, (q - p) * r.pageSize, r.fill ? MADV_REMOVE : MADV_DONTNEED) != 0) {
        events_.Emit(ErrnoEvent("error", "bulk", errno, "madvise", "dropping pages written at the source failed"));
        p = q;
        continue;
      }
      for (uint64_t k = p; k < q; k++) {
        if (r.fill) r.cached->Clear(k);
        r.received->Clear(k);
        if (r.settled->Test(k)) {
          r.settled->Clear(k);
          resident_.fetch_sub(1);
        }
      }
      dropped += q - p;
      p = q;
    }
    discarded_ += dropped;
  }

  // The switchover marker: every discard is done; the workload may run here now.
  void SwitchedOver() {
    precopy_.store(false);
    switchoverNs_ = MonotonicNs();
    events_.Emit({"switchover", "bulk", "", "", 0, {{"discarded", double(discarded_.load())}, {"rewritten", double(rewritten_.load())}}});
    uint64_t now = MonotonicNs();
    if (resident_.load() == totalPages_) {
      completeNs_ = now;
      events_.Emit({"complete", "", "", "", 0, {{"elapsedNs", double(now - startNs_)}}});
    }
  }

  // Counts pages that reached their final state (resident, or given back).
  void Settle(uint64_t pages, uint64_t now) {
    if (pages == 0) return;
    // Before a live source's switchover every page may be here and still change: not complete yet.
    if (resident_.fetch_add(pages) + pages == totalPages_ && !precopy_.load()) {
      completeNs_ = now;
      events_.Emit({"complete", "", "", "", 0, {{"elapsedNs", double(now - startNs_)}}});
    }
  }

  std::vector<std::unique_ptr<TargetRegion>> regions_;
  // A template: one engine (its filler, fillsTemplate_) puts the image into a
  // shared memory file, once; the engines of its clones, whose guests map that
  // file privately, release their faults from it with UFFDIO_CONTINUE.
  struct TemplateShare {
    std::mutex mu;
    FaultEngine* filler = nullptr;  // null once it stopped
    std::vector<FaultEngine*> clones;
    std::vector<std::shared_ptr<AtomicBitmap>> cached;  // per source region: in the file (the filler's regions are the source's)
    std::vector<const uint8_t*> contents;               // per source region: the filler's mapping of the file
  };
  std::shared_ptr<TemplateShare> template_;
  bool fillsTemplate_ = false;
  std::atomic<bool> targetGone_{false};  // clone: its process exited (nothing more to map)
  int demandFd_ = -1;
  std::mutex demandMu_;
  std::vector<uint64_t> demands_;  // filler, under demandMu_: its clones' faults to ask for
  std::vector<uint64_t> sourcePages_, sourcePageSize_;
  std::unique_ptr<PageSupply> supply_;
  // A local image (ImageSupply): its pages per source region, and the fill
  // thread's work, under fillMu_: windows to install, the working set to
  // replay, the background.
  std::vector<std::unique_ptr<ImagePages>> image_;
  uint32_t windowForward_ = 0, windowBackward_ = 0;
  std::thread fillThread_;
  std::mutex fillMu_;
  std::condition_variable fillCv_;
  std::deque<std::pair<TargetRegion*, uint64_t>> fillQueue_;
  std::vector<uint64_t> prefetch_;
  size_t prefetchNext_ = 0;
  std::vector<std::unique_ptr<AtomicBitmap>> prefetchSet_;  // per source region: the working set's pages (local image; bits set under fillMu_)
  bool backgroundOn_ = false, backgroundDone_ = false, fillFailed_ = false;
  size_t bgRegion_ = 0;  // fill thread only: the background's place
  uint64_t bgCursor_ = 0, bgSeenSeq_ = 0;
  std::atomic<uint64_t> lastFault_{0}, faultSeq_{0};  // target region << 48 | page of the last page asked for
  // recordFaults: the pages faulted on while missing, in first-touch order.
  bool recordFaults_ = false;
  std::mutex recordMu_;
  std::vector<uint64_t> faulted_;
  std::vector<std::pair<uint64_t, uint64_t>> deferredZeroFills_;  // fault thread only: [address, length]
  std::vector<std::pair<uint64_t, uint64_t>> deferredContinues_;  // fault thread only: MINOR pages to map again [address, length]
  std::mutex deferredContinuesMu_;
  std::vector<std::pair<uint64_t, uint64_t>> lateContinues_;  // under deferredContinuesMu_: the same, from the other threads
  uint64_t totalPages_ = 0, maxRunBytes_ = 4096;
  int uffd_ = -1, bulkFd_ = -1, stopFd_ = -1, resendFd_ = -1;
  // The urgent channel is written by the fault thread and swapped by the JS
  // thread: the mutex keeps a write and a close from meeting.
  std::mutex urgentMu_;
  std::atomic<int> urgentFd_{-1};
  std::unique_ptr<ChannelWriter> urgentWriter_;  // under urgentMu_: sealed when the channels are encrypted
  bool urgentBroken_ = false;                    // under urgentMu_: a write failed; wait for new channels
  std::atomic<uint32_t> generation_{0};
  std::atomic<bool> detaching_{false};
  int cpu_ = -1;  // pin every engine thread here (-1: no pinning)
  EventSink events_;
  std::thread faultThread_, urgentThread_, bulkThread_;
  bool started_ = false, stopped_ = false, attached_ = false;
  std::atomic<bool> zeroFallback_{false};
  std::unique_ptr<uint8_t, decltype(&free)> zeros_{nullptr, &free};
  std::unique_ptr<std::atomic<uint64_t>[]> checksum_;  // per source region: the installed-pages checksum so far
  bool checksumInstalled_ = false;
  std::atomic<int> installing_{0};  // Install() calls under way                     // hash each page as it goes in (the handler's check at the end)
  std::vector<uint64_t> zeroHash_;  // per source region: ContentHash of a zero page
  static constexpr size_t kMaxSkipRanges = 100000;  // keeps the source's `done` frame well under its limit
  std::atomic<bool> stop_{false};
  // The fault thread is reading the userfaultfd, or has read memory events it has not applied yet (see LayoutSettled).
  std::atomic<bool> readingUffd_{false};
  std::atomic<int> eventsUnapplied_{0};
  static thread_local bool onFaultThread_;
  // A live source: before its switchover marker, precopy runs and discards may come (and nothing completes).
  std::atomic<bool> precopy_{false};
  bool ownMemory_ = false;  // the regions are this process's own memory (a restore): precopy writes and drops pages directly
  std::atomic<uint64_t> rewritten_{0}, discarded_{0}, switchoverNs_{0};
  LatencyHistogram latency_;
  uint64_t startNs_ = 0;
  std::atomic<uint64_t> completeNs_{0};
  std::atomic<uint64_t> faults_{0}, faultsResident_{0}, minorFaults_{0}, requestsSent_{0},
      installed_[5] = {}, zeroPages_{0}, duplicates_{0}, bytesReceived_{0}, resident_{0}, blockedNs_{0}, retries_{0}, unexpected_{0}, memoryEvents_{0},
      removedPages_{0}, zeroFilledAfterRemove_{0}, unmappedPages_{0}, requestsResent_{0}, poisonedPages_{0};
};

thread_local bool FaultEngine::onFaultThread_ = false;

}  // namespace

void InitFaultEngine(Napi::Env env, Napi::Object exports) { exports.Set("FaultEngine", FaultEngine::Define(env)); }

}  // namespace uffdpc
