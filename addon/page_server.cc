// The source's data plane for one destination session. A request thread reads
// page requests from the urgent channel and answers each with the page itself
// (always, first) and its prefault window (pages not sent yet); a bulk thread
// streams on the bulk channel a working set the destination replays (prefetch,
// in its order), then every page not sent yet (background), its cursor jumping
// to the last request. Pages go out with writev straight from the image memory.
// A live source's session starts in precopy: rounds of pages (all of them,
// then those written since) go out on the bulk channel while the workload
// runs, until the switchover (docs/PROTOCOL.md, "Live migration").
// Release as sent, a budget: at most `unconfirmedBudget` pages may be sent
// and not yet confirmed installed (confirm(), from the destination's
// `installed` reports). The bulk thread waits for confirmations before a run
// that would exceed it; the request thread never waits (a requested page
// always goes at once) and sends its window only while it fits. So the
// source's freed memory trails the destination's by at most the budget, plus
// the requested pages in flight.
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <vector>

#include "addon.h"
#include "bitmap.h"
#include "data_plane.h"
#include "errors.h"
#include "events.h"
#include "io.h"
#include "image_pages.h"
#include "page_scheduler.h"
#include "run_packer.h"
#include "secure_channel.h"
#include "wire.h"

namespace uffdpc {
namespace {

struct ServedRegion {
  ImagePages image;
  // Pages per unit the destination installs (512: its 2 MiB huge pages from
  // 4 KiB image pages). Every run then holds whole units, each claimed by its
  // first page: a unit is sent whole or not at all.
  uint64_t unit = 1;
  std::unique_ptr<AtomicBitmap> sentUrgent;  // sent on the urgent channel (sent at all: claimed in the scheduler)
  std::unique_ptr<AtomicBitmap> confirmed;   // held by the destination for good (a budget is set)
  // Precopy: sent in a round at least once; queued for a round and not sent since.
  std::unique_ptr<AtomicBitmap> everSent, queued;
};

// What packing did on a session's bulk channel (read by stats()).
struct PackedFigures {
  std::atomic<uint64_t> runs{0}, rawBytes{0}, wireBytes{0};
};

// Collects runs into one writev. Headers live in a vector reserved up front so
// the iovecs pointing at them stay valid; a full batch is sent before the next
// run is added. Data runs go packed when a packer is given and packing pays.
class RunBatch {
 public:
  RunBatch(ChannelWriter& out, size_t maxRuns, std::atomic<uint64_t>& bytesSent) : out_(out), bytesSent_(bytesSent) {
    headers_.reserve(maxRuns);
    lengths_.reserve(maxRuns);
    packed_.resize(maxRuns);
    iov_.reserve(maxRuns * 3);
  }
  // From now on data runs go packed when that pays (null: never).
  void PackWith(Packer* packer, PackedFigures* figures) {
    packer_ = packer;
    figures_ = figures;
  }
  // Returns 0, or the errno of a failed send.
  int Add(uint32_t regionId, const ImagePages& r, uint64_t first, uint32_t count, bool zero, uint32_t reason) {
    uint64_t raw = zero ? 0 : count * r.pageSize;
    bool pack = raw > 0 && packer_ && packer_->Pack(r.Page(first), raw, scratch_);
    uint64_t adds = sizeof(wire::RunHeader) + (pack ? sizeof(uint32_t) + scratch_.size() : raw);
    // An encrypted batch is one record: keep it within a record's size.
    if (headers_.size() == headers_.capacity() || (out_.encrypted() && bytes_ + adds > kMaxRecord)) {
      if (int err = Flush()) return err;
    }
    uint32_t kind = zero ? wire::kZeroRun : pack ? wire::kPackedRun : wire::kDataRun;
    headers_.push_back({kind, regionId, first, count, reason});
    iov_.push_back({&headers_.back(), sizeof(wire::RunHeader)});
    if (pack) {
      std::vector<uint8_t>& slot = packed_[lengths_.size()];
      slot.swap(scratch_);
      lengths_.push_back(static_cast<uint32_t>(slot.size()));
      iov_.push_back({&lengths_.back(), sizeof(uint32_t)});
      iov_.push_back({slot.data(), slot.size()});
      figures_->runs++;
      figures_->rawBytes += raw;
      figures_->wireBytes += adds;
    } else if (!zero) {
      iov_.push_back({const_cast<uint8_t*>(r.Page(first)), raw});
    }
    bytes_ += adds;
    return 0;
  }
  int Flush() {
    if (headers_.empty()) return 0;
    int err = out_.Writev(iov_.data(), static_cast<int>(iov_.size()));
    if (!err) bytesSent_ += bytes_;
    headers_.clear();
    lengths_.clear();
    iov_.clear();
    bytes_ = 0;
    return err;
  }

