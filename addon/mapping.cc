#include "mapping.h"

#include <sys/mman.h>

#include "errors.h"

namespace uffdpc {

Napi::Function Mapping::Define(Napi::Env env) {
  Napi::Function fn =
      DefineClass(env, "Mapping",
                  {InstanceAccessor<&Mapping::Address>("address"), InstanceAccessor<&Mapping::Length>("length"), InstanceAccessor<&Mapping::Mapped>("mapped"),
                   InstanceMethod<&Mapping::View>("view"), InstanceMethod<&Mapping::Unmap>("unmap")});
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
  data_ = reserved_ = static_cast<uint8_t*>(p);
  length_ = length;
}

Mapping::~Mapping() {
  // Every view holds a reference to this Mapping (see View), so no view can
  // outlive this munmap, even one moved to another ArrayBuffer by a transfer.
  if (reserved_) munmap(reserved_, length_);
}

Napi::Value Mapping::Address(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), static_cast<double>(reinterpret_cast<uintptr_t>(data_))); }
Napi::Value Mapping::Length(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), static_cast<double>(length_)); }
Napi::Value Mapping::Mapped(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), data_ != nullptr); }

// view(): an ArrayBuffer over the whole mapping, no copy. Each view holds a
// strong reference to this Mapping until the view itself is collected.
Napi::Value Mapping::View(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!data_) throw CodedError(env, "ERR_MAPPING_UNMAPPED", "the mapping was unmapped");
  viewsHandedOut_ = true;
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
  if (pins_ > 0) throw CodedError(env, "ERR_MAPPING_BUSY", "the mapping is in use by a running page server session");
  for (auto& ref : views_) {
    Napi::ArrayBuffer ab = ref.Value();
    if (!ab.IsEmpty() && !ab.IsDetached()) ab.Detach();
  }
  views_.clear();
  if (!viewsHandedOut_) {
    if (munmap(data_, length_) != 0) ThrowErrno(env, errno, "munmap");
    reserved_ = data_ = nullptr;
    return env.Undefined();
  }
  // Views were handed out, and one may have escaped detaching (transferred to
  // another ArrayBuffer). Release the memory now but keep the addresses until
  // the finalizer, so such a view reads fresh zero pages, never freed or
  // reused memory.
  void* fresh = mmap(data_, length_, PROT_READ | PROT_WRITE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (fresh == MAP_FAILED) ThrowErrno(env, errno, "mmap");
  data_ = nullptr;
  return env.Undefined();
}

}  // namespace uffdpc
