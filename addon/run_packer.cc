// zstd through the runtime library's own symbols (run_packer.h). The few
// functions used are declared here by their documented C signatures; the
// library is opened by its soname, so only libzstd1 need be installed.
#include "run_packer.h"

#include <dlfcn.h>

#include <mutex>

#include "addon.h"
#include "errors.h"
#include "io.h"

namespace uffdpc {
namespace {

struct Zstd {
  void* (*createCCtx)() = nullptr;
  size_t (*freeCCtx)(void*) = nullptr;
  size_t (*compressCCtx)(void*, void*, size_t, const void*, size_t, int) = nullptr;
  void* (*createDCtx)() = nullptr;
  size_t (*freeDCtx)(void*) = nullptr;
  size_t (*decompressDCtx)(void*, void*, size_t, const void*, size_t) = nullptr;
  unsigned (*isError)(size_t) = nullptr;
  size_t (*compressBound)(size_t) = nullptr;
  bool ok = false;
};

const Zstd& Lib() {
  static Zstd z;
  static std::once_flag once;
  std::call_once(once, [] {
    void* h = dlopen("libzstd.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h) return;
    auto sym = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(h, name));
      return fn != nullptr;
    };
    z.ok = sym(z.createCCtx, "ZSTD_createCCtx") && sym(z.freeCCtx, "ZSTD_freeCCtx") && sym(z.compressCCtx, "ZSTD_compressCCtx") &&
           sym(z.createDCtx, "ZSTD_createDCtx") && sym(z.freeDCtx, "ZSTD_freeDCtx") && sym(z.decompressDCtx, "ZSTD_decompressDCtx") &&
           sym(z.isError, "ZSTD_isError") && sym(z.compressBound, "ZSTD_compressBound");
  });
  return z;
}

}  // namespace

bool PackingAvailable() { return Lib().ok; }

size_t PackedBound(size_t bytes) { return Lib().ok ? Lib().compressBound(bytes) : bytes; }

Packer::Packer(int level) : level_(level) {
  if (Lib().ok) ctx_ = Lib().createCCtx();
}
Packer::~Packer() {
  if (ctx_) Lib().freeCCtx(ctx_);
}

bool Packer::Pack(const uint8_t* src, size_t n, std::vector<uint8_t>& out) {
  if (!ctx_) return false;
  uint64_t t0 = MonotonicNs();
  out.resize(Lib().compressBound(n));
  size_t got = Lib().compressCCtx(ctx_, out.data(), out.size(), src, n, level_);
  ns_ += MonotonicNs() - t0;
  in_ += n;
  if (Lib().isError(got) || got > n - n / 8) return false;
  out.resize(got);
  return true;
}

Unpacker::Unpacker() {
  if (Lib().ok) ctx_ = Lib().createDCtx();
}
Unpacker::~Unpacker() {
  if (ctx_) Lib().freeDCtx(ctx_);
}

bool Unpacker::Unpack(const uint8_t* src, size_t n, uint8_t* dst, size_t want) {
  if (!ctx_) return false;
  size_t got = Lib().decompressDCtx(ctx_, dst, want, src, n);
  return !Lib().isError(got) && got == want;
}

namespace {
// zstd's level for a store's chunks (docs/STORE.md): compressed once at push,
// decompressed at every cold fault; level 3 costs about twice level 1's time
// at push and keeps decompression as fast.
constexpr int kChunkLevel = 3;

// zstdPack(bytes) -> Buffer | null: the bytes compressed (one zstd frame),
// null when zstd is not here or it does not pay (not at least 1/8 smaller).
// On the calling (JavaScript) thread: a chunk is tens of microseconds.
Napi::Value ZstdPackJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsTypedArray()) throw CodedError(env, "ERR_INVALID_ARG_TYPE", "bytes must be a Uint8Array");
  auto src = info[0].As<Napi::Uint8Array>();
  static thread_local Packer packer(kChunkLevel);
  std::vector<uint8_t> out;
  if (!packer.Pack(src.Data(), src.ByteLength(), out)) return env.Null();
  return Napi::Buffer<uint8_t>::Copy(env, out.data(), out.size());
}

// zstdUnpack(packed, length) -> Buffer | null: the frame decompressed, which
// must come out exactly `length` bytes (at most 1 GiB); null for anything
// else (damaged, short, long, or zstd not here).
Napi::Value ZstdUnpackJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsTypedArray() || !info[1].IsNumber())
    throw CodedError(env, "ERR_INVALID_ARG_TYPE", "zstdUnpack(packed: Uint8Array, length: number)");
  auto src = info[0].As<Napi::Uint8Array>();
  double want = info[1].As<Napi::Number>().DoubleValue();
  if (!(want >= 0 && want <= static_cast<double>(1ull << 30))) throw CodedError(env, "ERR_OUT_OF_RANGE", "length must be 0 to 1 GiB");
  static thread_local Unpacker unpacker;
  if (!PackingAvailable()) return env.Null();
  auto out = Napi::Buffer<uint8_t>::New(env, static_cast<size_t>(want));
  if (!unpacker.Unpack(src.Data(), src.ByteLength(), out.Data(), out.Length())) return env.Null();
  return out;
}
}  // namespace

void InitRunPacker(Napi::Env env, Napi::Object exports) {
  exports.Set("zstdPack", Napi::Function::New(env, ZstdPackJs, "zstdPack"));
  exports.Set("zstdUnpack", Napi::Function::New(env, ZstdUnpackJs, "zstdUnpack"));
  // packingAvailable(): whether this process can pack and unpack runs (libzstd.so.1 opened).
  exports.Set("packingAvailable",
              Napi::Function::New(
                  env, [](const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), PackingAvailable()); }, "packingAvailable"));
}

}  // namespace uffdpc
