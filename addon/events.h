// Data-plane threads report to JS through one thread-safe function per object:
// small records, never one call per page. Each has a type, optionally the
// channel and a code (one of lib/errors.ts, or an errno name with its errno
// and syscall, like Node's own errors), `generation` (the set of data channels
// it came from, so a late event from channels already replaced can be told
// apart), and named numbers (e.g. start/end of a range). The JS side lists
// every type with its fields in lib/native.ts (NativeEvent).
#pragma once
#include <napi.h>

#include <string>
#include <utility>
#include <vector>

#include "errors.h"

namespace uffdpc {

struct NativeEvent {
  using Fields = std::vector<std::pair<const char*, double>>;
  NativeEvent(std::string type_, std::string channel_ = "", std::string code_ = "", std::string message_ = "", uint32_t generation_ = 0, Fields fields_ = {})
      : type(std::move(type_)),
        channel(std::move(channel_)),
        code(std::move(code_)),
        message(std::move(message_)),
        generation(generation_),
        fields(std::move(fields_)) {}
  std::string type;
  std::string channel;
  std::string code;
  std::string message;
  uint32_t generation = 0;
  int errnum = 0;  // with `syscall`: a kernel error (code is its name)
  const char* syscall = nullptr;
  Fields fields;
};

class EventSink {
 public:
  void Open(Napi::Env env, Napi::Function callback, const char* name) {
    tsfn_ = Napi::ThreadSafeFunction::New(env, callback, name, 0, 1);
    open_ = true;
  }
  // From any thread while open. Drops the event if the queue is closing.
  void Emit(NativeEvent event) {
    if (!open_) return;
    auto* heap = new NativeEvent(std::move(event));
    if (tsfn_.NonBlockingCall(heap, Deliver) != napi_ok) delete heap;
  }
  // On the JS thread, after every emitting thread has been joined.
  void Close() {
    if (!open_) return;
    open_ = false;
    tsfn_.Release();
  }

 private:
  static void Deliver(Napi::Env env, Napi::Function callback, NativeEvent* event) {
    if (env != nullptr && callback != nullptr) {
      Napi::Object o = Napi::Object::New(env);
      o.Set("type", event->type);
      if (!event->channel.empty()) o.Set("channel", event->channel);
      if (!event->code.empty()) o.Set("code", event->code);
      if (!event->message.empty()) o.Set("message", event->message);
      if (event->errnum) {
        o.Set("errno", -event->errnum);
        if (event->syscall) o.Set("syscall", event->syscall);
      }
      o.Set("generation", event->generation);
      for (auto& [name, value] : event->fields) o.Set(name, value);
      // An exception thrown by the callback would be swallowed (DEP0168); the
      // JS side catches inside its own handler.
      callback.Call({o});
    }
    delete event;
  }

  Napi::ThreadSafeFunction tsfn_;
  bool open_ = false;
};

// A kernel error as an event: code = errno name, errno, syscall.
inline NativeEvent ErrnoEvent(const char* type, const char* channel, int err, const char* syscall, const std::string& message, uint32_t generation = 0) {
  NativeEvent e{type, channel, "", message, generation};
  if (err > 0) {
    e.code = ErrnoName(err);
    e.errnum = err;
    e.syscall = syscall;
  }
  return e;
}

}  // namespace uffdpc
