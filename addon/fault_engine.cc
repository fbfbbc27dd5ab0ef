// The destination's engine, as JS sees it (lib/native.ts NativeFaultEngine):
// it wires its parts and runs their lifecycle. A fault thread
// (fault_loop.h) reads the userfaultfd and hands each missing page once to
// the supply chosen when the engine was built (page_supply.h): a remote
// source over data channels, whose receiver threads install each run with one
// ioctl (remote_supply.h); a local image with its fill thread
// (image_supply.h); or a template this engine's guest is a clone of
// (template_supply.h). Every install goes through the installer (installer.h)
// into the memory the target map describes (target_map.h). No JavaScript runs
// per page.
//
// The path of one fault, three threads and two hops:
//   FaultLoop::OnFault -> RemoteSupply::Ask/Flush (the request, urgent channel)
//   -> the source -> RemoteSupply::ReceiveLoop -> Installer::Install.
#include <unistd.h>

#include <cstring>

#include "addon.h"
#include "data_plane.h"
#include "engine_options.h"
#include "errors.h"
#include "io.h"

namespace uffdpc {
namespace {

class FaultEngine : public Napi::ObjectWrap<FaultEngine>, DataPlane, EngineLife {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "FaultEngine",
                       {InstanceMethod<&FaultEngine::Start>("start"),
                        InstanceMethod<&FaultEngine::Stop>("stop"),
                        InstanceMethod<&FaultEngine::AttachChannels>("attachChannels"),
                        InstanceMethod<&FaultEngine::DetachChannels>("detachChannels"),
                        InstanceMethod<&FaultEngine::PoisonMissing>("poisonMissing"),
                        InstanceMethod<&FaultEngine::Stats>("stats"),
                        InstanceMethod<&FaultEngine::ReceivedBitmap>("receivedBitmap"),
                        InstanceMethod<&FaultEngine::HeldBitmap>("heldBitmap"),
                        InstanceMethod<&FaultEngine::MarkResident>("markResident"),
                        InstanceMethod<&FaultEngine::InstalledChecksum>("installedChecksum"),
                        InstanceMethod<&FaultEngine::LatencyBuckets>("latencyBuckets"),
                        InstanceMethod<&FaultEngine::Prefetch>("prefetch"),
                        InstanceMethod<&FaultEngine::StartBackground>("startBackground"),
                        InstanceMethod<&FaultEngine::TakeStorePieces>("takeStorePieces"),
                        InstanceMethod<&FaultEngine::StorePiecesFromCache>("storePiecesFromCache"),
                        InstanceMethod<&FaultEngine::InstallPiece>("installPiece"),
                        InstanceMethod<&FaultEngine::FetchStoreInEngine>("fetchStoreInEngine"),
                        InstanceMethod<&FaultEngine::StoreInEngine>("storeInEngine"),
                        InstanceMethod<&FaultEngine::FetchAheadInEngine>("fetchAheadInEngine"),
                        InstanceMethod<&FaultEngine::FaultedPages>("faultedPages")});
  }

  // new FaultEngine(options): see engine_options.h.
  explicit FaultEngine(const Napi::CallbackInfo& info) : Napi::ObjectWrap<FaultEngine>(info) {
    Napi::Object o = info[0].As<Napi::Object>();
    parts_ = BuildEngineParts(info.Env(), o, *this, events_, [](Napi::Object e) -> std::shared_ptr<TemplateShare> {
      FaultEngine* filler = FaultEngine::Unwrap(e);
      if (!filler->parts_ || !filler->parts_->filler || filler->Stopped()) return nullptr;
      return filler->parts_->filler->share();
    });
    OpenPlane(info.Env(), o.Get("onEvent").As<Napi::Function>(), "FaultEngine");
  }

  ~FaultEngine() override { Shutdown(); }

