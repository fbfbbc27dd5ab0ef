#include "errors.h"

#include <cstring>

namespace uffdpc {

std::string ErrnoName(int err) {
  const char* name = strerrorname_np(err);
  return name ? std::string(name) : "E" + std::to_string(err);
}

Napi::Error ErrnoError(Napi::Env env, int err, const std::string& syscall, const std::string& request) {
  std::string code = ErrnoName(err);
  std::string message = code + ": " + strerror(err) + ", " + syscall;
  if (!request.empty()) message += " " + request;
  Napi::Error error = Napi::Error::New(env, message);
  error.Set("code", code);
  error.Set("errno", Napi::Number::New(env, -err));
  error.Set("syscall", syscall);
  if (!request.empty()) error.Set("request", request);
  return error;
}

void ThrowErrno(Napi::Env env, int err, const std::string& syscall, const std::string& request) { throw ErrnoError(env, err, syscall, request); }

Napi::Error CodedError(Napi::Env env, const std::string& code, const std::string& message) {
  Napi::Error error = Napi::Error::New(env, message);
  error.Set("code", code);
  return error;
}

}  // namespace uffdpc
