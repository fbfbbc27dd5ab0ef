#include "addon.h"

namespace uffdpc {

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  InitUffd(env, exports);
  InitMemory(env, exports);
  InitFdPassing(env, exports);
  InitWorkload(env, exports);
  InitPageServer(env, exports);
  InitFaultEngine(env, exports);
  InitFdWatcher(env, exports);
  InitPageChecksum(env, exports);
  InitChunkCache(env, exports);
  InitQemuSource(env, exports);
  InitConstants(env, exports);
  InitRunPacker(env, exports);
  return exports;
}

NODE_API_MODULE(uffd_postcopy, Init)

}  // namespace uffdpc
