// The destination's fault thread: reads the userfaultfd, hands each missing
// page to the supply once (however many threads fault on it), serves faults
// on pages that are there, and follows the process's memory events (memory
// given back, unmapped, moved). With no channels attached the loop goes on:
// faults are recorded as requested and wait.
#pragma once
#include <mutex>
#include <vector>

#include "engine_life.h"
#include "engine_stats.h"
#include "events.h"
#include "installer.h"
#include "page_supply.h"
#include "target_map.h"
#include "uffd_abi.h"

namespace uffdpc {

class FaultLoop {
 public:
  // `uffd` -1: a template's filler (no process of its own; its faults are its clones' demands).
  // `removeGivesBack`: memory the process gives back settles as zeros (not for a clone, whose memory reads the template's file again).
  FaultLoop(EngineLife& life, TargetMap& map, Installer& installer, EngineStats& stats, EventSink& events, int uffd, bool recordFaults, bool removeGivesBack)
      : life_(life),
        map_(map),
        installer_(installer),
        stats_(stats),
        events_(events),
        uffd_(uffd),
        recordFaults_(recordFaults),
        removeGivesBack_(removeGivesBack) {}

  void SetSupply(PageSupply* supply) { supply_ = supply; }
  // Before Start: more work for the fault thread (at most two parts: the supply and a template's filler).
  void AddWork(FaultThreadWork* work) { work_.push_back(work); }

  // Starts the fault thread (joined by the engine's shutdown); it runs until `stopFd` (the engine's wake fd) is readable.
  void Start(int stopFd, int cpu);

  // faultedPages(): every page a thread faulted on while it was missing, in
  // first-touch order (recordFaults), as source region << 48 | source page.
  std::vector<uint64_t> FaultedPages() {
    std::lock_guard<std::mutex> lock(recordMu_);
    return faulted_;
  }

 private:
  void Run(int stopFd);
  void OnFault(uint64_t address, uint64_t now);
  void OnMemoryEvent(const uffd_msg& m);

  EngineLife& life_;
  TargetMap& map_;
  Installer& installer_;
  EngineStats& stats_;
  EventSink& events_;
  int uffd_;
  bool recordFaults_, removeGivesBack_;
  PageSupply* supply_ = nullptr;
  std::vector<FaultThreadWork*> work_;
  std::mutex recordMu_;
  std::vector<uint64_t> faulted_;  // under recordMu_
};

}  // namespace uffdpc
