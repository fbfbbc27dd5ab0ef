// Memory primitives: memfd_create and seals, madvise, fallocate, and the data
// and hole extents of a file. Ranges arrive validated by lib/memory.ts.
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>

#include "addon.h"
#include "errors.h"
#include "mapping.h"

namespace uffdpc {
namespace {

int64_t I64(const Napi::Value& v) { return v.As<Napi::Number>().Int64Value(); }

Napi::Value MemfdCreate(const Napi::CallbackInfo& info) {
  std::string name = info[0].As<Napi::String>().Utf8Value();
  int fd = memfd_create(name.c_str(), info[1].As<Napi::Number>().Uint32Value());
  if (fd < 0) ThrowErrno(info.Env(), errno, "memfd_create");
  return Napi::Number::New(info.Env(), fd);
}

Napi::Value AddSeals(const Napi::CallbackInfo& info) {
  if (fcntl(info[0].As<Napi::Number>().Int32Value(), F_ADD_SEALS, info[1].As<Napi::Number>().Int32Value()) != 0)
    ThrowErrno(info.Env(), errno, "fcntl", "F_ADD_SEALS");
  return info.Env().Undefined();
}

Napi::Value GetSeals(const Napi::CallbackInfo& info) {
  int seals = fcntl(info[0].As<Napi::Number>().Int32Value(), F_GET_SEALS);
  if (seals < 0) ThrowErrno(info.Env(), errno, "fcntl", "F_GET_SEALS");
  return Napi::Number::New(info.Env(), seals);
}

// madvise(address, length, advice)
Napi::Value Madvise(const Napi::CallbackInfo& info) {
  void* addr = reinterpret_cast<void*>(static_cast<uintptr_t>(I64(info[0])));
  if (madvise(addr, static_cast<size_t>(I64(info[1])), info[2].As<Napi::Number>().Int32Value()) != 0) ThrowErrno(info.Env(), errno, "madvise");
  return info.Env().Undefined();
}

// fallocate(fd, mode, offset, length)
Napi::Value Fallocate(const Napi::CallbackInfo& info) {
  if (fallocate(info[0].As<Napi::Number>().Int32Value(), info[1].As<Napi::Number>().Int32Value(), I64(info[2]), I64(info[3])) != 0)
    ThrowErrno(info.Env(), errno, "fallocate");
  return info.Env().Undefined();
}

// fileExtents(fd, size): [offset, length, isData] triples covering [0, size),
// found with SEEK_DATA / SEEK_HOLE, flattened into one array of numbers.
Napi::Value FileExtents(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  off_t size = I64(info[1]);
  std::vector<double> flat;
  off_t pos = 0;
  while (pos < size) {
    off_t data = lseek(fd, pos, SEEK_DATA);
    if (data < 0 && errno != ENXIO) ThrowErrno(env, errno, "lseek", "SEEK_DATA");
    if (data < 0 || data >= size) data = size;  // ENXIO: only a hole remains
    if (data > pos) flat.insert(flat.end(), {double(pos), double(data - pos), 0});
    if (data >= size) break;
    off_t hole = lseek(fd, data, SEEK_HOLE);
    if (hole < 0) ThrowErrno(env, errno, "lseek", "SEEK_HOLE");
    if (hole > size) hole = size;
    flat.insert(flat.end(), {double(data), double(hole - data), 1});
    pos = hole;
  }
  Napi::Array out = Napi::Array::New(env, flat.size());
  for (size_t i = 0; i < flat.size(); i++) out.Set(i, flat[i]);
  return out;
}

}  // namespace

void InitMemory(Napi::Env env, Napi::Object exports) {
  exports.Set("Mapping", Mapping::Define(env));
  exports.Set("memfdCreate", Napi::Function::New(env, MemfdCreate));
  exports.Set("addSeals", Napi::Function::New(env, AddSeals));
  exports.Set("getSeals", Napi::Function::New(env, GetSeals));
  exports.Set("madvise", Napi::Function::New(env, Madvise));
  exports.Set("fallocate", Napi::Function::New(env, Fallocate));
  exports.Set("fileExtents", Napi::Function::New(env, FileExtents));
  Napi::Object c = Napi::Object::New(env);
  c.Set("PAGE_SIZE", static_cast<double>(sysconf(_SC_PAGESIZE)));
  c.Set("PROT_NONE", PROT_NONE);
  c.Set("PROT_READ", PROT_READ);
  c.Set("PROT_WRITE", PROT_WRITE);
  c.Set("MAP_SHARED", MAP_SHARED);
  c.Set("MAP_PRIVATE", MAP_PRIVATE);
  c.Set("MAP_ANONYMOUS", MAP_ANONYMOUS);
  c.Set("MAP_FIXED", MAP_FIXED);
  c.Set("MAP_FIXED_NOREPLACE", MAP_FIXED_NOREPLACE);
  c.Set("MAP_POPULATE", MAP_POPULATE);
  c.Set("MAP_NORESERVE", MAP_NORESERVE);
  c.Set("MAP_HUGETLB", MAP_HUGETLB);
  c.Set("MFD_CLOEXEC", MFD_CLOEXEC);
  c.Set("MFD_ALLOW_SEALING", MFD_ALLOW_SEALING);
  c.Set("MFD_HUGETLB", MFD_HUGETLB);
  c.Set("MFD_HUGE_SHIFT", 26);  // HUGETLB_FLAG_ENCODE_SHIFT
  c.Set("F_SEAL_SEAL", F_SEAL_SEAL);
  c.Set("F_SEAL_SHRINK", F_SEAL_SHRINK);
  c.Set("F_SEAL_GROW", F_SEAL_GROW);
  c.Set("F_SEAL_WRITE", F_SEAL_WRITE);
  c.Set("F_SEAL_FUTURE_WRITE", F_SEAL_FUTURE_WRITE);
  c.Set("MADV_DONTNEED", MADV_DONTNEED);
  c.Set("MADV_REMOVE", MADV_REMOVE);
  c.Set("MADV_HUGEPAGE", MADV_HUGEPAGE);
  c.Set("MADV_NOHUGEPAGE", MADV_NOHUGEPAGE);
  c.Set("MADV_POPULATE_READ", MADV_POPULATE_READ);
  c.Set("MADV_POPULATE_WRITE", MADV_POPULATE_WRITE);
  c.Set("FALLOC_FL_KEEP_SIZE", FALLOC_FL_KEEP_SIZE);
  c.Set("FALLOC_FL_PUNCH_HOLE", FALLOC_FL_PUNCH_HOLE);
  exports.Set("memoryConstants", c);
}

}  // namespace uffdpc
