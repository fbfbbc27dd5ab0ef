// Authenticated encryption of a data channel (TCP only; unix sockets stay
// plaintext: the kernel keeps other users out). docs/PROTOCOL.md, "Encrypted
// data channels", is the layout:
//
//   record: u32 LE plaintext length n (1 .. kMaxRecord) | n bytes ciphertext | 16-byte tag
//   AES-256-GCM, key per channel and direction (derived in TypeScript from the
//   token and both handshake nonces), nonce = u32 LE direction id | u64 LE
//   record number (0, 1, 2, ... per direction), AAD = the length field.
//
// A record that fails its tag (tampered, replayed, reordered, truncated) ends
// the channel before any of it is used. Each direction is used by one thread.
#pragma once
#include <openssl/evp.h>
#include <sys/uio.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "background_pacer.h"
#include "io.h"

namespace uffdpc {

constexpr size_t kMaxRecord = 4u << 20;  // plaintext bytes per record
constexpr size_t kTagBytes = 16;
constexpr int kBadRecord = -1000;  // ReadFull/ReadSome result: a record failed authentication

class Aead {
 public:
  Aead(const uint8_t key[32], uint32_t direction, bool seal) : direction_(direction), seal_(seal), ctx_(EVP_CIPHER_CTX_new()) { std::memcpy(key_, key, 32); }
  ~Aead() { EVP_CIPHER_CTX_free(ctx_); }
  Aead(const Aead&) = delete;
  Aead& operator=(const Aead&) = delete;

  // Encrypts iov[0..count) into `out` as one record. False only if OpenSSL fails.
  bool Seal(const iovec* iov, int count, size_t plainBytes, std::vector<uint8_t>& out) {
    out.resize(4 + plainBytes + kTagBytes);
    uint32_t n = static_cast<uint32_t>(plainBytes);
    std::memcpy(out.data(), &n, 4);
    if (!Begin()) return false;
    int len = 0;
    if (EVP_EncryptUpdate(ctx_, nullptr, &len, out.data(), 4) != 1) return false;  // AAD
    uint8_t* at = out.data() + 4;
    for (int i = 0; i < count; i++) {
      if (iov[i].iov_len == 0) continue;
      if (EVP_EncryptUpdate(ctx_, at, &len, static_cast<const uint8_t*>(iov[i].iov_base), static_cast<int>(iov[i].iov_len)) != 1) return false;
      at += len;
    }
    if (EVP_EncryptFinal_ex(ctx_, at, &len) != 1) return false;
    return EVP_CIPHER_CTX_ctrl(ctx_, EVP_CTRL_GCM_GET_TAG, kTagBytes, out.data() + 4 + plainBytes) == 1;
  }

  // Decrypts `n` bytes in place and checks the tag; `header` is the length field.
  bool Open(const uint8_t header[4], uint8_t* data, size_t n, uint8_t tag[kTagBytes]) {
    if (!Begin()) return false;
    int len = 0;
    if (EVP_DecryptUpdate(ctx_, nullptr, &len, header, 4) != 1) return false;
    if (EVP_DecryptUpdate(ctx_, data, &len, data, static_cast<int>(n)) != 1) return false;
    if (EVP_CIPHER_CTX_ctrl(ctx_, EVP_CTRL_GCM_SET_TAG, kTagBytes, tag) != 1) return false;
    return EVP_DecryptFinal_ex(ctx_, data + len, &len) == 1;
  }

 private:
  // Each record: a fresh nonce on a context whose key was expanded once.
  bool Begin() {
    uint8_t nonce[12];
    std::memcpy(nonce, &direction_, 4);
    std::memcpy(nonce + 4, &sequence_, 8);
    sequence_++;
    if (!keyed_) {
      const EVP_CIPHER* cipher = EVP_aes_256_gcm();
      int ok = seal_ ? EVP_EncryptInit_ex(ctx_, cipher, nullptr, key_, nullptr) : EVP_DecryptInit_ex(ctx_, cipher, nullptr, key_, nullptr);
      if (ok != 1) return false;
      keyed_ = true;
    }
    if (seal_) return EVP_EncryptInit_ex(ctx_, nullptr, nullptr, nullptr, nonce) == 1;
    return EVP_DecryptInit_ex(ctx_, nullptr, nullptr, nullptr, nonce) == 1;
  }

  uint8_t key_[32];
  uint32_t direction_;
  uint64_t sequence_ = 0;
  bool seal_;
  bool keyed_ = false;
  EVP_CIPHER_CTX* ctx_;
};

// Writes to a data channel: plaintext writev, or one sealed record per call.
class ChannelWriter {
 public:
  ChannelWriter(int fd, std::unique_ptr<Aead> aead) : fd_(fd), aead_(std::move(aead)) {}
  bool encrypted() const { return aead_ != nullptr; }
  // From here on, every write waits for its share of the link (the bulk channel's background).
  void PaceWith(BackgroundPacer* pacer) { pacer_ = pacer; }
  // 0 or an errno (EPROTO if sealing failed).
  int Writev(iovec* iov, int count) {
    if (!aead_) return Send(iov, count);
    size_t bytes = 0;
    for (int i = 0; i < count; i++) bytes += iov[i].iov_len;
    if (!aead_->Seal(iov, count, bytes, record_)) return EPROTO;
    iovec record{record_.data(), record_.size()};
    return Send(&record, 1);
  }
  int Write(const void* buf, size_t n) {
    iovec iov{const_cast<void*>(buf), n};
    return Writev(&iov, 1);
  }

