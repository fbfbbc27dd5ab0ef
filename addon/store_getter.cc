#include "store_getter.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>

namespace uffdpc {

namespace {

// A chunk object's header (lib/store/chunk.ts): format, codec (| kSealed), 2
// bytes unused, the content's length (u32 LE); then the body.
constexpr uint8_t kChunkFormat = 1;
constexpr uint8_t kCodecRaw = 0, kCodecZstd = 2, kSealed = 0x80;
constexpr size_t kChunkHeaderBytes = 8;
constexpr size_t kMaxHeaderBytes = 16 << 10;

std::string Hex(const uint8_t* bytes, size_t n) {
  static const char kHex[] = "0123456789abcdef";
  std::string out(2 * n, '0');
  for (size_t i = 0; i < n; i++) {
    out[2 * i] = kHex[bytes[i] >> 4];
    out[2 * i + 1] = kHex[bytes[i] & 15];
  }
  return out;
}

void Sha256(const void* data, size_t n, uint8_t out[32]) {
  unsigned int len = 32;
  EVP_Digest(data, n, out, &len, EVP_sha256(), nullptr);
}

void Hmac(const uint8_t* key, size_t keyLength, const std::string& data, uint8_t out[32]) {
  unsigned int len = 32;
  HMAC(EVP_sha256(), key, static_cast<int>(keyLength), reinterpret_cast<const uint8_t*>(data.data()), data.size(), out, &len);
}

// A header's value in [begin, end) (names compared without case), or empty.
std::string HeaderValue(const char* begin, const char* end, const char* name) {
  size_t nameLength = std::strlen(name);
  for (const char* line = begin; line < end;) {
    const char* eol = static_cast<const char*>(memchr(line, '\n', static_cast<size_t>(end - line)));
    if (!eol) eol = end;
    if (static_cast<size_t>(eol - line) > nameLength && strncasecmp(line, name, nameLength) == 0 && line[nameLength] == ':') {
      const char* v = line + nameLength + 1;
      while (v < eol && (*v == ' ' || *v == '\t')) v++;
      const char* e = eol;
      while (e > v && (e[-1] == '\r' || e[-1] == ' ')) e--;
      return std::string(v, e);
    }
    line = eol + 1;
  }
  return {};
}

}  // namespace

bool ChunkGetter::Wait(short events, const std::function<bool()>& leaving, std::string* why) {
  for (uint32_t waited = 0;; waited += kSliceMs) {
    if (leaving()) {
      *why = "the engine is stopping";
      return false;
    }
    struct pollfd p = {fd_, events, 0};
    int n = poll(&p, 1, kSliceMs);
    if (n > 0) return true;
    if (n < 0 && errno != EINTR) {
      *why = std::string("poll: ") + std::strerror(errno);
      return false;
    }
    if (waited >= gets_.timeoutMs) {
      *why = "no answer for " + std::to_string(gets_.timeoutMs) + " ms";
      return false;
    }
  }
}

bool ChunkGetter::Connect(const std::function<bool()>& leaving, std::string* why) {
  fd_ = socket(gets_.ipv6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd_ < 0) {
    *why = std::string("socket: ") + std::strerror(errno);
    return false;
  }
  int one = 1;
  setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  sockaddr_storage sa = {};
  socklen_t saLength;
  bool parsed;
  if (gets_.ipv6) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&sa);
    a->sin6_family = AF_INET6;
    a->sin6_port = htons(gets_.port);
    parsed = inet_pton(AF_INET6, gets_.address.c_str(), &a->sin6_addr) == 1;
    saLength = sizeof *a;
  } else {
    auto* a = reinterpret_cast<sockaddr_in*>(&sa);
    a->sin_family = AF_INET;
    a->sin_port = htons(gets_.port);
    parsed = inet_pton(AF_INET, gets_.address.c_str(), &a->sin_addr) == 1;
    saLength = sizeof *a;
  }
  if (!parsed) {
    // Never the all-zeros address (which Linux connects to this host): an address it cannot read is a failure.
    *why = "not a numeric address: " + gets_.address;
    Disconnect();
    return false;
  }
  if (connect(fd_, reinterpret_cast<sockaddr*>(&sa), saLength) != 0) {
    if (errno != EINPROGRESS) {
      *why = std::string("connect: ") + std::strerror(errno);
      Disconnect();
      return false;
    }
    if (!Wait(POLLOUT, leaving, why)) {
      Disconnect();
      return false;
    }
    int err = 0;
    socklen_t errLength = sizeof err;
    getsockopt(fd_, SOL_SOCKET, SO_ERROR, &err, &errLength);
    if (err) {
      *why = std::string("connect: ") + std::strerror(err);
      Disconnect();
      return false;
    }
  }
  reused_ = false;
  inStart_ = 0;
  in_.clear();
  return true;
}

