// Mapping: one mmap'd region owned by JS. Views handed to JS are external
// ArrayBuffers; unmap() detaches every live view before munmap, so a stale view
// reads as empty instead of touching freed memory. Native users (page server
// sessions) pin the mapping so it cannot be unmapped under them.
#pragma once
#include <napi.h>

#include <atomic>
#include <vector>

namespace uffdpc {

class Mapping : public Napi::ObjectWrap<Mapping> {
 public:
  static Napi::Function Define(Napi::Env env);
  explicit Mapping(const Napi::CallbackInfo& info);
  ~Mapping() override;

  uint8_t* data() const { return data_; }
  size_t length() const { return length_; }
  bool mapped() const { return data_ != nullptr; }
  void Pin() { pins_++; }
  void Unpin() { pins_--; }

 private:
  Napi::Value Address(const Napi::CallbackInfo& info);
  Napi::Value Length(const Napi::CallbackInfo& info);
  Napi::Value View(const Napi::CallbackInfo& info);
  Napi::Value Unmap(const Napi::CallbackInfo& info);
  Napi::Value Mapped(const Napi::CallbackInfo& info);

  uint8_t* data_ = nullptr;      // the live mapping, null after unmap()
  uint8_t* reserved_ = nullptr;  // the address range, unmapped at finalization (or at unmap() if no view was made)
  bool viewsHandedOut_ = false;
  size_t length_ = 0;
  std::atomic<int> pins_{0};
  std::vector<Napi::Reference<Napi::ArrayBuffer>> views_;
};

}  // namespace uffdpc
