// Data-plane threads report to JS through one thread-safe function per object:
// small records {type, channel, code, message, a, b, generation}, never one
// call per page. `generation` names the set of data channels an event came
// from, so a late event from channels already replaced can be told apart.
#pragma once
#include <napi.h>

#include <string>

namespace uffdpc {

struct NativeEvent {
  std::string type;
  std::string channel;
  std::string code;
  std::string message;
  double a = 0, b = 0;
  uint32_t generation = 0;
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
      o.Set("a", event->a);
      o.Set("b", event->b);
      o.Set("generation", event->generation);
      // An exception thrown by the callback would be swallowed (DEP0168); the
      // JS side catches inside its own handler.
      callback.Call({o});
    }
    delete event;
  }

  Napi::ThreadSafeFunction tsfn_;
  bool open_ = false;
};

}  // namespace uffdpc
