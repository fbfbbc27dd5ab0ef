// Where the destination's missing pages come from, chosen once when the engine
// is built: a remote source over data channels (remote_supply.h), an image
// mapped in this process (image_supply.h), or a template this engine's guest
// is a clone of (template_supply.h). A supply owns its threads and state and
// sees the memory only through the target map and the installer.
#pragma once
#include <cstddef>
#include <cstdint>

#include "target_map.h"

namespace uffdpc {

// Work a part hands to the fault thread: when `WakeFd()` is readable the
// fault thread calls `OnWake()` (between two reads of the userfaultfd).
class FaultThreadWork {
 public:
  virtual ~FaultThreadWork() = default;
  virtual int WakeFd() const = 0;
  virtual void OnWake() = 0;
};

class PageSupply : public FaultThreadWork {
 public:
  // Fault thread: a thread waits on page `page` of r, asked for the first time.
  virtual void Ask(TargetRegion& r, uint64_t page) = 0;
  // Fault thread: the end of a batch of userfaultfd messages.
  virtual void Flush() = 0;
  // JS thread, in the order of the engine's life (data_plane.h): it starts
  // (the supply may spawn its threads through EngineLife); it begins to stop
  // (nothing outside calls into the supply after Leave); once every thread
  // is joined, the supply lets go of JS objects (Release).
  virtual void Start(int cpu) { (void)cpu; }
  // JS thread, before Start: pages [first, first+count) of r were found
  // present (a handler taking over): a supply that fills pages of its own
  // accord leaves them alone.
  virtual void AlreadyHeld(TargetRegion& r, uint64_t first, uint64_t count) {
    (void)r;
    (void)first;
    (void)count;
  }
  virtual void Leave() {}
  virtual void Release() {}
  // JS thread: a working set to install ahead of the background (entries
  // source region << 48 | source page, in order). Null, or what is wrong.
  virtual const char* AddPrefetch(const uint64_t* entries, size_t count) {
    (void)entries;
    (void)count;
    return "only an engine serving a local image or a store replays a working set itself";
  }
  int WakeFd() const override { return -1; }
  void OnWake() override {}
};

}  // namespace uffdpc
