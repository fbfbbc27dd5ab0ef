#include "mapping.h"

#include <sys/mman.h>

#include "errors.h"

namespace uffdpc {

Napi::Function Mapping::Define(Napi::Env env) {
  Napi::Function fn = DefineClass(env, "Mapping",
                                  {InstanceAccessor<&Mapping::Address>("address"),
                                   InstanceAccessor<&Mapping::Length>("length"),
                                   InstanceAccessor<&Mapping::Mapped>("mapped"),
                                   InstanceMethod<&Mapping::View>("view"),
                                   InstanceMethod<&Mapping::Unmap>("unmap")});
  return fn;
}

// new Mapping(length, prot, flags, fd, offset, address): arguments validated in lib/memory.ts.
Mapping::Mapping(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Mapping>(info) {
  size_t length = static_cast<size_t>(info[0].As<Napi::Number>().Int64Value());
  int prot = info[1].As<Napi::Number>().Int32Value();
  int flags = info[2].As<Napi::Number>().Int32Value();
  int fd = info[3].As<Napi::Number>().Int32Value();
  off_t offset = static_cast<off_t>(info[4].As<Napi::Number>().Int64Value());
  void* hint = reinterpret_cast<void*>(static_cast<uintptr_t>(info[5].As<Napi::Number>().Int64Value()));
  void* p = mmap(hint, length, prot, flags, fd, offset);
  if (p == MAP_FAILED) ThrowErrno(info.Env(), errno, "mmap");
  data_ = static_cast<uint8_t*>(p);
  length_ = length;
}

Mapping::~Mapping() {
  // Views keep the Mapping alive (see View), so none can outlive this munmap.
  if (data_) munmap(data_, length_);
}

Napi::Value Mapping::Address(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(reinterpret_cast<uintptr_t>(data_)));
}
Napi::Value Mapping::Length(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(length_));
}
Napi::Value Mapping::Mapped(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), data_ != nullptr);
}

// view(): an ArrayBuffer over the whole mapping, no copy. Each view holds a
// strong reference to this Mapping until the view itself is collected.
Napi::Value Mapping::View(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!data_) throw CodedError(env, "ERR_MAPPING_UNMAPPED", "the mapping was unmapped");
  auto* owner = new Napi::ObjectReference(Napi::Persistent(Value()));
  Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(
      env, data_, length_, [](Napi::Env, void*, Napi::ObjectReference* ref) { delete ref; }, owner);
  // Forget views that were collected; keep a weak handle on the rest.
  std::vector<Napi::Reference<Napi::ArrayBuffer>> live;
  for (auto& ref : views_)
    if (!ref.Value().IsEmpty()) live.push_back(std::move(ref));
  live.push_back(Napi::Reference<Napi::ArrayBuffer>::New(ab, 0));
  views_ = std::move(live);
  return ab;
}

Napi::Value Mapping::Unmap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!data_) return env.Undefined();
  if (pins_ > 0)
    throw CodedError(env, "ERR_MAPPING_BUSY", "the mapping is in use by a running page server session");
  for (auto& ref : views_) {
    Napi::ArrayBuffer ab = ref.Value();
    if (!ab.IsEmpty() && !ab.IsDetached()) ab.Detach();
  }
  views_.clear();
  if (munmap(data_, length_) != 0) ThrowErrno(env, errno, "munmap");
  data_ = nullptr;
  return env.Undefined();
}

}  // namespace uffdpc