 private:
  ChannelWriter& out_;
  std::atomic<uint64_t>& bytesSent_;
  std::vector<wire::RunHeader> headers_;
  // Packed runs: their lengths and bytes, slot k for the k-th packed run of the batch.
  std::vector<uint32_t> lengths_;
  std::vector<std::vector<uint8_t>> packed_;
  std::vector<uint8_t> scratch_;
  Packer* packer_ = nullptr;
  PackedFigures* figures_ = nullptr;
  std::vector<iovec> iov_;
  uint64_t bytes_ = 0;
};

class PageServerSession : public Napi::ObjectWrap<PageServerSession>, DataPlane {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "PageServerSession",
                       {InstanceMethod<&PageServerSession::Start>("start"), InstanceMethod<&PageServerSession::Stop>("stop"),
                        InstanceMethod<&PageServerSession::MarkHeld>("markHeld"), InstanceMethod<&PageServerSession::Stats>("stats"),
                        InstanceMethod<&PageServerSession::Prefetch>("prefetch"), InstanceMethod<&PageServerSession::StartBackground>("startBackground"),
                        InstanceMethod<&PageServerSession::PrecopyRound>("precopyRound"), InstanceMethod<&PageServerSession::Switchover>("switchover"),
                        InstanceMethod<&PageServerSession::DiscardRound>("discardRound"), InstanceMethod<&PageServerSession::Confirm>("confirm")});
  }

  // new PageServerSession({regions, urgentFd, bulkFd, windowForward, windowBackward,
  //                        background, rateBytesPerSecond, onEvent}); validated in server/session.ts.
  explicit PageServerSession(const Napi::CallbackInfo& info) : Napi::ObjectWrap<PageServerSession>(info) {
    Napi::Object o = info[0].As<Napi::Object>();
    Napi::Array regions = o.Get("regions").As<Napi::Array>();
    try {
      for (uint32_t i = 0; i < regions.Length(); i++) {
        auto region = std::make_unique<ServedRegion>();
        region->image.Open(info.Env(), regions.Get(i).As<Napi::Object>());
        Napi::Value unit = regions.Get(i).As<Napi::Object>().Get("unit");  // checked in server/session.ts
        if (unit.IsNumber()) region->unit = static_cast<uint64_t>(unit.As<Napi::Number>().Int64Value());
        if (region->unit == 0 || region->image.pages % region->unit || region->unit > wire::MaxRunPages(region->image.pageSize))
          throw CodedError(info.Env(), "ERR_OUT_OF_RANGE", "a unit must divide the region and fit one run");
        region->sentUrgent = std::make_unique<AtomicBitmap>(region->image.pages);
        totalPages_ += region->image.pages;
        regions_.push_back(std::move(region));
      }
    } catch (...) {
      // The destructor does not run when a constructor throws: undo the pins.
      for (auto& r : regions_) r->image.Release();
      throw;
    }
    urgentFd_ = o.Get("urgentFd").As<Napi::Number>().Int32Value();
    bulkFd_ = o.Get("bulkFd").As<Napi::Number>().Int32Value();
    if (bulkFd_ >= 0) EnlargeSocketBuffer(bulkFd_, SO_SNDBUF, SO_SNDBUFFORCE, 8 << 20);
    windowForward_ = o.Get("windowForward").As<Napi::Number>().Uint32Value();
    windowBackward_ = o.Get("windowBackward").As<Napi::Number>().Uint32Value();
    std::vector<PageScheduler::Region> shapes;
    for (auto& r : regions_) shapes.push_back({r->image.pages, r->unit, wire::MaxRunPages(r->image.pageSize)});
    sched_ = std::make_unique<PageScheduler>(std::move(shapes), PageScheduler::Window{windowForward_, windowBackward_});
    sched_->WakeOnWork(bulkMu_, bulkCv_);
    for (auto& r : regions_) mostRun_ = std::max<uint64_t>(mostRun_, std::max<uint64_t>(r->unit, wire::MaxRunPages(r->image.pageSize)));
    background_ = o.Get("background").As<Napi::Boolean>().Value();
    precopy_ = o.Get("precopy").ToBoolean().Value();
    discardMarks_ = o.Has("discardMarks") && o.Get("discardMarks").ToBoolean().Value();
    packRuns_ = o.Has("packRuns") && o.Get("packRuns").ToBoolean().Value() && PackingAvailable();
    if (precopy_)
      for (auto& r : regions_) {
        r->everSent = std::make_unique<AtomicBitmap>(r->image.pages);
        r->queued = std::make_unique<AtomicBitmap>(r->image.pages);
      }
    rate_ = o.Get("rateBytesPerSecond").As<Napi::Number>().DoubleValue();
    // unconfirmedBudget: pages (0: none); at least one run of every region (checked in server/session.ts).
    Napi::Value budget = o.Get("unconfirmedBudget");
    if (budget.IsNumber()) budget_ = static_cast<uint64_t>(budget.As<Napi::Number>().Int64Value());
    if (budget_ > 0)
      for (auto& r : regions_) {
        if (budget_ < wire::MaxRunPages(r->image.pageSize)) throw CodedError(info.Env(), "ERR_OUT_OF_RANGE", "the unconfirmed budget must hold one run");
        r->confirmed = std::make_unique<AtomicBitmap>(r->image.pages);
      }
    // keys: {urgentDown, urgentUp, bulkDown}, 32 bytes each, when the channels are encrypted (TCP).
    Napi::Value keys = o.Get("keys");
    if (keys.IsObject()) {
      Napi::Object k = keys.As<Napi::Object>();
      for (auto [name, into] : {std::pair{"urgentDown", urgentDownKey_}, std::pair{"urgentUp", urgentUpKey_}, std::pair{"bulkDown", bulkDownKey_}}) {
        auto b = k.Get(name).As<Napi::Buffer<uint8_t>>();
        if (b.Length() != 32) throw CodedError(info.Env(), "ERR_OUT_OF_RANGE", "a data-channel key must be 32 bytes");
        std::memcpy(into, b.Data(), 32);
      }
      encrypted_ = true;
    }
    OpenPlane(info.Env(), o.Get("onEvent").As<Napi::Function>(), "PageServerSession");
    OwnSocket(urgentFd_);
    OwnSocket(bulkFd_);
    WakeOnStop(bulkMu_, bulkCv_);
  }

