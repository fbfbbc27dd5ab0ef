// pageChecksum: the source's side of the installed-pages checksum
// (page_checksum.h) over pages of a region it serves. Arguments arrive
// validated by lib/digest.ts and are checked again against the buffer here.
#include "addon.h"
#include "errors.h"
#include "page_checksum.h"

namespace uffdpc {
namespace {

// pageChecksum(bytes, pageSize, region, firstPage, count[, shares]) -> bigint:
// the sum (mod 2^64) of the contributions of pages [firstPage, firstPage +
// count) of `bytes`, whose page 0 is the region's first page; `shares`, a
// BigUint64Array of at least `count`, receives each page's own.
Napi::Value PageChecksum(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto bytes = info[0].As<Napi::Uint8Array>();
  uint64_t pageSize = static_cast<uint64_t>(info[1].As<Napi::Number>().Int64Value());
  uint32_t region = info[2].As<Napi::Number>().Uint32Value();
  uint64_t first = static_cast<uint64_t>(info[3].As<Napi::Number>().Int64Value());
  uint64_t count = static_cast<uint64_t>(info[4].As<Napi::Number>().Int64Value());
  uint64_t length = bytes.ByteLength();  // 0 once the mapping behind it is gone
  if (pageSize == 0 || pageSize % 32 != 0 || first > length / pageSize || count > length / pageSize - first) {
    throw CodedError(env, "ERR_OUT_OF_RANGE", "pageChecksum: the pages lie outside the buffer");
  }
  uint64_t* shares = nullptr;
  if (info.Length() > 5 && info[5].IsTypedArray()) {
    auto out = info[5].As<Napi::TypedArray>();
    if (out.TypedArrayType() != napi_biguint64_array || out.ElementLength() < count)
      throw CodedError(env, "ERR_OUT_OF_RANGE", "pageChecksum: shares must be a BigUint64Array of at least count");
    shares = reinterpret_cast<uint64_t*>(static_cast<uint8_t*>(out.ArrayBuffer().Data()) + out.ByteOffset());
  }
  const uint8_t* data = bytes.Data();
  uint64_t sum = 0;
  for (uint64_t p = first; p < first + count; p++) {
    uint64_t share = Contribution(region, p, ContentHash(data + p * pageSize, pageSize));
    if (shares) shares[p - first] = share;
    sum += share;
  }
  return Napi::BigInt::New(env, sum);
}

}  // namespace

void InitPageChecksum(Napi::Env env, Napi::Object exports) { exports.Set("pageChecksum", Napi::Function::New(env, PageChecksum, "pageChecksum")); }

}  // namespace uffdpc