void ChunkGetter::Disconnect() {
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
}

std::string ChunkGetter::Request(int64_t pack, uint64_t offset, uint64_t length) {
  time_t now = time(nullptr);
  struct tm t;
  gmtime_r(&now, &t);
  char amzDate[17];
  strftime(amzDate, sizeof amzDate, "%Y%m%dT%H%M%SZ", &t);
  std::string day(amzDate, 8);
  const std::string& path = gets_.packs[static_cast<size_t>(pack)];
  std::string signedNames = gets_.token.empty() ? "host;x-amz-content-sha256;x-amz-date" : "host;x-amz-content-sha256;x-amz-date;x-amz-security-token";
  std::string headers = "host:" + gets_.host + "\nx-amz-content-sha256:UNSIGNED-PAYLOAD\nx-amz-date:" + amzDate + "\n";
  if (!gets_.token.empty()) headers += "x-amz-security-token:" + gets_.token + "\n";
  std::string canonical = "GET\n" + path + "\n\n" + headers + "\n" + signedNames + "\nUNSIGNED-PAYLOAD";
  std::string scope = day + "/" + gets_.region + "/s3/aws4_request";
  uint8_t digest[32];
  Sha256(canonical.data(), canonical.size(), digest);
  std::string toSign = std::string("AWS4-HMAC-SHA256\n") + amzDate + "\n" + scope + "\n" + Hex(digest, 32);
  if (keyDay_ != day) {
    // The day's signing key depends only on the secret, the day and the region.
    std::string secret = "AWS4" + gets_.secret;
    uint8_t k[32];
    Hmac(reinterpret_cast<const uint8_t*>(secret.data()), secret.size(), day, k);
    Hmac(k, 32, gets_.region, k);
    Hmac(k, 32, "s3", k);
    Hmac(k, 32, "aws4_request", key_);
    keyDay_ = day;
  }
  uint8_t signature[32];
  Hmac(key_, 32, toSign, signature);
  std::string request = "GET " + path + " HTTP/1.1\r\nhost: " + gets_.host + "\r\nx-amz-content-sha256: UNSIGNED-PAYLOAD\r\nx-amz-date: " + amzDate + "\r\n";
  if (!gets_.token.empty()) request += "x-amz-security-token: " + gets_.token + "\r\n";
  request += "range: bytes=" + std::to_string(offset) + "-" + std::to_string(offset + length - 1) + "\r\n";
  request += "authorization: AWS4-HMAC-SHA256 Credential=" + gets_.keyId + "/" + scope + ", SignedHeaders=" + signedNames +
             ", Signature=" + Hex(signature, 32) + "\r\n\r\n";
  return request;
}