  ~PageServerSession() override { Shutdown(); }

 private:
  // markHeld(region, bitmap): pages the destination already holds (resume).
  Napi::Value MarkHeld(const Napi::CallbackInfo& info) {
    uint32_t id = info[0].As<Napi::Number>().Uint32Value();
    auto bits = info[1].As<Napi::TypedArrayOf<uint8_t>>();
    ServedRegion& r = *regions_.at(id);
    for (uint64_t p = 0; p < r.image.pages && p / 8 < bits.ByteLength(); p++)
      if ((bits.Data()[p / 8] >> (p % 8)) & 1) Settle(id, p);
    return info.Env().Undefined();
  }

  // confirm(region, offset, bitmap): bytes [offset, +length) of the region's
  // bitmap of pages the destination holds for good (release as sent): they
  // leave the unconfirmed budget, and are never sent again.
  Napi::Value Confirm(const Napi::CallbackInfo& info) {
    uint32_t id = info[0].As<Napi::Number>().Uint32Value();
    uint64_t offset = static_cast<uint64_t>(info[1].As<Napi::Number>().Int64Value());
    auto bits = info[2].As<Napi::TypedArrayOf<uint8_t>>();
    if (id >= regions_.size() || offset > (regions_[id]->image.pages + 7) / 8 || bits.ByteLength() > (regions_[id]->image.pages + 7) / 8 - offset)
      throw CodedError(info.Env(), "ERR_PROTOCOL_OUT_OF_RANGE", "confirm: bytes outside the region's bitmap");
    uint64_t pages = regions_[id]->image.pages;
    for (uint64_t i = 0; i < bits.ByteLength(); i++) {
      uint8_t byte = bits.Data()[i];
      for (uint64_t b = 0; byte && b < 8; b++)
        if ((byte >> b) & 1 && (offset + i) * 8 + b < pages) Settle(id, (offset + i) * 8 + b);
    }
    std::lock_guard<std::mutex> lock(bulkMu_);
    bulkCv_.notify_all();
    return info.Env().Undefined();
  }

  // Page p of r is the destination's for good: sent (never again), and, under a budget, confirmed.
  void Settle(uint32_t id, uint64_t p) {
    sched_->Claim(id, p);
    if (regions_[id]->confirmed && regions_[id]->confirmed->Claim(p)) settled_++;
  }

  // Pages sent and not yet confirmed (0 without a budget).
  uint64_t Unconfirmed() const {
    if (budget_ == 0) return 0;
    uint64_t sent = sched_->claimed(), settled = settled_.load();
    return sent > settled ? sent - settled : 0;
  }

