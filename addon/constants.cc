// The wire and stream constants as the native code sees them, for
// test/constants.test.ts to compare with their TypeScript homes (lib/wire.ts,
// lib/limits.ts, lib/qemu-stream.ts) constant by constant. Each group is keyed
// by the C++ names of wire.h and qemu_stream.h; the test also checks that every
// constant those headers declare is listed here.
#include "addon.h"
#include "qemu_stream.h"
#include "wire.h"

namespace uffdpc {
namespace {

#define UFFDPC_SET(group, name) group.Set(#name, Napi::Number::New(env, static_cast<double>(name)))

Napi::Value Constants(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object wire = Napi::Object::New(env);
  {
    using namespace uffdpc::wire;
    Napi::Object kind = Napi::Object::New(env);
    UFFDPC_SET(kind, kRequest);
    UFFDPC_SET(kind, kDataRun);
    UFFDPC_SET(kind, kZeroRun);
    UFFDPC_SET(kind, kBulkEnd);
    UFFDPC_SET(kind, kDiscardRun);
    UFFDPC_SET(kind, kSwitchover);
    UFFDPC_SET(kind, kDiscardMark);
    UFFDPC_SET(kind, kPackedRun);
    Napi::Object reason = Napi::Object::New(env);
    UFFDPC_SET(reason, kRequested);
    UFFDPC_SET(reason, kWindow);
    UFFDPC_SET(reason, kBackground);
    UFFDPC_SET(reason, kPrefetch);
    UFFDPC_SET(reason, kPrecopy);
    Napi::Object sizes = Napi::Object::New(env);
    sizes.Set("PageRequest", Napi::Number::New(env, sizeof(PageRequest)));
    sizes.Set("RunHeader", Napi::Number::New(env, sizeof(RunHeader)));
    UFFDPC_SET(sizes, kMaxRunBytes);
    wire.Set("Kind", kind);
    wire.Set("Reason", reason);
    wire.Set("sizes", sizes);
  }
  Napi::Object qemu = Napi::Object::New(env);
  {
    using namespace uffdpc::qemu;
    Napi::Object stream = Napi::Object::New(env);
    UFFDPC_SET(stream, kStreamMagic);
    UFFDPC_SET(stream, kStreamVersion);
    UFFDPC_SET(stream, kStreamMaxPackaged);
    Napi::Object section = Napi::Object::New(env);
    UFFDPC_SET(section, kSectionEof);
    UFFDPC_SET(section, kSectionStart);
    UFFDPC_SET(section, kSectionPart);
    UFFDPC_SET(section, kSectionEnd);
    UFFDPC_SET(section, kSectionFull);
    UFFDPC_SET(section, kSectionVmDescription);
    UFFDPC_SET(section, kSectionConfiguration);
    UFFDPC_SET(section, kSectionCommand);
    UFFDPC_SET(section, kSectionFooter);
    Napi::Object flag = Napi::Object::New(env);
    UFFDPC_SET(flag, kFlagFull);
    UFFDPC_SET(flag, kFlagZero);
    UFFDPC_SET(flag, kFlagMemSize);
    UFFDPC_SET(flag, kFlagPage);
    UFFDPC_SET(flag, kFlagEos);
    UFFDPC_SET(flag, kFlagContinue);
    UFFDPC_SET(flag, kFlagXbzrle);
    UFFDPC_SET(flag, kFlagHook);
    UFFDPC_SET(flag, kFlagCompressPage);
    UFFDPC_SET(flag, kFlagMultifdFlush);
    Napi::Object command = Napi::Object::New(env);
    UFFDPC_SET(command, kCmdOpenReturnPath);
    UFFDPC_SET(command, kCmdPing);
    UFFDPC_SET(command, kCmdPostcopyAdvise);
    UFFDPC_SET(command, kCmdPostcopyListen);
    UFFDPC_SET(command, kCmdPostcopyRun);
    UFFDPC_SET(command, kCmdPostcopyRamDiscard);
    UFFDPC_SET(command, kCmdPackaged);
    Napi::Object rp = Napi::Object::New(env);
    UFFDPC_SET(rp, kRpShut);
    UFFDPC_SET(rp, kRpPong);
    UFFDPC_SET(rp, kRpReqPagesId);
    UFFDPC_SET(rp, kRpReqPages);
    qemu.Set("Stream", stream);
    qemu.Set("Section", section);
    qemu.Set("RamFlag", flag);
    qemu.Set("Command", command);
    qemu.Set("ReturnPath", rp);
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("wire", wire);
  out.Set("qemu", qemu);
  return out;
}

#undef UFFDPC_SET

}  // namespace

void InitConstants(Napi::Env env, Napi::Object exports) { exports.Set("constants", Napi::Function::New(env, Constants, "constants")); }

}  // namespace uffdpc
