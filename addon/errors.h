// Errors that reach JS shaped like Node's own fs errors: `code` (e.g. "EEXIST"),
// negative `errno`, and `syscall`; ioctl failures also carry `request`.
#pragma once
#include <napi.h>
#include <string>

namespace uffdpc {

Napi::Error ErrnoError(Napi::Env env, int err, const std::string& syscall, const std::string& request = "");
[[noreturn]] void ThrowErrno(Napi::Env env, int err, const std::string& syscall, const std::string& request = "");
// The symbolic name of an errno value ("EAGAIN"), or "E<n>" when unknown.
std::string ErrnoName(int err);
// A protocol/usage error with one of our stable codes (ERR_...).
Napi::Error CodedError(Napi::Env env, const std::string& code, const std::string& message);

}  // namespace uffdpc
