#include "engine_options.h"

#include <fcntl.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "errors.h"

namespace uffdpc {

namespace {
uint64_t U64(Napi::Object o, const char* key) { return static_cast<uint64_t>(o.Get(key).As<Napi::Number>().Int64Value()); }
uint64_t U64(Napi::Array a, uint32_t i) { return static_cast<uint64_t>(a.Get(i).As<Napi::Number>().Int64Value()); }

// A non-blocking eventfd, closed with the engine's other fds at its shutdown.
int EventFd(Napi::Env env, EngineLife& life) {
  int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (fd < 0) ThrowErrno(env, errno, "eventfd");
  life.OwnFd(fd);
  return fd;
}

// {image: [ServedRegionSpec per source region], window: {forward, backward}, background?, prefetch?}
std::unique_ptr<ImageSupply> BuildImageSupply(Napi::Env env, Napi::Object o, EngineParts& parts, EngineLife& life) {
  const TargetMap& map = *parts.map;
  Napi::Array specs = o.Get("image").As<Napi::Array>();
  if (specs.Length() != map.sourceRegions()) throw CodedError(env, "ERR_IMAGE_INVALID", "the image needs one region per source region");
  std::vector<std::unique_ptr<ImagePages>> image;
  try {
    for (uint32_t i = 0; i < specs.Length(); i++) {
      image.push_back(std::make_unique<ImagePages>());
      image.back()->Open(env, specs.Get(i).As<Napi::Object>());
      if (image.back()->pages != map.sourcePages(i) || image.back()->pageSize != map.sourcePageSize(i))
        throw CodedError(env, "ERR_IMAGE_INVALID", "an image region does not match its source region");
    }
  } catch (...) {
    for (auto& pages : image) pages->Release();  // nothing else lets go of them
    throw;
  }
  Napi::Object window = o.Get("window").As<Napi::Object>();
  ImageSupply::Window w{window.Get("forward").As<Napi::Number>().Uint32Value(), window.Get("backward").As<Napi::Number>().Uint32Value()};
  auto supply = std::make_unique<ImageSupply>(*parts.map, *parts.installer, life, std::move(image), w, o.Get("background").ToBoolean().Value());
  // A working set to replay is here before the fill thread starts: not one background run goes ahead of it.
  Napi::Value prefetch = o.Get("prefetch");
  if (prefetch.IsTypedArray()) AddPrefetch(env, *supply, prefetch.As<Napi::TypedArrayOf<uint8_t>>());
  return supply;
}
// {store: {chunkBytes: [per source region], chunks: [Uint8Array per source
// region: 32 bytes per chunk, its SHA-256 or zeros], cacheDir?}, window:
// {forward, backward}, background?, prefetch?}
std::unique_ptr<StoreSupply> BuildStoreSupply(Napi::Env env, Napi::Object o, EngineParts& parts, EventSink& events, EngineLife& life) {
  const TargetMap& map = *parts.map;
  Napi::Object store = o.Get("store").As<Napi::Object>();
  Napi::Array sizes = store.Get("chunkBytes").As<Napi::Array>();
  Napi::Array chunks = store.Get("chunks").As<Napi::Array>();
  if (sizes.Length() != map.sourceRegions() || chunks.Length() != map.sourceRegions())
    throw CodedError(env, "ERR_IMAGE_INVALID", "a store image needs a chunk size and chunk names per source region");
  std::vector<uint64_t> chunkBytes;
  std::vector<std::vector<uint8_t>> names;
  for (uint32_t i = 0; i < sizes.Length(); i++) {
    uint64_t n = U64(sizes, i);
    uint64_t pageSize = map.sourcePageSize(i);
    if (n < 4096 || (n & (n - 1)) != 0 || n < pageSize)
      throw CodedError(env, "ERR_OUT_OF_RANGE", "a chunk size is a power of two of 4 KiB or more, whole pages");
    chunkBytes.push_back(n);
    auto bytes = chunks.Get(i).As<Napi::TypedArrayOf<uint8_t>>();
    uint64_t count = (map.sourcePages(i) * pageSize + n - 1) / n;
    if (bytes.ByteLength() != count * 32) throw CodedError(env, "ERR_OUT_OF_RANGE", "a store region needs 32 bytes of name per chunk");
    names.emplace_back(bytes.Data(), bytes.Data() + bytes.ByteLength());
  }
  Napi::Value dir = store.Get("cacheDir");
  auto cache = std::make_unique<ChunkCacheReader>(dir.IsString() ? dir.As<Napi::String>().Utf8Value() : std::string(), std::move(names));
  Napi::Object window = o.Get("window").As<Napi::Object>();
  StoreSupply::Window w{window.Get("forward").As<Napi::Number>().Uint32Value(), window.Get("backward").As<Napi::Number>().Uint32Value()};
  auto supply =
      std::make_unique<StoreSupply>(*parts.map, *parts.installer, events, life, chunkBytes, w, o.Get("background").ToBoolean().Value(), std::move(cache));
  Napi::Value prefetch = o.Get("prefetch");
  if (prefetch.IsTypedArray()) AddPrefetch(env, *supply, prefetch.As<Napi::TypedArrayOf<uint8_t>>());
  return supply;
}
}  // namespace

void AddPrefetch(Napi::Env env, PageSupply& supply, Napi::TypedArrayOf<uint8_t> bytes) {
  if (bytes.ByteLength() % 8) throw CodedError(env, "ERR_OUT_OF_RANGE", "prefetch entries are 8 bytes each");
  std::vector<uint64_t> entries(bytes.ByteLength() / 8);
  std::memcpy(entries.data(), bytes.Data(), bytes.ByteLength());
  if (const char* bad = supply.AddPrefetch(entries.data(), entries.size())) throw CodedError(env, "ERR_OUT_OF_RANGE", bad);
}

// {uffd, sourceRegions: [{pages, pageSize}], regions: [{base, length, pageSize, sourceRegion, sourcePage, fillAddress?}], cpu,
//  checksumInstalled, precopy, ownMemory, installHugePages, recordFaults, onEvent, fillsTemplate?, template?, image?, window?, background?, prefetch?}.
// The engine opens onEvent itself (its DataPlane's sink). It owns the data
// channels it is given (attachChannels), not the uffd.
std::unique_ptr<EngineParts> BuildEngineParts(Napi::Env env, Napi::Object o, EngineLife& life, EventSink& events, const TemplateOf& templateOf) {
  auto parts = std::make_unique<EngineParts>();
  // A template's filler serves no process: it has no userfaultfd.
  bool fillsTemplate = o.Get("fillsTemplate").ToBoolean().Value();
  int uffd = -1;
  if (!fillsTemplate) {
    uffd = o.Get("uffd").As<Napi::Number>().Int32Value();
    // poll() on a blocking userfaultfd always reports POLLERR; the engine is
    // the fd's only reader, so it makes it non-blocking.
    int fl = fcntl(uffd, F_GETFL);
    if (fl < 0 || fcntl(uffd, F_SETFL, fl | O_NONBLOCK) < 0) ThrowErrno(env, errno, "fcntl", "F_SETFL");
  }

  parts->map = std::make_unique<TargetMap>(events);
  TargetMap& map = *parts->map;
  Napi::Array sources = o.Get("sourceRegions").As<Napi::Array>();
  for (uint32_t i = 0; i < sources.Length(); i++) {
    Napi::Object r = sources.Get(i).As<Napi::Object>();
    map.AddSourceRegion(U64(r, "pages"), U64(r, "pageSize"));
  }
  Napi::Array regions = o.Get("regions").As<Napi::Array>();
  for (uint32_t i = 0; i < regions.Length(); i++) {
    Napi::Object r = regions.Get(i).As<Napi::Object>();
    Napi::Value fill = r.Get("fillAddress");
    uint8_t* fillAt = fill.IsNumber() ? reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(fill.As<Napi::Number>().Int64Value())) : nullptr;
    map.AddRegion(U64(r, "base"), U64(r, "length"), U64(r, "pageSize"), r.Get("sourceRegion").As<Napi::Number>().Uint32Value(), U64(r, "sourcePage"), fillAt);
  }
  // A live source: precopy rounds come first (nothing completes before its switchover).
  map.SetPrecopy(o.Get("precopy").ToBoolean().Value());

