/*
 * guest-mem: the test guest's workload (the initramfs's /init runs it as the
 * guest's only program). It fills MIB MiB of memory with a pattern each page
 * of which it can check (the page's number and a generation kept per page),
 * then forever: rewrites a share of its pages with a new generation, checks
 * every page, and prints one line a second on the console:
 *   guest-mem: pass N pages P errors E
 * A guest restored with any page missing, stale or misplaced prints errors.
 * usage (kernel command line): guest_mem_mib=MIB
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PG 4096

static uint64_t mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  return x ^ (x >> 33);
}

static void fill(uint64_t* page, uint64_t n, uint32_t gen) {
  for (int i = 0; i < PG / 8; i++) page[i] = mix((n << 32) ^ ((uint64_t)gen << 12) ^ (uint64_t)i);
}

static int check(const uint64_t* page, uint64_t n, uint32_t gen) {
  for (int i = 0; i < PG / 8; i++)
    if (page[i] != mix((n << 32) ^ ((uint64_t)gen << 12) ^ (uint64_t)i)) return 0;
  return 1;
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

int main(void) {
  size_t mib = 64;
  char cmdline[4096] = {0};
  int fd = open("/proc/cmdline", O_RDONLY);
  if (fd >= 0) {
    if (read(fd, cmdline, sizeof cmdline - 1) < 0) cmdline[0] = 0;
    close(fd);
    char* at = strstr(cmdline, "guest_mem_mib=");
    if (at) mib = strtoul(at + 14, NULL, 10);
  }
  size_t pages = mib * 1024 * 1024 / PG;
  uint8_t* mem = mmap(NULL, pages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  uint32_t* gen = calloc(pages, sizeof *gen);
  if (mem == MAP_FAILED || !gen) {
    printf("guest-mem: cannot allocate %zu MiB\n", mib);
    return 1;
  }
  for (size_t p = 0; p < pages; p++) fill((uint64_t*)(mem + p * PG), p, 0);
  printf("guest-mem: filled pages %zu\n", pages);
  fflush(stdout);
  uint64_t rng = 0x9e3779b97f4a7c15ULL;
  for (unsigned long pass = 1;; pass++) {
    double t0 = now();
    /* A share of the pages gets a new generation: memory keeps changing. */
    for (size_t k = 0; k < pages / 64; k++) {
      rng = mix(rng + k);
      size_t p = rng % pages;
      gen[p]++;
      fill((uint64_t*)(mem + p * PG), p, gen[p]);
    }
    size_t errors = 0;
    for (size_t p = 0; p < pages; p++) errors += !check((const uint64_t*)(mem + p * PG), p, gen[p]);
    printf("guest-mem: pass %lu pages %zu errors %zu\n", pass, pages, errors);
    fflush(stdout);
    double left = 1.0 - (now() - t0);
    if (left > 0) {
      struct timespec ts = {0, (long)(left * 1e9)};
      nanosleep(&ts, NULL);
    }
  }
}
