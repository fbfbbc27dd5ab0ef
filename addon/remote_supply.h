// Pages from a remote source over a pair of data channels: the fault thread
// asks on the urgent channel, a batch per read of the userfaultfd; a receiver
// thread per channel reads runs (sealed records when the channels are
// encrypted, addon/secure_channel.h) and hands each to the installer whole.
//
// The channels come and go while the engine lives: Attach() starts receivers
// on a new pair (a new generation) and has the fault thread re-send every
// request still unanswered; Detach() stops them. In between (a paused
// session) faults are recorded as requested and wait, and nothing that
// arrived only in part is ever installed.
#pragma once
#include <atomic>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "engine_stats.h"
#include "events.h"
#include "installer.h"
#include "page_supply.h"
#include "secure_channel.h"
#include "target_map.h"
#include "wire.h"

namespace uffdpc {

class RemoteSupply final : public PageSupply {
 public:
  // `resendFd`: a non-blocking eventfd (the engine closes it at its shutdown).
  RemoteSupply(TargetMap& map, Installer& installer, EngineStats& stats, EventSink& events, EngineLife& life, int resendFd);
  ~RemoteSupply() override;

  // The channels' keys, 32 bytes each: they carry sealed records.
  struct Keys {
    uint8_t urgentDown[32], urgentUp[32], bulkDown[32];
  };
  // Takes both fds (the caller checked it may: started, not stopped, not attached); returns the new generation.
  uint32_t Attach(int urgent, int bulk, const Keys* keys, int cpu);
  // Stops the receivers and closes the channels; a run that arrived only in part is dropped.
  void Detach();
  bool attached() const { return attached_; }
  uint32_t generation() const { return generation_.load(); }

  void Ask(TargetRegion& r, uint64_t page) override { reqs_.push_back({wire::kRequest, r.sourceRegion, r.SourceOf(page)}); }
  void Flush() override { SendRequests(reqs_); }
  void Leave() override { Detach(); }
  // After an attach the fault thread sends again every request still unanswered.
  int WakeFd() const override { return resendFd_; }
  void OnWake() override;

 private:
  void SendRequests(std::vector<wire::PageRequest>& reqs);
  void ReceiveLoop(ChannelReader& in, const char* channel, uint32_t generation);
  const char* Validate(const wire::RunHeader& h) const;

  TargetMap& map_;
  Installer& installer_;
  EngineStats& stats_;
  EventSink& events_;
  EngineLife& life_;
  int resendFd_ = -1;
  std::vector<wire::PageRequest> reqs_, resend_;  // fault thread only: this batch's requests; those sent again after an attach
  // The urgent channel is written by the fault thread and swapped by the JS
  // thread: the mutex keeps a write and a close from meeting.
  std::mutex urgentMu_;
  std::atomic<int> urgentFd_{-1};
  std::unique_ptr<ChannelWriter> urgentWriter_;  // under urgentMu_: sealed when the channels are encrypted
  bool urgentBroken_ = false;                    // under urgentMu_: a write failed; wait for new channels
  int bulkFd_ = -1;
  std::atomic<uint32_t> generation_{0};
  bool attached_ = false;
  std::thread urgentThread_, bulkThread_;
};

}  // namespace uffdpc
