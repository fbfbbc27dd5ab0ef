// Data-plane threads carry names ("pc-fault", ...) so that tools and the
// benchmark can attribute CPU time to them; they can be pinned to one CPU.
#pragma once
#include <pthread.h>
#include <sched.h>

namespace uffdpc {

inline void NameAndPinThisThread(const char* name, int cpu) {
  pthread_setname_np(pthread_self(), name);
  if (cpu < 0) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

}  // namespace uffdpc