 private:
  int Send(iovec* iov, int count) { return pacer_ ? pacer_->WritevFull(iov, count) : WritevFull(fd_, iov, count); }

  int fd_;
  std::unique_ptr<Aead> aead_;
  BackgroundPacer* pacer_ = nullptr;
  std::vector<uint8_t> record_;
};

// Reads from a data channel: straight from the fd, or from opened records.
// Sealed input is read in large gulps into one buffer, records are opened in
// place there, and their plaintext is handed out without another copy.
class ChannelReader {
 public:
  ChannelReader(int fd, std::unique_ptr<Aead> aead) : fd_(fd), aead_(std::move(aead)) {
    if (aead_) in_.resize(4 + kMaxRecord + kTagBytes + (256u << 10));
  }
  int fd() const { return fd_; }

  // Exactly n bytes: 0, -1 at a clean end before the first byte, kBadRecord,
  // or an errno (EPIPE for an end in the middle).
  int ReadFull(void* buf, size_t n) {
    if (!aead_) return uffdpc::ReadFull(fd_, buf, n);
    uint8_t* out = static_cast<uint8_t*>(buf);
    size_t got = 0;
    while (got < n) {
      if (at_ == plainLen_) {
        int err = NextRecord();
        if (err) return err == -1 && got > 0 ? EPIPE : err;
      }
      size_t take = std::min(n - got, plainLen_ - at_);
      std::memcpy(out + got, plain_ + at_, take);
      at_ += take;
      got += take;
    }
    return 0;
  }

  // The next n bytes without copying them when they lie whole in the opened
  // record (a sender keeps each run inside one record); otherwise they are
  // read into `scratch`. *view points at them (valid until the next read).
  int ReadView(uint8_t* scratch, size_t n, const uint8_t** view) {
    if (aead_ && plainLen_ - at_ >= n && at_ < plainLen_) {
      *view = plain_ + at_;
      at_ += n;
      return 0;
    }
    *view = scratch;
    return ReadFull(scratch, n);
  }

  // Up to `max` bytes (at least one): the count, 0 at a clean end, or -errno / kBadRecord.
  ssize_t ReadSome(void* buf, size_t max) {
    if (!aead_) {
      for (;;) {
        ssize_t r = read(fd_, buf, max);
        if (r < 0 && errno == EINTR) continue;
        return r < 0 ? -errno : r;
      }
    }
    if (at_ == plainLen_) {
      int err = NextRecord();
      if (err == -1) return 0;
      if (err) return err == kBadRecord ? kBadRecord : -err;
    }
    size_t take = std::min(max, plainLen_ - at_);
    std::memcpy(buf, plain_ + at_, take);
    at_ += take;
    return static_cast<ssize_t>(take);
  }

 private:
  // Makes at least n unread bytes available at in_[start_]: 0, -1 at a clean
  // end before any, or an errno (EPIPE for an end in the middle).
  int Need(size_t n) {
    if (end_ - start_ >= n) return 0;
    if (in_.size() - start_ < n) {  // no room behind: move what is unread to the front
      std::memmove(in_.data(), in_.data() + start_, end_ - start_);
      end_ -= start_;
      start_ = 0;
    }
    while (end_ - start_ < n) {
      ssize_t r = read(fd_, in_.data() + end_, in_.size() - end_);
      if (r > 0) {
        end_ += static_cast<size_t>(r);
        continue;
      }
      if (r == 0) return end_ == start_ ? -1 : EPIPE;
      if (errno == EINTR) continue;
      return errno;
    }
    return 0;
  }

  int NextRecord() {
    plain_ = nullptr;
    plainLen_ = at_ = 0;
    int err = Need(4);
    if (err) return err;
    uint8_t header[4];
    std::memcpy(header, in_.data() + start_, 4);
    uint32_t n;
    std::memcpy(&n, header, 4);
    if (n == 0 || n > kMaxRecord) return kBadRecord;  // checked before anything is read for it
    if ((err = Need(4 + n + kTagBytes))) return err == -1 ? EPIPE : err;
    uint8_t* data = in_.data() + start_ + 4;
    if (!aead_->Open(header, data, n, data + n)) return kBadRecord;
    start_ += 4 + n + kTagBytes;
    plain_ = data;
    plainLen_ = n;
    return 0;
  }

  int fd_;
  std::unique_ptr<Aead> aead_;
  std::vector<uint8_t> in_;  // sealed bytes read ahead, and opened records in place
  size_t start_ = 0, end_ = 0;
  uint8_t* plain_ = nullptr;  // the opened record being consumed
  size_t plainLen_ = 0, at_ = 0;
};

// Direction ids in the nonce: each key is used by one direction of one channel only.
constexpr uint32_t kUrgentDown = 1, kUrgentUp = 2, kBulkDown = 3;

}  // namespace uffdpc
