// Each addon part registers its exports through one Init function.
#pragma once
#include <napi.h>

namespace uffdpc {
void InitUffd(Napi::Env env, Napi::Object exports);
void InitMemory(Napi::Env env, Napi::Object exports);
void InitFdPassing(Napi::Env env, Napi::Object exports);
void InitWorkload(Napi::Env env, Napi::Object exports);
void InitPageServer(Napi::Env env, Napi::Object exports);
void InitFaultEngine(Napi::Env env, Napi::Object exports);
void InitFdWatcher(Napi::Env env, Napi::Object exports);
void InitPageChecksum(Napi::Env env, Napi::Object exports);
void InitChunkCache(Napi::Env env, Napi::Object exports);
void InitQemuSource(Napi::Env env, Napi::Object exports);
void InitConstants(Napi::Env env, Napi::Object exports);
void InitRunPacker(Napi::Env env, Napi::Object exports);
}  // namespace uffdpc