bool ChunkGetter::Exchange(const std::string& request, std::vector<uint8_t>& body, int* status, const std::function<bool()>& leaving, std::string* why,
                           bool* retry) {
  *retry = false;
  in_.erase(in_.begin(), in_.begin() + static_cast<std::ptrdiff_t>(inStart_));
  inStart_ = 0;
  for (size_t sent = 0; sent < request.size();) {
    ssize_t n = send(fd_, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
      if (!Wait(POLLOUT, leaving, why)) return false;
      continue;
    }
    *retry = reused_ && sent == 0;
    *why = std::string("send: ") + std::strerror(errno);
    return false;
  }
  gets_sent_++;
  // The answer's head, then its body (Content-Length bytes).
  size_t headEnd = 0;
  bool any = inStart_ < in_.size();
  auto receive = [&]() -> bool {
    if (in_.size() - inStart_ == 0) in_.clear(), inStart_ = 0;
    size_t at = in_.size();
    in_.resize(at + 64 * 1024);
    for (;;) {
      ssize_t n = recv(fd_, in_.data() + at, 64 * 1024, 0);
      if (n > 0) {
        in_.resize(at + static_cast<size_t>(n));
        any = true;
        return true;
      }
      in_.resize(at);
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
        if (!Wait(POLLIN, leaving, why)) return false;
        in_.resize(at + 64 * 1024);
        continue;
      }
      *retry = reused_ && !any;
      *why = n == 0 ? "the store closed the connection" : std::string("recv: ") + std::strerror(errno);
      return false;
    }
  };
  for (;;) {
    const char* begin = reinterpret_cast<const char*>(in_.data() + inStart_);
    size_t have = in_.size() - inStart_;
    const char* end = static_cast<const char*>(memmem(begin, have, "\r\n\r\n", 4));
    if (end) {
      headEnd = static_cast<size_t>(end - begin) + 4;
      break;
    }
    if (have > kMaxHeaderBytes) {
      *why = "an answer's head longer than 16 KiB";
      return false;
    }
    if (!receive()) return false;
  }
  const char* head = reinterpret_cast<const char*>(in_.data() + inStart_);
  if (headEnd < 12 || std::strncmp(head, "HTTP/1.", 7) != 0) {
    *why = "not an HTTP/1.1 answer";
    return false;
  }
  *status = std::atoi(head + 9);
  std::string lengthText = HeaderValue(head, head + headEnd, "content-length");
  if (lengthText.empty() || !HeaderValue(head, head + headEnd, "transfer-encoding").empty()) {
    *why = "an answer without a Content-Length";
    return false;
  }
  bool closes = strncasecmp(HeaderValue(head, head + headEnd, "connection").c_str(), "close", 5) == 0;
  uint64_t length = std::strtoull(lengthText.c_str(), nullptr, 10);
  if (length > (64u << 20)) {
    *why = "an answer longer than 64 MiB";
    return false;
  }
  inStart_ += headEnd;
  while (in_.size() - inStart_ < length)
    if (!receive()) return false;
  body.assign(in_.begin() + static_cast<std::ptrdiff_t>(inStart_), in_.begin() + static_cast<std::ptrdiff_t>(inStart_ + length));
  inStart_ += length;
  bytes_ += length;
  reused_ = true;
  if (closes) Disconnect();
  return true;
}

bool ChunkGetter::GetRange(int64_t pack, uint64_t offset, uint64_t length, std::vector<uint8_t>& object, const std::function<bool()>& leaving,
                           std::string* why) {
  if (pack < 0 || static_cast<size_t>(pack) >= gets_.packs.size() || length == 0) {
    *why = "no place in a pack";
    return false;
  }
  std::string request = Request(pack, offset, length);
  int status = 0;
  for (int attempt = 0;; attempt++) {
    if (fd_ < 0 && !Connect(leaving, why)) return false;
    bool retry = false;
    if (Exchange(request, object, &status, leaving, why, &retry)) break;
    Disconnect();
    if (!retry || attempt > 0) return false;  // a keep-alive the store had let go: once more on a new connection
  }
  if (status != 200 && status != 206) {
    *why = "the store answered " + std::to_string(status);
    return false;
  }
  if (object.size() != length) {
    *why = "the store answered " + std::to_string(object.size()) + " bytes, not " + std::to_string(length);
    return false;
  }
  why->clear();  // a retry that succeeded leaves no reason behind
  return true;
}

bool ChunkGetter::Decode(const uint8_t* o, size_t n, const uint8_t name[32], uint64_t length, std::vector<uint8_t>& out, std::string* why) {
  if (n < kChunkHeaderBytes) {
    *why = "not a chunk's object (shorter than its header)";
    return false;
  }
  uint32_t plainLength;
  std::memcpy(&plainLength, o + 4, 4);  // little-endian, as this machine
  if (o[0] != kChunkFormat || plainLength != length) {
    *why = "not the chunk's object (header)";
    return false;
  }
  if (out.size() < length) out.resize(length);
  const uint8_t* body = o + kChunkHeaderBytes;
  size_t bodyLength = n - kChunkHeaderBytes;
  if (o[1] == kCodecRaw) {
    if (bodyLength != length) {
      *why = "a raw chunk of the wrong length";
      return false;
    }
    std::memcpy(out.data(), body, length);
  } else if (o[1] == kCodecZstd && PackingAvailable()) {
    if (!unpacker_.Unpack(body, bodyLength, out.data(), length)) {
      *why = "the chunk does not decompress";
      return false;
    }
  } else {
    *why = (o[1] & kSealed) ? "a sealed chunk" : "a codec JavaScript reads";
    return false;
  }
  uint8_t digest[32];
  Sha256(out.data(), length, digest);
  if (std::memcmp(digest, name, 32) != 0) {
    *why = "its content does not hash to its name";
    return false;
  }
  return true;
}

}  // namespace uffdpc