 private:
  // start(): the fault thread runs from now on; pages flow once channels are attached.
  Napi::Value Start(const Napi::CallbackInfo& info) {
    if (started_ || Stopped()) return info.Env().Undefined();
    started_ = true;
    parts_->map->Start(MonotonicNs());
    parts_->supply->Start(parts_->cpu);
    parts_->loop->Start(WakeFd(), parts_->cpu);
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
    RemoteSupply::Keys keys;
    bool badKeys = false;
    if (encrypted) {
      Napi::Object k = info[2].As<Napi::Object>();
      for (auto [name, into] : {std::pair{"urgentDown", keys.urgentDown}, std::pair{"urgentUp", keys.urgentUp}, std::pair{"bulkDown", keys.bulkDown}}) {
        Napi::Value v = k.Get(name);
        if (!v.IsBuffer() || v.As<Napi::Buffer<uint8_t>>().Length() != 32) {
          badKeys = true;
          break;
        }
        std::memcpy(into, v.As<Napi::Buffer<uint8_t>>().Data(), 32);
      }
    }
    RemoteSupply* remote = parts_->remote;
    bool attached = remote && remote->attached();
    if (!started_ || Stopped() || attached || badKeys || !remote) {
      close(urgent);
      close(bulk);
      if (badKeys) throw CodedError(info.Env(), "ERR_OUT_OF_RANGE", "a data-channel key must be a 32-byte Buffer");
      if (parts_->image || parts_->store) throw CodedError(info.Env(), "ERR_ENGINE_STATE", "an engine serving a local image or a store takes no data channels");
      if (!remote) throw CodedError(info.Env(), "ERR_ENGINE_STATE", "a template's clone takes no data channels");
      throw CodedError(info.Env(), "ERR_ENGINE_STATE", attached ? "data channels are already attached" : "the engine is not running");
    }
    return Napi::Number::New(info.Env(), remote->Attach(urgent, bulk, encrypted ? &keys : nullptr, parts_->cpu));
  }

  // detachChannels(): stops the receivers and closes the channels. A run that
  // arrived only in part is dropped; faults keep waiting for the next attach.
  Napi::Value DetachChannels(const Napi::CallbackInfo& info) {
    if (parts_->remote) parts_->remote->Detach();
    return info.Env().Undefined();
  }

  Napi::Value Stop(const Napi::CallbackInfo& info) {
    Shutdown();
    return info.Env().Undefined();
  }

  // The ordered shutdown is the DataPlane's (data_plane.h): first no one
  // outside calls in (a template's filler closes to clones, a clone leaves its
  // template, data channels are detached); then the stop flag, the wake fd
  // the fault thread polls, the fill thread's condition variable; the threads
  // are joined; the image is let go of; the events close.
  void BeforeStop() override {
    if (parts_ && parts_->filler) parts_->filler->Leave();
    if (parts_) parts_->supply->Leave();
  }
  void ReleaseReferences() override {
    if (parts_) parts_->supply->Release();
  }

  // EngineLife: what the parts see of the DataPlane.
  bool Stopping() const override { return DataPlane::Stopping(); }
  void Spawn(const char* name, int cpu, std::function<void()> body) override { DataPlane::Spawn(name, cpu, std::move(body)); }
  void WakeOnStop(std::mutex& mu, std::condition_variable& cv) override { DataPlane::WakeOnStop(mu, cv); }
  void OwnFd(int fd) override { DataPlane::OwnFd(fd); }

  // poisonMissing() -> pages poisoned. Gives up on every page not resident and
  // not given back: a touch raises SIGBUS instead of waiting forever or reading
  // zeros. Call with the channels detached.
  Napi::Value PoisonMissing(const Napi::CallbackInfo& info) {
    if (parts_->remote && parts_->remote->attached()) throw CodedError(info.Env(), "ERR_ENGINE_STATE", "detach the data channels before poisoning");
    int firstError = 0;
    uint64_t poisoned = parts_->installer->PoisonMissing(&firstError);
    if (firstError && firstError != ESRCH && poisoned == 0) ThrowErrno(info.Env(), firstError, "ioctl", "UFFDIO_POISON");
    return Napi::Number::New(info.Env(), static_cast<double>(poisoned));
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) { return parts_->stats.ToJs(info.Env(), *parts_->map, parts_->remote ? parts_->remote->generation() : 0); }

