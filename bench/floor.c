/*
 * floor: the benchmarks' yardstick, written for this project. The plainest
 * userfaultfd page service there is, in C with no Node: what a fault costs
 * when nothing but the kernel and one socket hop stand in the way.
 *
 * Image: page i is filled with byte (i * 7 + 1), as the benchmarks' image.
 * Latency cases: one thread touches every page once, in a seeded random
 * order, and times each touch; a fault thread answers each fault with one
 * UFFDIO_COPY of that page:
 *   local  the page comes from the image in this process's memory
 *   unix   the page is asked of a server process over a unix socket
 *   tcp    the same over TCP loopback (TCP_NODELAY)
 * Bulk cases: a server process streams the whole image in 2 MiB chunks and
 * each chunk is installed with one UFFDIO_COPY: bulk-unix, bulk-tcp.
 *
 * usage: floor [--pages N] [--seed S] [--cases local,unix,tcp,bulk-unix,bulk-tcp]
 * Prints one JSON line per case:
 *   {"case","pages","p50_us","p90_us","p99_us","max_us","total_ms"}  (latency)
 *   {"case","pages","gbytes_per_s","total_ms"}                        (bulk)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define CHUNK (2UL << 20)

static size_t npages = 32768;
static unsigned long long seed = 1;

static void fail(const char* what) {
  fprintf(stderr, "floor: %s: %s\n", what, strerror(errno));
  exit(1);
}

static double now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e9 + t.tv_nsec;
}

static unsigned char* make_image(void) {
  unsigned char* img = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (img == MAP_FAILED) fail("mmap image");
  for (size_t i = 0; i < npages; i++) memset(img + i * PAGE, (int)((i * 7 + 1) & 0xff), PAGE);
  return img;
}

/* Fisher-Yates over a splitmix64 stream. */
static uint64_t next_random(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

static size_t* random_order(void) {
  size_t* order = malloc(npages * sizeof *order);
  if (!order) fail("malloc");
  for (size_t i = 0; i < npages; i++) order[i] = i;
  uint64_t state = seed;
  for (size_t i = npages - 1; i > 0; i--) {
    size_t j = (size_t)(next_random(&state) % (i + 1)), t = order[i];
    order[i] = order[j];
    order[j] = t;
  }
  return order;
}

static int open_uffd(char* region, size_t length) {
  int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (uffd < 0) fail("userfaultfd");
  struct uffdio_api api = {.api = UFFD_API};
  if (ioctl(uffd, UFFDIO_API, &api)) fail("UFFDIO_API");
  struct uffdio_register reg = {.range = {(uintptr_t)region, length}, .mode = UFFDIO_REGISTER_MODE_MISSING};
  if (ioctl(uffd, UFFDIO_REGISTER, &reg)) fail("UFFDIO_REGISTER");
  return uffd;
}

static void copy_in(int uffd, char* dst, const void* src, size_t len) {
  struct uffdio_copy c = {.dst = (uintptr_t)dst, .src = (uintptr_t)src, .len = len};
  if (ioctl(uffd, UFFDIO_COPY, &c) && errno != EEXIST) fail("UFFDIO_COPY");
}

static void write_all(int fd, const void* buf, size_t n) {
  const char* p = buf;
  while (n) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) fail("write");
    p += w;
    n -= (size_t)w;
  }
}