  // calloc of this size maps fresh zero pages: no memory is touched until read.
  parts->zeros.reset(static_cast<uint8_t*>(calloc(1, map.maxRunBytes())));
  parts->checksum = std::make_unique<InstalledChecksum>(map, o.Get("checksumInstalled").ToBoolean().Value(), parts->zeros.get());
  // ownMemory: the memory is this process's own (restore), so precopy writes it directly.
  parts->installer =
      std::make_unique<Installer>(map, parts->stats, *parts->checksum, events, life, uffd, o.Get("ownMemory").ToBoolean().Value(), parts->zeros.get());
  // installHugePages: own memory whose userfaultfd can move pages (checked in TypeScript).
  if (o.Get("installHugePages").ToBoolean().Value()) parts->installer->InstallHugePages();

  // checked in TypeScript: one region per source region, each whole, in the file's mapping
  if (fillsTemplate) parts->filler = std::make_unique<TemplateFiller>(map, EventFd(env, life));
  Napi::Value clone = o.Get("template");
  std::shared_ptr<TemplateShare> share;
  if (clone.IsObject()) {
    share = templateOf(clone.As<Napi::Object>());
    bool running = false;
    if (share) {
      std::lock_guard<std::mutex> lock(share->mu);
      running = share->filler != nullptr;
    }
    if (!running || share->sourcePageSizes != map.sourcePageSizes() || share->sourcePages != map.sourcePageCounts())
      throw CodedError(env, "ERR_ENGINE_STATE", "a clone needs a running template engine over the same image");
    for (auto& r : map.regions())
      if (r->ratio != 1 || r->fill) throw CodedError(env, "ERR_UNSUPPORTED", "a template's clone maps the image's own pages, privately");
  }

