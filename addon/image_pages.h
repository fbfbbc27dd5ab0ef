// The pages of one image region as native code reads them: a Mapping (pinned
// so it cannot be unmapped underneath) or a Buffer, with the pages known to be
// zero (file holes). The source's page server sends from it; a destination
// with a local image installs from it (fault_engine.cc).
#pragma once
#include <napi.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "errors.h"
#include "mapping.h"

namespace uffdpc {

struct ImagePages {
  const uint8_t* data = nullptr;
  uint64_t pageSize = 0;
  uint64_t pages = 0;
  std::vector<uint64_t> knownZero;  // pages known to be zero (file holes), read-only
  Napi::ObjectReference keepAlive;  // the Buffer or Mapping behind `data`
  Mapping* pinned = nullptr;

  // From a ServedRegionSpec {source, sourceIsMapping, offset, length, pageSize,
  // knownZero?} (lib/native.ts), checked in TypeScript; the sizes are checked
  // again here before `data` is computed.
  void Open(Napi::Env env, Napi::Object spec) {
    Napi::Object source = spec.Get("source").As<Napi::Object>();
    uint64_t offset = static_cast<uint64_t>(spec.Get("offset").As<Napi::Number>().Int64Value());
    uint64_t length = static_cast<uint64_t>(spec.Get("length").As<Napi::Number>().Int64Value());
    pageSize = static_cast<uint64_t>(spec.Get("pageSize").As<Napi::Number>().Int64Value());
    if (pageSize == 0 || length % pageSize != 0) throw CodedError(env, "ERR_IMAGE_INVALID", "an image region must be whole pages");
    pages = length / pageSize;
    if (spec.Get("sourceIsMapping").As<Napi::Boolean>().Value()) {
      Mapping* m = Mapping::Unwrap(source);
      if (!m->mapped() || offset > m->length() || length > m->length() - offset)
        throw CodedError(env, "ERR_IMAGE_INVALID", "the image mapping is unmapped or too small");
      m->Pin();
      pinned = m;
      data = m->data() + offset;
    } else {
      auto bytes = source.As<Napi::TypedArrayOf<uint8_t>>();
      if (offset > bytes.ByteLength() || length > bytes.ByteLength() - offset) throw CodedError(env, "ERR_IMAGE_INVALID", "the image buffer is too small");
      data = bytes.Data() + offset;
    }
    keepAlive = Napi::Persistent(source);
    Napi::Value zero = spec.Get("knownZero");
    if (zero.IsTypedArray()) {
      auto z = zero.As<Napi::TypedArrayOf<uint8_t>>();
      knownZero.assign((pages + 63) / 64, 0);
      std::memcpy(knownZero.data(), z.Data(), std::min<size_t>(z.ByteLength(), knownZero.size() * 8));
    }
  }

  // Lets go of the mapping (on the JS thread): it may be unmapped from now on.
  void Release() {
    if (pinned) pinned->Unpin();
    pinned = nullptr;
    keepAlive.Reset();
  }

  const uint8_t* Page(uint64_t page) const { return data + page * pageSize; }
  bool KnownZero(uint64_t page) const { return !knownZero.empty() && ((knownZero[page / 64] >> (page % 64)) & 1); }
  bool IsZero(uint64_t page) const {
    if (KnownZero(page)) return true;
    const uint64_t* w = reinterpret_cast<const uint64_t*>(Page(page));
    for (uint64_t i = 0, n = pageSize / 8; i < n; i += 8) {
      if (w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7]) return false;
    }
    return true;
  }
};

}  // namespace uffdpc
