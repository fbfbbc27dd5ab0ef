// Blocking socket I/O for the data-plane threads: whole reads, whole writev,
// and a monotonic clock.
#pragma once
#include <limits.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>

namespace uffdpc {

inline uint64_t MonotonicNs() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return static_cast<uint64_t>(t.tv_sec) * 1000000000ull + static_cast<uint64_t>(t.tv_nsec);
}

// Reads exactly n bytes. Returns 0 on success, -1 at a clean EOF before the
// first byte, or an errno value (EPIPE for EOF in the middle).
inline int ReadFull(int fd, void* buf, size_t n) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = read(fd, static_cast<char*>(buf) + got, n - got);
    if (r > 0) {
      got += static_cast<size_t>(r);
      continue;
    }
    if (r == 0) return got == 0 ? -1 : EPIPE;
    if (errno == EINTR) continue;
    return errno;
  }
  return 0;
}

// Moves past `bytes` written from iov[0..count): whole iovecs dropped, the
// next one trimmed in place.
inline void AdvanceIovecs(iovec*& iov, int& count, size_t bytes) {
  while (count > 0 && bytes >= iov->iov_len) {
    bytes -= iov->iov_len;
    iov++;
    count--;
  }
  if (count > 0) {
    iov->iov_base = static_cast<char*>(iov->iov_base) + bytes;
    iov->iov_len -= bytes;
  }
}

// Writes every byte of iov[0..count); advances the iovecs in place. 0 or errno.
inline int WritevFull(int fd, iovec* iov, int count) {
  while (count > 0) {
    ssize_t w = writev(fd, iov, count > IOV_MAX ? IOV_MAX : count);
    if (w < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    AdvanceIovecs(iov, count, static_cast<size_t>(w));
  }
  return 0;
}

// Asks for large socket buffers on a bulk channel so a whole 2 MiB run moves
// per wakeup; as root the FORCE variants lift the sysctl caps. Best effort.
inline void EnlargeSocketBuffer(int fd, int option, int forceOption, int bytes) {
  if (setsockopt(fd, SOL_SOCKET, forceOption, &bytes, sizeof bytes) != 0) setsockopt(fd, SOL_SOCKET, option, &bytes, sizeof bytes);
}

inline int WriteFull(int fd, const void* buf, size_t n) {
  iovec iov{const_cast<void*>(buf), n};
  return WritevFull(fd, &iov, 1);
}

}  // namespace uffdpc