  // receivedBitmap(region) -> Buffer, one bit per page (bit p of byte p/8).
  Napi::Value ReceivedBitmap(const Napi::CallbackInfo& info) {
    uint32_t id = info[0].As<Napi::Number>().Uint32Value();
    const TargetMap& map = *parts_->map;
    if (id >= map.regions().size()) throw CodedError(info.Env(), "ERR_OUT_OF_RANGE", "no such region");
    auto out = Napi::Buffer<uint8_t>::New(info.Env(), (map.regions()[id]->pages + 7) / 8);
    map.ReceivedBits(id, out.Data());
    return out;
  }

  // heldBitmap(sourceRegion) -> Buffer, one bit per page of the source region
  // (bit p of byte p/8): what the source need not send. A page is held when it
  // is resident, was given back, or no target region maps it.
  Napi::Value HeldBitmap(const Napi::CallbackInfo& info) {
    uint32_t id = info[0].As<Napi::Number>().Uint32Value();
    const TargetMap& map = *parts_->map;
    if (id >= map.sourceRegions()) throw CodedError(info.Env(), "ERR_OUT_OF_RANGE", "no such source region");
    auto out = Napi::Buffer<uint8_t>::New(info.Env(), (map.sourcePages(id) + 7) / 8);
    map.HeldBits(id, out.Data());
    return out;
  }

  // markResident(region, bitmap) -> pages newly marked. Pages of target region
  // `region` found present already (a handler taking over from one that
  // died): they settle without being fetched. Bitmap: bit p of byte p/8.
  Napi::Value MarkResident(const Napi::CallbackInfo& info) {
    uint32_t id = info[0].As<Napi::Number>().Uint32Value();
    auto bits = info[1].As<Napi::TypedArrayOf<uint8_t>>();
    TargetMap& map = *parts_->map;
    if (id >= map.regions().size()) throw CodedError(info.Env(), "ERR_OUT_OF_RANGE", "no such region");
    if (bits.ByteLength() != (map.regions()[id]->pages + 7) / 8) throw CodedError(info.Env(), "ERR_OUT_OF_RANGE", "the bitmap does not fit the region");
    uint64_t marked = map.MarkResident(id, bits.Data());
    TargetRegion& r = *map.regions()[id];
    auto set = [&](uint64_t p) { return ((bits.Data()[p / 8] >> (p % 8)) & 1) != 0; };
    for (uint64_t p = 0; p < r.pages;) {
      if (!set(p)) {
        p++;
        continue;
      }
      uint64_t q = p + 1;
      while (q < r.pages && set(q)) q++;
      parts_->supply->AlreadyHeld(r, p, q - p);
      p = q;
    }
    return Napi::Number::New(info.Env(), static_cast<double>(marked));
  }

  // installedChecksum() -> per source region {region, sum, pages, skip} (installed_checksum.h).
  Napi::Value InstalledChecksum(const Napi::CallbackInfo& info) {
    // An install that copied its pages before the last page settled may still
    // be adding them to the sum: wait for it (bounded), so the sum and the
    // pages it leaves out agree.
    parts_->installer->WaitIdle();
    return parts_->checksum->Report(info.Env());
  }

  // latencyBuckets(boundsNs) -> for each bound, the faults that waited at most that long.
  Napi::Value LatencyBuckets(const Napi::CallbackInfo& info) { return parts_->stats.LatencyBuckets(info.Env(), info[0].As<Napi::Array>()); }

  // prefetch(entries: Buffer of u64 LE, region << 48 | page, in order): the
  // pages of a working set, installed ahead of the background (local image).
  Napi::Value Prefetch(const Napi::CallbackInfo& info) {
    AddPrefetch(info.Env(), *parts_->supply, info[0].As<Napi::TypedArrayOf<uint8_t>>());
    return info.Env().Undefined();
  }

  // startBackground(): a local image's background fill starts (or goes on) now.
  Napi::Value StartBackground(const Napi::CallbackInfo& info) {
    if (parts_->image) parts_->image->StartBackground();
    if (parts_->store) parts_->store->StartBackground();
    return info.Env().Undefined();
  }