  if (share) {
    parts->supply = std::make_unique<TemplateSupply>(share, map, *parts->installer, events, life);
  } else if (o.Get("store").IsObject()) {
    auto store = BuildStoreSupply(env, o, *parts, events, life);
    parts->store = store.get();
    parts->supply = std::move(store);
  } else if (o.Get("image").IsArray()) {
    auto image = BuildImageSupply(env, o, *parts, life);
    parts->image = image.get();
    parts->supply = std::move(image);
  } else {
    auto remote = std::make_unique<RemoteSupply>(map, *parts->installer, parts->stats, events, life, EventFd(env, life));
    parts->remote = remote.get();
    parts->supply = std::move(remote);
  }
  Napi::Value cpu = o.Get("cpu");
  parts->cpu = cpu.IsNumber() ? cpu.As<Napi::Number>().Int32Value() : -1;

  // A clone's memory given back reads as the template's file again: it is not settled as zeros.
  parts->loop = std::make_unique<FaultLoop>(life, map, *parts->installer, parts->stats, events, uffd, o.Get("recordFaults").ToBoolean().Value(), !share);
  parts->loop->SetSupply(parts->supply.get());
  if (parts->supply->WakeFd() >= 0) parts->loop->AddWork(parts->supply.get());
  if (parts->filler) {
    parts->filler->SetSupply(parts->supply.get());
    parts->installer->SetCacheListener(parts->filler.get());
    parts->loop->AddWork(parts->filler.get());
  }
  return parts;
}

}  // namespace uffdpc
