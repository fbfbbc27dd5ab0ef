// Builds a destination engine's parts from the options JS gives
// `new FaultEngine({...})` (validated in client/fault-engine.ts; lib/native.ts
// lists them): the target map, the installer and its checksum, the fault loop,
// and the one supply the options name (a remote source, a local image, or a
// template this engine's guest is a clone of), plus a template's filler.
#pragma once
#include <napi.h>

#include <cstdlib>
#include <functional>
#include <memory>

#include "engine_stats.h"
#include "events.h"
#include "fault_loop.h"
#include "image_supply.h"
#include "installed_checksum.h"
#include "installer.h"
#include "remote_supply.h"
#include "store_supply.h"
#include "target_map.h"
#include "template_supply.h"

namespace uffdpc {

// The parts of one engine. The engine (fault_engine.cc) holds them and runs
// their life: its stop flag, threads and events are its DataPlane's.
struct EngineParts {
  EngineStats stats;
  std::unique_ptr<TargetMap> map;
  std::unique_ptr<uint8_t, decltype(&free)> zeros{nullptr, &free};  // the largest run of zeros (hugetlbfs has no ZEROPAGE)
  std::unique_ptr<InstalledChecksum> checksum;
  std::unique_ptr<Installer> installer;
  std::unique_ptr<PageSupply> supply;
  RemoteSupply* remote = nullptr;          // `supply`, when pages come from a source over data channels
  ImageSupply* image = nullptr;            // `supply`, when they come from a local image
  StoreSupply* store = nullptr;            // `supply`, when they come from a snapshot store (through JS)
  std::unique_ptr<TemplateFiller> filler;  // this engine fills a template (fillsTemplate)
  std::unique_ptr<FaultLoop> loop;
  int cpu = -1;  // pin every engine thread here (-1: no pinning)
};

// The template a clone maps, from the `template` option (null: not a running filler).
using TemplateOf = std::function<std::shared_ptr<TemplateShare>(Napi::Object)>;

// Throws a JS error (nothing is left open) when the options do not fit together.
// `life` and `events`: the engine's (its DataPlane's), which outlive the parts.
std::unique_ptr<EngineParts> BuildEngineParts(Napi::Env env, Napi::Object options, EngineLife& life, EventSink& events, const TemplateOf& templateOf);

// A working set to replay (Buffer of u64 LE, region << 48 | page, in order); throws ERR_OUT_OF_RANGE.
void AddPrefetch(Napi::Env env, PageSupply& supply, Napi::TypedArrayOf<uint8_t> bytes);

}  // namespace uffdpc
