#include "remote_supply.h"

#include "run_packer.h"

#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "io.h"
#include "threads.h"

namespace uffdpc {

RemoteSupply::RemoteSupply(TargetMap& map, Installer& installer, EngineStats& stats, EventSink& events, EngineLife& life, int resendFd)
    : map_(map), installer_(installer), stats_(stats), events_(events), life_(life), resendFd_(resendFd) {
  reqs_.reserve(256);
  resend_.reserve(256);
}

RemoteSupply::~RemoteSupply() { Detach(); }

uint32_t RemoteSupply::Attach(int urgent, int bulk, const Keys* keys, int cpu) {
  auto key = [&](const uint8_t* k, uint32_t direction, bool seal) { return keys ? std::make_unique<Aead>(k, direction, seal) : nullptr; };
  EnlargeSocketBuffer(bulk, SO_RCVBUF, SO_RCVBUFFORCE, 8 << 20);
  uint32_t generation = generation_.load() + 1;
  {
    // The generation first: a write that fails on the new fd reports the new generation.
    std::lock_guard<std::mutex> lock(urgentMu_);
    generation_.store(generation);
    urgentFd_.store(urgent);
    urgentWriter_ = std::make_unique<ChannelWriter>(urgent, keys ? key(keys->urgentUp, kUrgentUp, true) : nullptr);
    urgentBroken_ = false;
  }
  bulkFd_ = bulk;
  attached_ = true;
  auto urgentIn = std::make_shared<ChannelReader>(urgent, keys ? key(keys->urgentDown, kUrgentDown, false) : nullptr);
  auto bulkIn = std::make_shared<ChannelReader>(bulk, keys ? key(keys->bulkDown, kBulkDown, false) : nullptr);
  urgentThread_ = std::thread([this, urgentIn, generation, cpu] {
    NameAndPinThisThread("pc-urgent-rx", cpu);
    ReceiveLoop(*urgentIn, "urgent", generation);
  });
  bulkThread_ = std::thread([this, bulkIn, generation, cpu] {
    NameAndPinThisThread("pc-bulk-rx", cpu);
    ReceiveLoop(*bulkIn, "bulk", generation);
  });
  // Requests the old channels never answered go out first, from the fault thread.
  uint64_t one = 1;
  if (write(resendFd_, &one, sizeof one) < 0) {}
  return generation;
}

void RemoteSupply::Detach() {
  if (!attached_) return;
  life_.detaching.store(true);
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
  life_.detaching.store(false);
}

// Sends the batched requests on the current urgent channel. With no channel
// (paused) or a broken one, they stay recorded as requested and go out again
// when channels are attached.
void RemoteSupply::SendRequests(std::vector<wire::PageRequest>& reqs) {
  if (reqs.empty()) return;
  std::lock_guard<std::mutex> lock(urgentMu_);
  if (urgentWriter_ && !urgentBroken_) {
    int err = urgentWriter_->Write(reqs.data(), reqs.size() * sizeof(wire::PageRequest));
    if (err) {
      urgentBroken_ = true;
      if (!life_.Leaving()) events_.Emit(ErrnoEvent("error", "urgent", err, "write", "sending a page request failed", generation_.load()));
    } else {
      stats_.requestsSent += reqs.size();
    }
  }
  reqs.clear();
}

// After an attach: every page asked for and still missing is asked for again.
void RemoteSupply::OnWake() {
  uint64_t count;
  if (read(resendFd_, &count, sizeof count) < 0) {}
  for (auto& r : map_.regions()) {
    for (uint64_t p = 0; p < r->pages; p++) {
      if (!r->requested->Test(p) || r->settled->Test(p)) continue;
      resend_.push_back({wire::kRequest, r->sourceRegion, r->SourceOf(p)});
      stats_.requestsResent++;
      if (resend_.size() == 256) SendRequests(resend_);
    }
  }
  SendRequests(resend_);
}

void RemoteSupply::ReceiveLoop(ChannelReader& in, const char* channel, uint32_t generation) {
  auto report = [&](const char* type, const std::string& code, const char* message) {
    if (!life_.Leaving()) events_.Emit({type, channel, code, message, generation});
  };
  // A sealed record failed authentication (tampered, replayed, cut short): nothing of it was used; the channel ends.
  auto tampered = [&] {
    report("error", "ERR_DATA_TAMPERED", "a record on the channel failed authentication; nothing of it was installed");
    shutdown(in.fd(), SHUT_RDWR);
  };
  const uint64_t maxRunBytes = map_.maxRunBytes();
  void* raw = nullptr;
  if (posix_memalign(&raw, 4096, maxRunBytes) != 0) {
    if (!life_.Leaving()) events_.Emit(ErrnoEvent("error", channel, ENOMEM, "posix_memalign", "cannot allocate the receive buffer", generation));
    return;
  }
  std::unique_ptr<uint8_t, decltype(&free)> buffer(static_cast<uint8_t*>(raw), &free);
  std::vector<uint8_t> packedBuffer;  // a packed run as it came (allocated with the first one)
  Unpacker unpacker;
  while (!life_.Leaving()) {
    wire::RunHeader h;
    int err = in.ReadFull(&h, sizeof h);
    if (err == kBadRecord) return tampered();
    if (err) {
      if (!life_.Leaving()) events_.Emit(ErrnoEvent("closed", channel, err > 0 ? err : 0, "read", "the source closed the channel", generation));
      return;
    }
    stats_.bytesReceived += sizeof h;
    if (h.kind == wire::kBulkEnd) {
      report("background-done", "", "");
      continue;
    }
    if (h.kind == wire::kSwitchover) {
      if (std::strcmp(channel, "bulk") != 0 || !map_.InPrecopy()) {
        report("error", "ERR_PROTOCOL_MALFORMED", "a switchover outside a live source's precopy; channel closed");
        shutdown(in.fd(), SHUT_RDWR);
        return;
      }
      installer_.SwitchedOver();
      continue;
    }
    if (h.kind == wire::kDiscardMark) {
      if (std::strcmp(channel, "bulk") != 0 || !map_.InPrecopy()) {
        report("error", "ERR_PROTOCOL_MALFORMED", "a discard mark outside a live source's precopy; channel closed");
        shutdown(in.fd(), SHUT_RDWR);
        return;
      }
      // Every discard run before it is applied (this thread applied them in order).
      if (!life_.Leaving()) events_.Emit({"discards-dropped", channel, "", "", generation, {{"round", double(h.count)}}});
      continue;
    }
    const char* bad = Validate(h);
    if (bad) {
      report("error", bad, "the source sent a run outside the negotiated regions; channel closed");
      shutdown(in.fd(), SHUT_RDWR);
      return;
    }
    uint64_t pageSize = map_.sourcePageSize(h.region);
    const uint8_t* runData = nullptr;  // the run's pages: in `buffer`, or in place in a sealed record
    if (h.kind == wire::kPackedRun) {
      // Read whole, then unpacked into `buffer`: exactly the run's bytes, or the channel ends.
      uint32_t length = 0;
      const uint8_t* packed = nullptr;
      err = in.ReadFull(&length, sizeof length);
      if (!err && (length == 0 || length > PackedBound(h.count * pageSize))) {
        report("error", "ERR_PROTOCOL_OUT_OF_RANGE", "a packed run longer than its pages can pack to; channel closed");
        shutdown(in.fd(), SHUT_RDWR);
        return;
      }
      if (!err && packedBuffer.empty()) packedBuffer.resize(PackedBound(maxRunBytes));
      if (!err) err = in.ReadView(packedBuffer.data(), length, &packed);
      if (err) {
        if (err == kBadRecord) return tampered();
        if (!life_.Leaving()) events_.Emit(ErrnoEvent("closed", channel, err > 0 ? err : EPIPE, "read", "the source closed the channel mid-run", generation));
        return;
      }
      if (!unpacker.Unpack(packed, length, buffer.get(), h.count * pageSize)) {
        report("error", "ERR_PROTOCOL_MALFORMED", "a packed run does not unpack to its pages; nothing of it was installed, channel closed");
        shutdown(in.fd(), SHUT_RDWR);
        return;
      }
      runData = buffer.get();
      stats_.bytesReceived += sizeof length + length;
      stats_.packedRuns++;
    }
    if (h.kind == wire::kDataRun) {
      // A run is installed only once all of it is here: a cut mid-run drops it.
      if ((err = in.ReadView(buffer.get(), h.count * pageSize, &runData))) {
        if (err == kBadRecord) return tampered();
        if (!life_.Leaving()) events_.Emit(ErrnoEvent("closed", channel, err > 0 ? err : EPIPE, "read", "the source closed the channel mid-run", generation));
        return;
      }
      stats_.bytesReceived += h.count * pageSize;
    }
    // Install the part of the run each target region covers; the rest of the
    // image is not mapped by this destination.
    uint64_t first = h.first_page, end = h.first_page + h.count, covered = 0;
    for (auto& r : map_.regions()) {
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
        installer_.Discard(*r, (lo - r->sourcePage) / r->ratio, (hi - lo) / r->ratio);
        continue;
      }
      const uint8_t* data = runData ? runData + (lo - first) * pageSize : nullptr;
      if (h.reason == wire::kPrecopy) {
        if (installer_.Precopied(*r, (lo - r->sourcePage) / r->ratio, (hi - lo) / r->ratio, data, channel, generation) == kStop) return;
        continue;
      }
      if (installer_.Install(*r, (lo - r->sourcePage) / r->ratio, (hi - lo) / r->ratio, data, h.reason, channel, generation) == kStop) return;
    }
    stats_.unmappedPages += h.count - covered;
  }
}