  // After pages were claimed to be sent: the most ever unconfirmed, for stats().
  void NoteUnconfirmed() {
    uint64_t now = Unconfirmed(), peak = unconfirmedPeak_.load(std::memory_order_relaxed);
    while (now > peak && !unconfirmedPeak_.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {}
  }

  // The request thread's window and clusters go only while `pages` more fit the budget.
  bool Fits(uint64_t pages) const { return budget_ == 0 || Unconfirmed() + pages <= budget_; }
  // How many more pages fit the budget now.
  uint64_t Room() const {
    if (budget_ == 0) return UINT64_MAX;
    uint64_t now = Unconfirmed();
    return now < budget_ ? budget_ - now : 0;
  }

  // The bulk thread: waits until `pages` more fit the budget (or stop). Bounded steps: confirm() and stop() wake it sooner.
  void WaitForBudget(uint64_t pages) {
    if (Fits(pages)) return;
    budgetWaits_++;
    std::unique_lock<std::mutex> lock(bulkMu_);
    while (!Stopping() && !Fits(pages)) bulkCv_.wait_for(lock, std::chrono::milliseconds(100));
  }

  // prefetch(entries: Buffer of u64 LE, region << 48 | page): a working set
  // the destination replays, streamed in this order ahead of the background.
  // Checked in server/session.ts; checked again here before it is kept.
  Napi::Value Prefetch(const Napi::CallbackInfo& info) {
    auto bytes = info[0].As<Napi::TypedArrayOf<uint8_t>>();
    if (bytes.ByteLength() % 8) throw CodedError(info.Env(), "ERR_PROTOCOL_OUT_OF_RANGE", "prefetch entries are 8 bytes each");
    std::vector<uint64_t> entries(bytes.ByteLength() / 8);
    std::memcpy(entries.data(), bytes.Data(), bytes.ByteLength());
    for (uint64_t e : entries)
      if ((e >> 48) >= regions_.size() || (e & kPageMask) >= regions_[e >> 48]->image.pages)
        throw CodedError(info.Env(), "ERR_PROTOCOL_OUT_OF_RANGE", "a prefetch entry lies outside the image");
    if (sched_->WorkingSetSize() + entries.size() > totalPages_)
      throw CodedError(info.Env(), "ERR_PROTOCOL_OUT_OF_RANGE", "a working set larger than the image");
    sched_->AddWorkingSet(entries);  // (every entry checked above)
    return info.Env().Undefined();
  }

  // Flat u64 pairs (region << 48 | first page, count), each inside the image.
  static std::vector<std::pair<uint64_t, uint64_t>> Ranges(Napi::Env env, Napi::Value v, const std::vector<std::unique_ptr<ServedRegion>>& regions) {
    auto bytes = v.As<Napi::TypedArrayOf<uint8_t>>();
    if (bytes.ByteLength() % 16) throw CodedError(env, "ERR_OUT_OF_RANGE", "ranges are 16 bytes each");
    std::vector<std::pair<uint64_t, uint64_t>> out(bytes.ByteLength() / 16);
    std::memcpy(out.data(), bytes.Data(), bytes.ByteLength());
    for (auto& [at, count] : out) {
      uint64_t id = at >> 48, first = at & kPageMask;
      if (id >= regions.size() || first >= regions[id]->image.pages || count > regions[id]->image.pages - first)
        throw CodedError(env, "ERR_OUT_OF_RANGE", "a range lies outside the image");
    }
    return out;
  }

  // precopyRound(ranges): pages to send on the bulk channel now, while the
  // workload runs (the first round: all of them; later: those written since).
  Napi::Value PrecopyRound(const Napi::CallbackInfo& info) {
    auto ranges = Ranges(info.Env(), info[0], regions_);
    std::lock_guard<std::mutex> lock(bulkMu_);
    if (!precopy_ || switchRequested_) throw CodedError(info.Env(), "ERR_ENGINE_STATE", "precopy rounds come before the switchover of a live session");
    for (auto& [at, count] : ranges)
      for (uint64_t p = at & kPageMask; p < (at & kPageMask) + count; p++) regions_[at >> 48]->queued->Claim(p);
    rounds_.push_back({std::move(ranges), false});
    bulkCv_.notify_one();
    return info.Env().Undefined();
  }

  // discardRound(ranges): the workload still runs; of these pages (written
  // since they were sent), those the destination holds are dropped there now
  // (discard runs) and count as never sent: postcopy sends them. What would
  // otherwise be dropped during the pause is dropped before it, so the pause
  // holds only what is written after this round.
  Napi::Value DiscardRound(const Napi::CallbackInfo& info) {
    auto ranges = Ranges(info.Env(), info[0], regions_);
    std::lock_guard<std::mutex> lock(bulkMu_);
    if (!precopy_ || switchRequested_) throw CodedError(info.Env(), "ERR_ENGINE_STATE", "discard rounds come before the switchover of a live session");
    rounds_.push_back({std::move(ranges), true});
    bulkCv_.notify_one();
    return info.Env().Undefined();
  }

  // switchover(ranges): the workload is paused at the source; `ranges` holds
  // the pages written since the last round was queued. The bulk thread stops
  // precopy, tells the destination which pages it holds are stale
  // (discard runs) and that its workload may run (the switchover marker);
  // postcopy goes on from there: the rest on request and in the background.
  Napi::Value Switchover(const Napi::CallbackInfo& info) {
    auto ranges = Ranges(info.Env(), info[0], regions_);
    std::lock_guard<std::mutex> lock(bulkMu_);
    if (!precopy_ || switchRequested_) throw CodedError(info.Env(), "ERR_ENGINE_STATE", "one switchover, in a live session's precopy");
    finalWritten_ = std::move(ranges);
    switchRequested_ = true;
    bulkCv_.notify_one();
    return info.Env().Undefined();
  }

  // startBackground(): the background stream starts now (the destination held it back).
  Napi::Value StartBackground(const Napi::CallbackInfo& info) {
    std::lock_guard<std::mutex> lock(bulkMu_);
    background_ = true;
    bulkCv_.notify_one();
    return info.Env().Undefined();
  }

  Napi::Value Start(const Napi::CallbackInfo& info) {
    if (started_ || Stopped()) return info.Env().Undefined();
    started_ = true;
    startNs_ = MonotonicNs();
    Spawn("pc-requests", -1, [this] { RequestLoop(); });
    if (bulkFd_ >= 0 && BackgroundPacer::Needed(bulkFd_))
      pacer_ = std::make_unique<BackgroundPacer>(
          bulkFd_, [this] { return Stopping(); }, &demandAt_);
    if (bulkFd_ >= 0) Spawn("pc-background", -1, [this] { BulkLoop(); });
    return info.Env().Undefined();
  }

  Napi::Value Stop(const Napi::CallbackInfo& info) {
    Shutdown();
    return info.Env().Undefined();
  }

  void ReleaseReferences() override {
    for (auto& r : regions_) r->image.Release();
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object s = Napi::Object::New(env);
    auto set = [&](Napi::Object o, const char* k, double v) { o.Set(k, Napi::Number::New(env, v)); };
    auto n = [&](const char* k, uint64_t v) { set(s, k, static_cast<double>(v)); };
    n("requests", requests_);
    n("pagesRequested", pagesRequested_);
    n("pagesResent", pagesResent_);
    n("pagesAlreadyInFlight", pagesInFlight_);
    n("pagesWindow", pagesWindow_);
    n("pagesBackground", pagesBackground_);
    n("pagesPrefetched", pagesPrefetched_);
    n("zeroPages", zeroPages_);
    n("bytesSent", bytesSent_);
    n("pagesSent", sched_->claimed());
    n("totalPages", totalPages_);
    n("pagesPrecopied", precopyPages_);
    n("pagesDiscarded", discarded_);
    n("pagesUnconfirmed", Unconfirmed());
    n("pagesUnconfirmedPeak", unconfirmedPeak_);
    n("unconfirmedBudget", budget_);
    n("budgetWaits", budgetWaits_);
    n("backgroundDoneNs", backgroundDoneNs_ ? backgroundDoneNs_ - startNs_ : 0);
    n("packedRuns", packed_.runs);
    n("packedRawBytes", packed_.rawBytes);
    n("packedWireBytes", packed_.wireBytes);
    if (BackgroundPacer* p = pacer_.get()) {
      BackgroundPacer::Figures f = p->figures();
      Napi::Object pacing = Napi::Object::New(env);
      set(pacing, "windowBytes", static_cast<double>(f.windowBytes));
      set(pacing, "minRttUs", static_cast<double>(f.minRttUs));
      set(pacing, "rttUs", static_cast<double>(f.rttUs));
      set(pacing, "waits", static_cast<double>(f.waits));
      set(pacing, "waitMs", static_cast<double>(f.waitNs) / 1e6);
      s.Set("backgroundPacing", pacing);
    }
    return s;
  }

  void Fail(const char* channel, const char* code, const std::string& message) { events_.Emit({"error", channel, code, message}); }

  // Adds pages [first, first+count) of region `id` to the batch as data and
  // zero runs. Returns 0 or the errno of a failed send.
  int AddRuns(RunBatch& batch, uint32_t id, uint64_t first, uint64_t count, uint32_t reason) {
    const ServedRegion& r = *regions_[id];
    uint64_t p = first, end = first + count, unit = r.unit;
    auto zeroUnit = [&](uint64_t at) {  // (first and count are whole units)
      for (uint64_t k = at; k < at + unit; k++)
        if (!r.image.IsZero(k)) return false;
      return true;
    };
    while (p < end) {
      bool zero = zeroUnit(p);
      uint64_t q = p + unit;
      while (q < end && zeroUnit(q) == zero) q += unit;
      if (int err = batch.Add(id, r.image, p, static_cast<uint32_t>(q - p), zero, reason)) return err;
      if (zero) zeroPages_ += q - p;
      p = q;
    }
    return 0;
  }

  std::unique_ptr<Aead> Key(const uint8_t* key, uint32_t direction, bool seal) const {
    return encrypted_ ? std::make_unique<Aead>(key, direction, seal) : nullptr;
  }

  void RequestLoop() {
    std::vector<wire::PageRequest> reqs(64);
    size_t have = 0;  // bytes buffered in reqs
    ChannelReader in(urgentFd_, Key(urgentUpKey_, kUrgentUp, false));
    ChannelWriter out(urgentFd_, Key(urgentDownKey_, kUrgentDown, true));
    RunBatch batch(out, 256, bytesSent_);
    while (!Stopping()) {
      ssize_t got = in.ReadSome(reinterpret_cast<char*>(reqs.data()) + have, reqs.size() * sizeof(wire::PageRequest) - have);
      if (got == kBadRecord) return Fail("urgent", "ERR_DATA_TAMPERED", "a record on the urgent channel failed authentication");
      if (got <= 0) {
        if (!Stopping())
          events_.Emit(ErrnoEvent("closed", "urgent", got < 0 ? static_cast<int>(-got) : 0, "read", "the destination closed the urgent channel"));
        return;
      }
      have += static_cast<size_t>(got);
      size_t count = have / sizeof(wire::PageRequest);
      for (size_t i = 0; i < count; i++) {
        const wire::PageRequest& req = reqs[i];
        if (req.kind != wire::kRequest) return Fail("urgent", "ERR_PROTOCOL_MALFORMED", "unknown frame kind on the urgent channel");
        if (req.region >= regions_.size() || req.page >= regions_[req.region]->image.pages)
          return Fail("urgent", "ERR_PROTOCOL_OUT_OF_RANGE", "page request outside the served regions");
        if (int err = Answer(batch, req.region, req.page)) return FailWrite(err);
      }
      if (int err = batch.Flush()) return FailWrite(err);
      size_t used = count * sizeof(wire::PageRequest);
      std::memmove(reqs.data(), reinterpret_cast<char*>(reqs.data()) + used, have - used);
      have -= used;
    }
  }

  void FailWrite(int err) {
    if (!Stopping()) events_.Emit(ErrnoEvent("error", "urgent", err, "writev", "write to the urgent channel failed"));
  }

  // The requested page goes first. It is sent again even if the background
  // thread sent it already (that copy may sit behind megabytes of bulk data),
  // but not if it went out on this channel, where it is already ahead of us.
  // Then what the scheduler adds around it: the window pages nobody has sent
  // yet and the working set's cluster, while they fit the budget. In a
  // region served in units, the whole unit of the page and whole units around.
  int Answer(RunBatch& batch, uint32_t id, uint64_t page) {
    ServedRegion& r = *regions_[id];
    uint64_t first = page - page % r.unit;
    requests_++;
    demandAt_.store(MonotonicNs(), std::memory_order_relaxed);
    runs_.clear();
    if (sched_->Request(id, first, r.unit, runs_) > 0) {  // sent already
      // Ahead of us on this channel; or, across a link, on the paced bulk
      // channel, where at most the pacer's window is ahead of it in the
      // link's queue: a copy sent now would queue behind the same bytes.
      if (r.sentUrgent->Test(first) || (pacer_ && !precopy_)) {
        pagesInFlight_ += r.unit;
        return 0;
      }
      pagesResent_ += r.unit;
      runs_.push_back({id, first, r.unit, Why::kRequested});
    }
    pagesRequested_ += r.unit;
    NoteUnconfirmed();
    // Across a link with the background on, the neighbours ride the
    // background: its cursor jumps to this page, so they follow on the bulk
    // channel at the link's pace instead of making the next fault wait
    // behind them here.
    if (!(pacer_ && background_.load(std::memory_order_relaxed))) sched_->Around(id, first, r.unit, Room(), runs_);
    NoteUnconfirmed();
    for (const PageRun& run : runs_) {
      for (uint64_t k = run.first; k < run.first + run.count; k += r.unit) r.sentUrgent->Claim(k);
      if (run.why == Why::kWindow) pagesWindow_ += run.count;
      if (run.why == Why::kWorkingSet) pagesPrefetched_ += run.count;
      if (int err = AddRuns(batch, id, run.first, run.count, static_cast<uint32_t>(run.why))) return err;
    }
    return 0;
  }

  // The bulk channel: the working set to prefetch first, in its order, about
  // one run's bytes at a time; then the background, when it is on.
  void BulkLoop() {
    ChannelWriter out(bulkFd_, Key(bulkDownKey_, kBulkDown, true));
    Packer packer;
    if (pacer_) {
      pacer_->WriteFromThisThread();
      out.PaceWith(pacer_.get());
    }
    // Packed runs across a link, while it is slower than this CPU packs
    // (both as measured so far: the link by the pacer, the codec by its runs).
    RunBatch batch(out, 64, bytesSent_);
    bool packing = false;
    auto packNext = [&] {
      packing = packRuns_ && pacer_ && (packer.BytesPerSecond() == 0 || pacer_->LinkBytesPerSecond() < packer.BytesPerSecond());
      batch.PackWith(packing ? &packer : nullptr, &packed_);
    };
    packNext();
    if (precopy_) {
      int err = Precopy(out, batch);
      if (err) {
        if (!Stopping()) events_.Emit(ErrnoEvent("error", "bulk", err, "writev", "write to the bulk channel failed"));
        return;
      }
      if (Stopping()) return;
    }
    uint64_t sentBytes = 0;
    uint64_t t0 = MonotonicNs();
    while (!Stopping()) {
      if (sched_->AllClaimed()) break;
      bool background;
      {
        std::unique_lock<std::mutex> lock(bulkMu_);
        bulkCv_.wait(lock, [&] { return Stopping() || sched_->HasWork() || background_; });
        if (Stopping()) return;
        background = background_;
      }
      packNext();
      bool prefetched = false;
      int err = SendPrefetch(batch, &prefetched);
      if (!err && !prefetched && background) {
        WaitForBudget(mostRun_);
        if (Stopping()) return;
        PageRun run;
        // Across a link, a run no larger on the wire than the pacer's window
        // (packed runs shrink by the ratio packing has had so far): a page
        // claimed is then on its way within about the link's target delay.
        uint64_t most = mostRun_;
        if (pacer_) {
          double shrink = packing && packed_.rawBytes > 0 ? std::clamp(double(packed_.wireBytes) / double(packed_.rawBytes), 1.0 / 16, 1.0) : 1.0;
          most = std::min<uint64_t>(mostRun_, std::max<uint64_t>(1, static_cast<uint64_t>(double(pacer_->WindowNow(MonotonicNs())) / shrink) / 4096));
        }
        if (!sched_->NextBackgroundRun(most, &run)) continue;  // (the last pages were taken meanwhile)
        pagesBackground_ += run.count;
        NoteUnconfirmed();
        err = AddRuns(batch, run.region, run.first, run.count, wire::kBackground);
        sentBytes += run.count * regions_[run.region]->image.pageSize;
      }
      if (!err) err = batch.Flush();
      if (err) {
        if (!Stopping()) events_.Emit(ErrnoEvent("error", "bulk", err, "writev", "write to the bulk channel failed"));
        return;
      }
      if (rate_ > 0) Pace(t0, sentBytes);
    }
    if (Stopping()) return;
    wire::RunHeader end{wire::kBulkEnd, 0, 0, 0, wire::kBackground};
    if (out.Write(&end, sizeof end) == 0) bytesSent_ += sizeof end;
    backgroundDoneNs_ = MonotonicNs();
    events_.Emit({"background-done", "bulk", "", ""});
  }

  // Precopy: rounds until the switchover, then the discards and the marker.
  // Returns 0 (switched over, or stopping) or the errno of a failed send.
  int Precopy(ChannelWriter& out, RunBatch& batch) {
    for (;;) {
      std::vector<std::pair<uint64_t, uint64_t>> round;
      bool discard = false;
      {
        std::unique_lock<std::mutex> lock(bulkMu_);
        bulkCv_.wait(lock, [&] { return Stopping() || switchRequested_ || !rounds_.empty(); });
        if (Stopping()) return 0;
        if (switchRequested_) break;
        round = std::move(rounds_.front().ranges);
        discard = rounds_.front().discard;
        rounds_.pop_front();
      }
      if (discard) {
        uint64_t t0 = MonotonicNs(), dropped = 0;
        if (int err = DiscardStale(out, round, false, &dropped)) return err;
        uint32_t number = ++discardRounds_;
        if (discardMarks_) {
          wire::RunHeader mark{wire::kDiscardMark, 0, 0, number, wire::kPrecopy};
          if (int err = out.Write(&mark, sizeof mark)) return err;
          bytesSent_ += sizeof mark;
        }
        discarded_ += dropped;
        events_.Emit({"discard-round-sent", "bulk", "", "", 0, {{"pages", double(dropped)}, {"ns", double(MonotonicNs() - t0)}, {"round", double(number)}}});
        continue;
      }
      uint64_t t0 = MonotonicNs(), pages = 0, bytes0 = bytesSent_.load();
      bool cut = false;
      for (auto& [at, count] : round) {
        uint32_t id = static_cast<uint32_t>(at >> 48);
        ServedRegion& r = *regions_[id];
        uint32_t maxRun = wire::MaxRunPages(r.image.pageSize);
        for (uint64_t p = at & kPageMask, end = p + count; p < end && !cut;) {
          uint64_t n = std::min<uint64_t>(maxRun, end - p);
          // Marked before it is read: a write after this is in the next scan, never lost.
          for (uint64_t k = p; k < p + n; k++) {
            r.everSent->Claim(k);
            r.queued->Clear(k);
          }
          if (int err = AddRuns(batch, id, p, n, wire::kPrecopy)) return err;
          if (int err = batch.Flush()) return err;
          pages += n;
          p += n;
          if (rate_ > 0) Pace(t0, (bytesSent_.load() - bytes0));
          cut = Stopping() || switchRequestedNow();
        }
        if (cut) break;
      }
      precopyPages_ += pages;
      if (Stopping()) return 0;
      events_.Emit(
          {"round-sent", "bulk", "", "", 0, {{"pages", double(pages)}, {"bytes", double(bytesSent_.load() - bytes0)}, {"ns", double(MonotonicNs() - t0)}}});
    }
    // The switchover. Stale at the destination: pages sent that were written
    // since (the final scan) or queued again and not sent since.
    std::vector<std::pair<uint64_t, uint64_t>> written;
    {
      std::lock_guard<std::mutex> lock(bulkMu_);
      written.swap(finalWritten_);
      rounds_.clear();
    }
    uint64_t discarded = 0;
    if (int err = DiscardStale(out, written, true, &discarded)) return err;
    wire::RunHeader marker{wire::kSwitchover, 0, 0, 0, wire::kPrecopy};
    if (int err = out.Write(&marker, sizeof marker)) return err;
    bytesSent_ += sizeof marker;
    {
      std::lock_guard<std::mutex> lock(bulkMu_);
      precopy_ = false;
    }
    discarded_ += discarded;
    events_.Emit({"switched-over", "bulk", "", "", 0, {{"discarded", double(discarded_.load())}, {"held", double(held_)}}});
    return 0;
  }

  // Discard runs for the pages the destination holds stale: those sent that
  // are in `written`, or (at the switchover, `final`) queued again and not
  // sent since. A discarded page counts as never sent. At the switchover,
  // every page sent and not stale is held by the destination as it is now:
  // claimed in the scheduler, never sent again. The headers go out in
  // batches (one write per batch, not one per stretch).
  int DiscardStale(ChannelWriter& out, const std::vector<std::pair<uint64_t, uint64_t>>& written, bool final, uint64_t* discarded) {
    std::vector<std::unique_ptr<AtomicBitmap>> stale;
    for (auto& r : regions_) stale.push_back(std::make_unique<AtomicBitmap>(r->image.pages));
    for (auto& [at, count] : written)
      for (uint64_t p = at & kPageMask; p < (at & kPageMask) + count; p++) stale[at >> 48]->Claim(p);
    std::vector<wire::RunHeader> headers;
    constexpr size_t kHeadersPerWrite = 4096;
    auto flush = [&]() -> int {
      if (headers.empty()) return 0;
      if (int err = out.Write(headers.data(), headers.size() * sizeof(wire::RunHeader))) return err;
      bytesSent_ += headers.size() * sizeof(wire::RunHeader);
      headers.clear();
      return 0;
    };
    for (uint32_t id = 0; id < regions_.size(); id++) {
      ServedRegion& r = *regions_[id];
      uint32_t maxRun = wire::MaxRunPages(r.image.pageSize);
      auto isStale = [&](uint64_t p) { return stale[id]->Test(p) || (final && r.queued->Test(p)); };
      for (uint64_t p = 0; p < r.image.pages;) {
        if (!r.everSent->Test(p)) {
          p++;
          continue;
        }
        if (!isStale(p)) {
          if (final) {  // the destination holds it as it is now: never sent again
            sched_->Claim(id, p);
            held_++;
          }
          p++;
          continue;
        }
        uint64_t q = p + 1;
        while (q < r.image.pages && q - p < maxRun && r.everSent->Test(q) && isStale(q)) q++;
        headers.push_back({wire::kDiscardRun, id, p, static_cast<uint32_t>(q - p), wire::kPrecopy});
        for (uint64_t k = p; k < q; k++) r.everSent->Clear(k);
        *discarded += q - p;
        p = q;
        if (headers.size() == kHeadersPerWrite)
          if (int err = flush()) return err;
      }
    }
    return flush();
  }

  bool switchRequestedNow() {
    std::lock_guard<std::mutex> lock(bulkMu_);
    return switchRequested_;
  }

  // The working set's next runs, in its order, about one run's bytes: each
  // entry not sent yet with the pages of the set contiguous to it (a cold
  // start touches clusters). `*any`: whether a run went into the batch.
  int SendPrefetch(RunBatch& batch, bool* any) {
    PageRun run;
    for (uint64_t bytes = 0; bytes < wire::kMaxRunBytes;) {
      if (!Fits(mostRun_)) {  // what is batched goes first: only pages sent can be confirmed
        if (int err = batch.Flush()) return err;
        WaitForBudget(mostRun_);
        if (Stopping()) return 0;
      }
      if (!sched_->NextWorkingSetRun(&run)) break;
      *any = true;
      pagesPrefetched_ += run.count;
      NoteUnconfirmed();
      if (int err = AddRuns(batch, run.region, run.first, run.count, wire::kPrefetch)) return err;
      bytes += run.count * regions_[run.region]->image.pageSize;
    }
    return 0;
  }

  // Sleeps (in short steps, so stop() stays prompt) until `sent` bytes fit the rate.
  void Pace(uint64_t t0, uint64_t sent) {
    uint64_t due = t0 + static_cast<uint64_t>(static_cast<double>(sent) / rate_ * 1e9);
    for (uint64_t now = MonotonicNs(); now < due && !Stopping(); now = MonotonicNs()) {
      uint64_t wait = std::min<uint64_t>(due - now, 10'000'000);
      timespec ts{static_cast<time_t>(wait / 1000000000ull), static_cast<long>(wait % 1000000000ull)};
      nanosleep(&ts, nullptr);
    }
  }

  static constexpr uint64_t kPageMask = (1ull << 48) - 1;
  std::vector<std::unique_ptr<ServedRegion>> regions_;
  uint64_t totalPages_ = 0;
  // Which pages go next (claimed once, by either thread); the request thread's runs.
  std::unique_ptr<PageScheduler> sched_;
  PageRuns runs_;
  uint64_t mostRun_ = 1;  // the most pages in one run of any region: what the bulk thread waits to fit the budget
  // The bulk thread's wakeups (the scheduler's working set, and whether the background is on).
  std::mutex bulkMu_;
  std::condition_variable bulkCv_;
  // Precopy (a live source), under bulkMu_: the rounds queued, and the switchover asked for.
  bool precopy_ = false, switchRequested_ = false;
  bool packRuns_ = false;  // the destination takes packed runs (and zstd is here): across a link, bulk runs may go packed
  PackedFigures packed_;
  bool discardMarks_ = false;   // the destination answers each discard round's mark (`dropped`)
  uint32_t discardRounds_ = 0;  // the bulk thread's: discard rounds sent
  uint64_t held_ = 0;           // the bulk thread's: pages the destination holds as they are at the switchover
  // A round sends its pages; a discard round tells the destination that the pages it holds of these are stale.
  struct Round {
    std::vector<std::pair<uint64_t, uint64_t>> ranges;
    bool discard;
  };
  std::deque<Round> rounds_;
  std::vector<std::pair<uint64_t, uint64_t>> finalWritten_;
  int urgentFd_ = -1, bulkFd_ = -1;
  uint32_t windowForward_ = 0, windowBackward_ = 0;
  std::atomic<bool> background_{true};
  double rate_ = 0;
  // The bulk channel's share of a network link, when it crosses one (made by
  // start() before the bulk thread, so stats() may read it from then on).
  std::unique_ptr<BackgroundPacer> pacer_;
  std::atomic<uint64_t> demandAt_{0};  // when the last request came (the pacer spins only while faults are served)
  bool encrypted_ = false;
  uint8_t urgentDownKey_[32] = {}, urgentUpKey_[32] = {}, bulkDownKey_[32] = {};
  bool started_ = false;
  uint64_t budget_ = 0;  // pages sent and not confirmed, at most (0: no budget)
  std::atomic<uint64_t> settled_{0}, unconfirmedPeak_{0}, budgetWaits_{0};
  std::atomic<uint64_t> requests_{0}, pagesRequested_{0}, pagesResent_{0}, pagesInFlight_{0}, pagesWindow_{0}, pagesBackground_{0}, pagesPrefetched_{0},
      zeroPages_{0}, bytesSent_{0}, precopyPages_{0}, discarded_{0};
  uint64_t startNs_ = 0;
  std::atomic<uint64_t> backgroundDoneNs_{0};
};

}  // namespace

void InitPageServer(Napi::Env env, Napi::Object exports) { exports.Set("PageServerSession", PageServerSession::Define(env)); }

}  // namespace uffdpc