  // takeStorePieces(ahead, cacheBytes, background = true) -> {pieces: [{region, piece,
  // sourceRegion, sourceFirst, sourceCount, why}], fromCache}: every piece
  // faults wait on (and their windows), then up to `ahead` pieces of the
  // working set and the background (store); of those, zero chunks and the
  // ones the host's chunk cache holds are installed here instead (up to
  // `cacheBytes` of them), `fromCache` of them. `background` false: the working set's only.
  Napi::Value TakeStorePieces(const Napi::CallbackInfo& info) {
    StoreSupply* store = parts_->store;
    if (!store) throw CodedError(info.Env(), "ERR_ENGINE_STATE", "only an engine serving a store image takes pieces");
    std::vector<StoreSupply::Want> wants;
    store->TakeUrgent(wants);
    size_t urgent = wants.size();
    uint32_t ahead = info[0].As<Napi::Number>().Uint32Value();
    uint64_t cacheBytes = static_cast<uint64_t>(info[1].As<Napi::Number>().Int64Value());
    uint64_t fromCache = 0;
    bool background = info.Length() < 3 || info[2].ToBoolean().Value();
    if (ahead && started_ && !Stopped()) store->TakeAhead(urgent + ahead, wants, cacheBytes, &fromCache, background);
    Napi::Array pieces = Napi::Array::New(info.Env(), wants.size());
    for (size_t i = 0; i < wants.size(); i++) {
      const auto& w = wants[i];
      Napi::Object o = Napi::Object::New(info.Env());
      o.Set("region", double(w.region));
      o.Set("piece", double(w.piece));
      o.Set("sourceRegion", double(w.sourceRegion));
      o.Set("sourceFirst", double(w.sourceFirst));
      o.Set("sourceCount", double(w.sourceCount));
      o.Set("why", double(static_cast<uint32_t>(w.why)));
      pieces.Set(uint32_t(i), o);
    }
    Napi::Object out = Napi::Object::New(info.Env());
    out.Set("pieces", pieces);
    out.Set("fromCache", double(fromCache));
    return out;
  }

