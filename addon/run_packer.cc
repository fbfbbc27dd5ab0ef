// zstd through the runtime library's own symbols (run_packer.h). The few
// functions used are declared here by their documented C signatures; the
// library is opened by its soname, so only libzstd1 need be installed.
#include "run_packer.h"

#include <dlfcn.h>

#include <mutex>

#include "addon.h"
#include "io.h"

namespace uffdpc {
namespace {

// zstd's level for packed runs: its fastest standard level, hundreds of MB a
// second a core, about what a gigabit link takes many times over.
constexpr int kLevel = 1;

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

Packer::Packer() {
  if (Lib().ok) ctx_ = Lib().createCCtx();
}
Packer::~Packer() {
  if (ctx_) Lib().freeCCtx(ctx_);
}

bool Packer::Pack(const uint8_t* src, size_t n, std::vector<uint8_t>& out) {
  if (!ctx_) return false;
  uint64_t t0 = MonotonicNs();
  out.resize(Lib().compressBound(n));
  size_t got = Lib().compressCCtx(ctx_, out.data(), out.size(), src, n, kLevel);
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

void InitRunPacker(Napi::Env env, Napi::Object exports) {
  // packingAvailable(): whether this process can pack and unpack runs (libzstd.so.1 opened).
  exports.Set("packingAvailable",
              Napi::Function::New(
                  env, [](const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), PackingAvailable()); }, "packingAvailable"));
}

}  // namespace uffdpc
