/*
 * guest-mem: the test guest's workload (the initramfs's /init runs it as the
 * guest's only program). It fills MIB MiB of memory with a pattern each page
 * of which it can check (the page's number and a generation kept per page),
 * and a hot region of HOT MiB it rewrites without pause, RATE pages a second
 * (each page: its sequence number, its number, a payload and a checksum), so
 * that memory keeps changing whenever the guest runs, a save included. Then
 * forever: rewrites a share of its pages with a new generation, checks every
 * page of both (a hot page must hold the sequence number last written to it
 * and a matching checksum), prints one line a second on the console:
 *   guest-mem: pass N pages P errors E writes W
 * and spends the rest of the second rewriting the hot region. A guest
 * restored with any page missing, stale, torn or misplaced prints errors.
 * usage (kernel command line): guest_mem_mib=MIB guest_mem_hot_mib=HOT
 * guest_mem_rate=RATE (defaults 64, 8, 20000)
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
#define WORDS (PG / 8)

static uint64_t mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  return x ^ (x >> 33);
}

static void fill(uint64_t* page, uint64_t n, uint32_t gen) {
  for (int i = 0; i < WORDS; i++) page[i] = mix((n << 32) ^ ((uint64_t)gen << 12) ^ (uint64_t)i);
}

static int check(const uint64_t* page, uint64_t n, uint32_t gen) {
  for (int i = 0; i < WORDS; i++)
    if (page[i] != mix((n << 32) ^ ((uint64_t)gen << 12) ^ (uint64_t)i)) return 0;
  return 1;
}

/* A hot page: [0] its sequence number, [1] its number, a payload, [WORDS-1] the checksum of the rest (cheap: written thousands of times a second). */
static uint64_t hot_word(uint64_t seq, uint64_t n, int i) {
  return (seq << 24) ^ (n << 12) ^ (uint64_t)i ^ 0x5bd1e995ULL;
}

static uint64_t hot_sum(const uint64_t* page) {
  uint64_t sum = 0;
  for (int i = 0; i < WORDS - 1; i++) sum = (sum ^ page[i]) * 0x100000001b3ULL;
  return sum;
}

static void stamp(uint64_t* page, uint64_t n, uint64_t seq) {
  page[0] = seq;
  page[1] = n;
  for (int i = 2; i < WORDS - 1; i++) page[i] = hot_word(seq, n, i);
  page[WORDS - 1] = hot_sum(page);
}

static int check_hot(const uint64_t* page, uint64_t n, uint64_t seq) {
  if (page[0] != seq || page[1] != n || page[WORDS - 1] != hot_sum(page)) return 0;
  for (int i = 2; i < WORDS - 1; i++)
    if (page[i] != hot_word(seq, n, i)) return 0;
  return 1;
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static size_t option(const char* cmdline, const char* name, size_t fallback) {
  const char* at = strstr(cmdline, name);
  return at ? strtoul(at + strlen(name), NULL, 10) : fallback;
}

int main(void) {
  char cmdline[4096] = {0};
  int fd = open("/proc/cmdline", O_RDONLY);
  if (fd >= 0) {
    if (read(fd, cmdline, sizeof cmdline - 1) < 0) cmdline[0] = 0;
    close(fd);
  }
  size_t mib = option(cmdline, "guest_mem_mib=", 64), hot_mib = option(cmdline, "guest_mem_hot_mib=", 8);
  size_t rate = option(cmdline, "guest_mem_rate=", 20000);
  size_t pages = mib * 1024 * 1024 / PG, hot = hot_mib * 1024 * 1024 / PG;
  uint8_t* mem = mmap(NULL, pages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  uint8_t* hot_mem = hot ? mmap(NULL, hot * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0) : NULL;
  uint32_t* gen = calloc(pages, sizeof *gen);
  uint64_t* hot_seq = calloc(hot ? hot : 1, sizeof *hot_seq);
  if (mem == MAP_FAILED || hot_mem == MAP_FAILED || !gen || !hot_seq) {
    printf("guest-mem: cannot allocate %zu + %zu MiB\n", mib, hot_mib);
    return 1;
  }
  for (size_t p = 0; p < pages; p++) fill((uint64_t*)(mem + p * PG), p, 0);
  for (size_t p = 0; p < hot; p++) stamp((uint64_t*)(hot_mem + p * PG), p, 0);
  printf("guest-mem: filled pages %zu hot %zu\n", pages, hot);
  fflush(stdout);
  uint64_t rng = 0x9e3779b97f4a7c15ULL, seq = 0, writes = 0;
  size_t cursor = 0, per_ms = rate / 1000 ? rate / 1000 : 1;
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
    for (size_t p = 0; p < hot; p++) errors += !check_hot((const uint64_t*)(hot_mem + p * PG), p, hot_seq[p]);
    printf("guest-mem: pass %lu pages %zu errors %zu writes %llu\n", pass, pages + hot, errors, (unsigned long long)writes);
    fflush(stdout);
    /* The rest of the second: the hot region is rewritten, RATE pages a second, a millisecond's worth at a time. */
    do {
      for (size_t k = 0; hot && k < per_ms; k++) {
        size_t p = cursor++ % hot;
        hot_seq[p] = ++seq;
        stamp((uint64_t*)(hot_mem + p * PG), p, seq);
        writes++;
      }
      struct timespec ts = {0, 1000000};
      nanosleep(&ts, NULL);
    } while (now() - t0 < 1.0);
  }
}