// Every field is checked before any of it is used to compute an address.
const char* RemoteSupply::Validate(const wire::RunHeader& h) const {
  if (h.kind != wire::kDataRun && h.kind != wire::kZeroRun && h.kind != wire::kDiscardRun && h.kind != wire::kPackedRun) return "ERR_PROTOCOL_MALFORMED";
  if (h.region >= map_.sourceRegions() || h.reason > wire::kPrecopy) return "ERR_PROTOCOL_OUT_OF_RANGE";
  // Precopy runs and discards come from a live source, before its switchover only.
  if ((h.reason == wire::kPrecopy || h.kind == wire::kDiscardRun) && (!map_.InPrecopy() || h.reason != wire::kPrecopy)) return "ERR_PROTOCOL_MALFORMED";
  uint64_t pages = map_.sourcePages(h.region), pageSize = map_.sourcePageSize(h.region);
  if (h.count == 0 || h.count > wire::MaxRunPages(pageSize)) return "ERR_PROTOCOL_OUT_OF_RANGE";
  if (uint64_t(h.count) * pageSize > map_.maxRunBytes()) return "ERR_PROTOCOL_OUT_OF_RANGE";  // the receive buffer's size
  if (h.first_page >= pages || h.count > pages - h.first_page) return "ERR_PROTOCOL_OUT_OF_RANGE";
  return nullptr;
}

}  // namespace uffdpc