static int read_all(int fd, void* buf, size_t n) {
  char* p = buf;
  while (n) {
    ssize_t r = read(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return -1;
    p += r;
    n -= (size_t)r;
  }
  return 0;
}

/* A connected pair: [0] for this process, [1] for the server child. */
static void connect_pair(int tcp, int fds[2]) {
  if (!tcp) {
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds)) fail("socketpair");
    return;
  }
  int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t len = sizeof a;
  if (listener < 0 || bind(listener, (void*)&a, sizeof a) || listen(listener, 1) || getsockname(listener, (void*)&a, &len)) fail("listen");
  fds[0] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fds[0] < 0 || connect(fds[0], (void*)&a, sizeof a)) fail("connect");
  fds[1] = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
  if (fds[1] < 0) fail("accept");
  close(listener);
  setsockopt(fds[0], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  setsockopt(fds[1], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* The page server: answers each 8-byte page number with that page (or
 * streams the image). `other` is this process's end, closed in the child so
 * that closing it here is the end of the stream there. */
static pid_t start_server(int fd, int other, const unsigned char* img, int stream) {
  pid_t pid = fork();
  if (pid < 0) fail("fork");
  if (pid > 0) return pid;
  close(other);
  if (stream) {
    for (size_t off = 0; off < npages * PAGE; off += CHUNK) write_all(fd, img + off, npages * PAGE - off < CHUNK ? npages * PAGE - off : CHUNK);
  } else {
    uint64_t page;
    while (read_all(fd, &page, sizeof page) == 0 && page < npages) write_all(fd, img + page * PAGE, PAGE);
  }
  _exit(0);
}

struct fault_loop {
  int uffd, sock, stop;
  char* region;
  const unsigned char* img; /* local case: pages come from here */
};

static void* serve_faults(void* arg) {
  struct fault_loop* f = arg;
  static unsigned char page[PAGE] __attribute__((aligned(4096)));
  struct pollfd p = {.fd = f->uffd, .events = POLLIN};
  while (!__atomic_load_n(&f->stop, __ATOMIC_ACQUIRE)) {
    if (poll(&p, 1, 50) <= 0) continue;
    struct uffd_msg m;
    if (read(f->uffd, &m, sizeof m) != sizeof m) continue;
    if (m.event != UFFD_EVENT_PAGEFAULT) continue;
    uint64_t pg = (m.arg.pagefault.address - (uintptr_t)f->region) / PAGE;
    char* dst = f->region + pg * PAGE;
    if (f->img) {
      copy_in(f->uffd, dst, f->img + pg * PAGE, PAGE);
    } else {
      write_all(f->sock, &pg, sizeof pg);
      if (read_all(f->sock, page, PAGE)) fail("read page");
      copy_in(f->uffd, dst, page, PAGE);
    }
  }
  return NULL;
}

static int by_value(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return x < y ? -1 : x > y;
}

static void latency_case(const char* name, int transport /* 0 local, 1 unix, 2 tcp */) {
  unsigned char* img = make_image();
  char* region = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (region == MAP_FAILED) fail("mmap region");
  struct fault_loop f = {.uffd = open_uffd(region, npages * PAGE), .sock = -1, .region = region};
  pid_t server = 0;
  if (transport == 0) {
    f.img = img;
  } else {
    int fds[2];
    connect_pair(transport == 2, fds);
    server = start_server(fds[1], fds[0], img, 0);
    close(fds[1]);
    f.sock = fds[0];
  }
  pthread_t thread;
  pthread_create(&thread, NULL, serve_faults, &f);
  size_t* order = random_order();
  double* lat = malloc(npages * sizeof *lat);
  if (!lat) fail("malloc");
  size_t bad = 0;
  double t0 = now_ns();
  for (size_t k = 0; k < npages; k++) {
    size_t pg = order[k];
    double a = now_ns();
    unsigned char v = *(volatile unsigned char*)(region + pg * PAGE);
    lat[k] = now_ns() - a;
    if (v != (unsigned char)((pg * 7 + 1) & 0xff)) bad++;
  }
  double total = now_ns() - t0;
  __atomic_store_n(&f.stop, 1, __ATOMIC_RELEASE);
  pthread_join(thread, NULL);
  if (f.sock >= 0) close(f.sock); /* the server sees the end and exits */
  if (server) waitpid(server, NULL, 0);
  if (bad) {
    fprintf(stderr, "floor: %s: %zu pages read wrong\n", name, bad);
    exit(1);
  }
  qsort(lat, npages, sizeof *lat, by_value);
  printf("{\"case\":\"%s\",\"pages\":%zu,\"p50_us\":%.2f,\"p90_us\":%.2f,\"p99_us\":%.2f,\"max_us\":%.2f,\"total_ms\":%.1f}\n", name, npages,
         lat[npages / 2] / 1e3, lat[npages * 9 / 10] / 1e3, lat[npages * 99 / 100] / 1e3, lat[npages - 1] / 1e3, total / 1e6);
  fflush(stdout);
  close(f.uffd);
  munmap(region, npages * PAGE);
  munmap(img, npages * PAGE);
  free(order);
  free(lat);
}

static void bulk_case(const char* name, int tcp) {
  unsigned char* img = make_image();
  char* region = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (region == MAP_FAILED) fail("mmap region");
  int uffd = open_uffd(region, npages * PAGE), fds[2];
  connect_pair(tcp, fds);
  pid_t server = start_server(fds[1], fds[0], img, 1);
  double t0 = now_ns(); /* the stream, not the fork */
  close(fds[1]);
  unsigned char* chunk = aligned_alloc(PAGE, CHUNK);
  if (!chunk) fail("aligned_alloc");
  for (size_t off = 0; off < npages * PAGE; off += CHUNK) {
    size_t n = npages * PAGE - off < CHUNK ? npages * PAGE - off : CHUNK;
    if (read_all(fds[0], chunk, n)) fail("read chunk");
    copy_in(uffd, region + off, chunk, n);
  }
  double total = now_ns() - t0;
  waitpid(server, NULL, 0);
  for (size_t i = 0; i < npages; i += 97)
    if (region[i * PAGE] != (char)((i * 7 + 1) & 0xff)) {
      fprintf(stderr, "floor: %s: page %zu read wrong\n", name, i);
      exit(1);
    }
  printf("{\"case\":\"%s\",\"pages\":%zu,\"gbytes_per_s\":%.3f,\"total_ms\":%.1f}\n", name, npages, (double)(npages * PAGE) / total, total / 1e6);
  fflush(stdout);
  close(fds[0]);
  close(uffd);
  free(chunk);
  munmap(region, npages * PAGE);
  munmap(img, npages * PAGE);
}

int main(int argc, char** argv) {
  const char* cases = "local,unix,tcp,bulk-unix,bulk-tcp";
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--pages") && i + 1 < argc)
      npages = strtoull(argv[++i], NULL, 0);
    else if (!strcmp(argv[i], "--seed") && i + 1 < argc)
      seed = strtoull(argv[++i], NULL, 0);
    else if (!strcmp(argv[i], "--cases") && i + 1 < argc)
      cases = argv[++i];
    else {
      fprintf(stderr, "usage: floor [--pages N] [--seed S] [--cases local,unix,tcp,bulk-unix,bulk-tcp]\n");
      return 2;
    }
  }
  if (npages == 0 || npages > (1UL << 26)) {
    fprintf(stderr, "floor: --pages must be from 1 to %lu\n", 1UL << 26);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  char list[256];
  snprintf(list, sizeof list, ",%s,", cases);
  if (strstr(list, ",local,")) latency_case("local", 0);
  if (strstr(list, ",unix,")) latency_case("unix", 1);
  if (strstr(list, ",tcp,")) latency_case("tcp", 2);
  if (strstr(list, ",bulk-unix,")) bulk_case("bulk-unix", 0);
  if (strstr(list, ",bulk-tcp,")) bulk_case("bulk-tcp", 1);
  return 0;
}