  // storePiecesFromCache() -> number: pieces the fault thread read from the host's chunk cache itself.
  Napi::Value StorePiecesFromCache(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), parts_->store ? double(parts_->store->PiecesFromCache()) : 0);
  }

  // installPiece(region, piece, why, data: Buffer | null): a piece taken with
  // takeStorePieces, its source pages' bytes (null: zeros), installed.
  Napi::Value InstallPiece(const Napi::CallbackInfo& info) {
    StoreSupply* store = parts_->store;
    if (!store) throw CodedError(info.Env(), "ERR_ENGINE_STATE", "only an engine serving a store image installs pieces");
    if (!started_ || Stopped()) return Napi::Boolean::New(info.Env(), false);
    uint32_t why = info[2].As<Napi::Number>().Uint32Value();
    if (why != wire::kRequested && why != wire::kWindow && why != wire::kPrefetch && why != wire::kBackground)
      throw CodedError(info.Env(), "ERR_OUT_OF_RANGE", "not a reason a piece is wanted for");
    const uint8_t* data = nullptr;
    uint64_t length = 0;
    if (info[3].IsTypedArray()) {
      auto bytes = info[3].As<Napi::TypedArrayOf<uint8_t>>();
      data = bytes.Data();
      length = bytes.ByteLength();
    }
    const char* bad = store->InstallPiece(info[0].As<Napi::Number>().Uint32Value(), static_cast<uint64_t>(info[1].As<Napi::Number>().Int64Value()),
                                          static_cast<Why>(why), data, length);
    if (bad) throw CodedError(info.Env(), "ERR_OUT_OF_RANGE", bad);
    return Napi::Boolean::New(info.Env(), true);
  }

  // fetchStoreInEngine({address, ipv6, port, host, region, keyId, secret,
  // token, packs: [path], places: [Uint8Array per source region: 24 bytes a
  // chunk, i64 pack (-1: none), u64 offset, u64 length, LE], timeoutMs,
  // connections}): a started store engine fetches the pieces faults wait on
  // itself (store_supply.h). Checked in client/fault-engine.ts; here again.
  Napi::Value FetchStoreInEngine(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    StoreSupply* store = parts_->store;
    if (!store) throw CodedError(env, "ERR_ENGINE_STATE", "only an engine serving a store image fetches from one");
    if (!started_ || Stopped()) throw CodedError(env, "ERR_ENGINE_STATE", "the engine is not running");
    if (info.Length() < 1 || !info[0].IsObject()) throw CodedError(env, "ERR_INVALID_ARG_TYPE", "fetchStoreInEngine(config: object)");
    Napi::Object o = info[0].As<Napi::Object>();
    auto text = [&](const char* name) {
      Napi::Value v = o.Get(name);
      if (!v.IsString()) throw CodedError(env, "ERR_INVALID_ARG_TYPE", std::string("fetchStoreInEngine: ") + name + " is a string");
      return v.As<Napi::String>().Utf8Value();
    };
    auto number = [&](const char* name, double most) {
      Napi::Value v = o.Get(name);
      double n = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
      if (!(n >= 0 && n <= most) || n != static_cast<double>(static_cast<uint64_t>(n)))
        throw CodedError(env, "ERR_OUT_OF_RANGE", std::string("fetchStoreInEngine: ") + name + " is a whole number up to " + std::to_string(uint64_t(most)));
      return static_cast<uint64_t>(n);
    };
    auto gets = std::make_unique<StoreGets>();
    gets->address = text("address");
    gets->ipv6 = o.Get("ipv6").ToBoolean().Value();
    gets->port = static_cast<uint16_t>(number("port", 65535));
    gets->host = text("host");
    gets->region = text("region");
    gets->keyId = text("keyId");
    gets->secret = text("secret");
    gets->token = text("token");
    gets->timeoutMs = static_cast<uint32_t>(number("timeoutMs", 600000));
    gets->connections = static_cast<uint32_t>(number("connections", 64));
    for (const std::string* field : {&gets->host, &gets->region, &gets->keyId, &gets->secret, &gets->token})
      if (field->find_first_of("\r\n") != std::string::npos)
        throw CodedError(env, "ERR_INVALID_ARG_VALUE", "fetchStoreInEngine: a header value holds a line break");
    Napi::Value packs = o.Get("packs"), places = o.Get("places");
    if (!packs.IsArray() || !places.IsArray()) throw CodedError(env, "ERR_INVALID_ARG_TYPE", "fetchStoreInEngine: packs and places are arrays");
    Napi::Array packList = packs.As<Napi::Array>(), placeList = places.As<Napi::Array>();
    for (uint32_t i = 0; i < packList.Length(); i++) {
      Napi::Value p = packList.Get(i);
      if (!p.IsString()) throw CodedError(env, "ERR_INVALID_ARG_TYPE", "fetchStoreInEngine: a pack is its object's path");
      gets->packs.push_back(p.As<Napi::String>().Utf8Value());
      if (gets->packs.back().find_first_of(" \r\n") != std::string::npos || gets->packs.back()[0] != '/')
        throw CodedError(env, "ERR_INVALID_ARG_VALUE", "fetchStoreInEngine: a pack's path is encoded and absolute");
    }
    for (uint32_t i = 0; i < placeList.Length(); i++) {
      Napi::Value v = placeList.Get(i);
      if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array || v.As<Napi::Uint8Array>().ByteLength() % 24 != 0)
        throw CodedError(env, "ERR_INVALID_ARG_TYPE", "fetchStoreInEngine: a region's places are a Uint8Array of 24 bytes a chunk");
      auto bytes = v.As<Napi::Uint8Array>();
      std::vector<ChunkPlace> region(bytes.ByteLength() / 24);
      for (size_t c = 0; c < region.size(); c++) {
        uint64_t length;
        std::memcpy(&region[c].pack, bytes.Data() + c * 24, 8);
        std::memcpy(&region[c].offset, bytes.Data() + c * 24 + 8, 8);
        std::memcpy(&length, bytes.Data() + c * 24 + 16, 8);
        if (length > (64u << 20)) throw CodedError(env, "ERR_OUT_OF_RANGE", "fetchStoreInEngine: a chunk's object is at most 64 MiB");
        region[c].length = static_cast<uint32_t>(length);
      }
      gets->places.push_back(std::move(region));
    }
    if (const char* bad = store->FetchInEngine(std::move(gets), parts_->cpu)) throw CodedError(env, "ERR_OUT_OF_RANGE", bad);
    return env.Undefined();
  }

  // fetchAheadInEngine(pieces: [{region, piece, why}], id) -> boolean: a
  // group taken ahead with takeStorePieces, fetched by the engine's threads
  // (StoreSupply::FetchAheadInEngine); a "store-fetched" event with `id`
  // follows. False: not started, JavaScript fetches it.
  Napi::Value FetchAheadInEngine(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    StoreSupply* store = parts_->store;
    if (!store) throw CodedError(env, "ERR_ENGINE_STATE", "only an engine serving a store image fetches from one");
    if (info.Length() < 2 || !info[0].IsArray() || !info[1].IsNumber())
      throw CodedError(env, "ERR_INVALID_ARG_TYPE", "fetchAheadInEngine(pieces: array, id: number)");
    if (!started_ || Stopped()) return Napi::Boolean::New(env, false);
    Napi::Array list = info[0].As<Napi::Array>();
    if (list.Length() == 0 || list.Length() > 1024) throw CodedError(env, "ERR_OUT_OF_RANGE", "fetchAheadInEngine: 1 to 1024 pieces");
    std::vector<StoreSupply::Want> group;
    for (uint32_t i = 0; i < list.Length(); i++) {
      Napi::Value v = list.Get(i);
      if (!v.IsObject()) throw CodedError(env, "ERR_INVALID_ARG_TYPE", "fetchAheadInEngine: a piece is {region, piece, why}");
      Napi::Object o = v.As<Napi::Object>();
      uint32_t why = o.Get("why").ToNumber().Uint32Value();
      if (why != wire::kPrefetch && why != wire::kBackground)
        throw CodedError(env, "ERR_OUT_OF_RANGE", "fetchAheadInEngine: pieces taken ahead (prefetch, background)");
      StoreSupply::Want w;
      if (!store->WantOfAsked(o.Get("region").ToNumber().Uint32Value(), static_cast<uint64_t>(o.Get("piece").ToNumber().Int64Value()), static_cast<Why>(why),
                              &w))
        throw CodedError(env, "ERR_OUT_OF_RANGE", "fetchAheadInEngine: a piece that was not asked for");
      group.push_back(w);
    }
    return Napi::Boolean::New(env, store->FetchAheadInEngine(group, info[1].As<Napi::Number>().Uint32Value()));
  }

  // storeInEngine() -> {gets, bytesFetched, pieces, gaveBack, keptBytes, fromCache, getNs, damaged, faultPieces, fetching}: what the engine's own fetches did.
  Napi::Value StoreInEngine(const Napi::CallbackInfo& info) {
    Napi::Object out = Napi::Object::New(info.Env());
    StoreSupply* store = parts_->store;
    StoreSupply::InEngineStats s = store ? store->InEngine() : StoreSupply::InEngineStats{};
    out.Set("gets", double(s.gets));
    out.Set("bytesFetched", double(s.bytesFetched));
    out.Set("pieces", double(s.pieces));
    out.Set("gaveBack", double(s.gaveBack));
    out.Set("keptBytes", double(s.keptBytes));
    out.Set("fromCache", double(s.fromCache));
    out.Set("getNs", double(s.getNs));
    out.Set("damaged", double(s.damaged));
    out.Set("faultPieces", double(s.faultPieces));
    out.Set("fetching", double(store ? store->FetchingInEngine() : 0));
    return out;
  }

  // faultedPages() -> Buffer of u64 LE (region << 48 | page): every page a
  // thread faulted on while it was missing, in first-touch order (recordFaults).
  Napi::Value FaultedPages(const Napi::CallbackInfo& info) {
    std::vector<uint64_t> pages = parts_->loop->FaultedPages();
    return Napi::Buffer<uint8_t>::Copy(info.Env(), reinterpret_cast<const uint8_t*>(pages.data()), pages.size() * 8);
  }

  std::unique_ptr<EngineParts> parts_;
  bool started_ = false;
};

}  // namespace

void InitFaultEngine(Napi::Env env, Napi::Object exports) { exports.Set("FaultEngine", FaultEngine::Define(env)); }

}  // namespace uffdpc
