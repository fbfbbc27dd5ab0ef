// Data-plane threads report to JS through one thread-safe function per object:
// small records, never one call per page. Each has a type, optionally the
// channel and a code (one of lib/errors.ts, or an errno name with its errno
// and syscall, like Node's own errors), `generation` (the set of data channels
// it came from, so a late event from channels already replaced can be told
// apart), and named numbers (e.g. start/end of a range). The JS side lists
// every type with its fields in lib/native.ts (NativeEvent).
#pragma once
#include <napi.h>

#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "errors.h"

namespace uffdpc {

struct OwedAnswers;

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
  std::vector<std::pair<const char*, bool>> flags;  // named booleans
  bool settles = false;                             // pays one answer owed (EventSink::Owe)
  std::shared_ptr<OwedAnswers> owed;                // set by Emit when `settles`
};

// The answers a sink still owes (JS thread only): while any is, the sink keeps
// the process alive. Shared with events in flight, which may be delivered
// after the sink's owner is gone, and with the thread-safe function's own
// finalizer: `gone` is set once Node has freed the function (after Close(),
// or at process exit, when Node frees every one before it runs the finalizers
// of objects collected on the way out), and nothing touches it after that.
struct OwedAnswers {
  Napi::ThreadSafeFunction tsfn;
  uint64_t count = 0;
  std::mutex mu;  // held by emitting threads across each call, and by the finalizer
  bool gone = false;
  void Pay(Napi::Env env) {
    if (count > 0 && --count == 0 && !gone) tsfn.Unref(env);
  }
};

class EventSink {
 public:
  void Open(Napi::Env env, Napi::Function callback, const char* name) {
    tsfn_ = Napi::ThreadSafeFunction::New(env, callback, name, 0, 1, static_cast<void*>(nullptr), &Gone, new std::shared_ptr<OwedAnswers>(owed_));
    owed_->tsfn = tsfn_;
    open_ = true;
  }
  // JS thread: the sink keeps the process alive only while an answer is owed:
  // Owe() per answer expected, paid by the delivery of an event that
  // `settles`, or by Forgive() (an answer that will not come).
  void KeepAliveOnlyWhileOwed(Napi::Env env) {
    if (!owed_->gone) tsfn_.Unref(env);
  }
  void Owe(Napi::Env env) {
    if (owed_->count++ == 0 && !owed_->gone) tsfn_.Ref(env);
  }
  void Forgive(Napi::Env env) { owed_->Pay(env); }
  // From any thread while open. Drops the event if the queue is closing.
  void Emit(NativeEvent event) {
    if (!open_) return;
    if (event.settles) event.owed = owed_;
    auto* heap = new NativeEvent(std::move(event));
    std::lock_guard<std::mutex> lock(owed_->mu);
    if (owed_->gone || tsfn_.NonBlockingCall(heap, Deliver) != napi_ok) delete heap;
  }
  // On the JS thread, after every emitting thread has been joined.
  void Close() {
    if (!open_) return;
    open_ = false;
    if (!owed_->gone) tsfn_.Release();
  }

 private:
  // Node's finalizer of the thread-safe function (JS thread).
  static void Gone(Napi::Env, std::shared_ptr<OwedAnswers>* owed, void*) {
    {
      std::lock_guard<std::mutex> lock((*owed)->mu);
      (*owed)->gone = true;
    }
    delete owed;
  }

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
      for (auto& [name, value] : event->flags) o.Set(name, value);
      if (event->owed) event->owed->Pay(env);
      // An exception thrown by the callback would be swallowed (DEP0168); the
      // JS side catches inside its own handler.
      callback.Call({o});
    }
    delete event;
  }

  Napi::ThreadSafeFunction tsfn_;
  std::shared_ptr<OwedAnswers> owed_ = std::make_shared<OwedAnswers>();
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
