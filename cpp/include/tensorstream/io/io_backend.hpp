// IoBackend: one asynchronous read interface over several kernel mechanisms (pread thread pool, io_uring,
// mmap). Requests and completions are plain structs; a completion's result is the number of bytes read or a
// negative errno, as io_uring reports them. Backends resume short reads and retry EINTR themselves, so a
// completion is either the full length or an error: end of file before the full length is -ENODATA.
//
// Thread-safety: submit() may be called from any thread; reap() from one thread at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "tensorstream/config.hpp"

namespace tensorstream {

struct ReadRequest {
  int fd = -1;
  uint64_t offset = 0;
  std::span<std::byte> buffer;  // for O_DIRECT fds: address, offset and length 4 KiB aligned
  uint64_t user_data = 0;       // returned unchanged in the completion
};

struct Completion {
  uint64_t user_data = 0;
  int64_t result = 0;  // bytes read (== buffer size) or -errno
};

struct BackendCaps {
  std::string name;          // "pread", "io_uring", "mmap", "fault" ...
  bool zero_copy_views = false;  // view() returns the file's bytes without copying
  uint32_t max_in_flight = 0;
};

class IoBackend {
 public:
  virtual ~IoBackend() = default;
  // Queues reads; never blocks on I/O. Throws only for misuse (ConfigError) or resource exhaustion.
  virtual void submit(std::span<const ReadRequest> requests) = 0;
  // Moves up to out.size() completions into `out`; with wait=true blocks until at least one is available or
  // nothing is in flight. Returns the number written.
  virtual size_t reap(std::span<Completion> out, bool wait) = 0;
  // Reads submitted but not yet reaped.
  [[nodiscard]] virtual size_t in_flight() const = 0;
  [[nodiscard]] virtual BackendCaps caps() const = 0;

  // Zero-copy access (mmap backend): the file's bytes [offset, offset+length), valid until unview or
  // destruction. Others return an empty span.
  [[nodiscard]] virtual std::span<const std::byte> view(int fd, uint64_t offset, uint64_t length);
  // Hints that a range will be needed soon / is no longer needed (madvise / posix_fadvise).
  virtual void will_need(int fd, uint64_t offset, uint64_t length);
  virtual void dont_need(int fd, uint64_t offset, uint64_t length);
};

struct BackendOptions {
  BackendKind kind = BackendKind::kAuto;
  uint32_t num_threads = 4;  // pread pool size
  uint32_t queue_depth = 32; // io_uring ring entries
};

// Creates the reader of the requested backend (backend_traits(kind).reader: kCuda reads as kAuto). For kAuto (and
// for kIoUring when the kernel refuses io_uring) it falls back to the pread pool and writes why into *reason (when
// given); a fallback is logged once per process. kGpuDirect (cuFile) is a ConfigError until cuFile reads land.
[[nodiscard]] std::unique_ptr<IoBackend> make_backend(const BackendOptions& options, std::string* reason = nullptr);
// True when this kernel and process may use io_uring (probed once, cached).
[[nodiscard]] bool io_uring_available(std::string* reason = nullptr);

// Blocking convenience over any backend: reads every request and throws IoError for the first failure.
void read_all_blocking(IoBackend& backend, std::span<const ReadRequest> requests, const std::string& path);

}  // namespace tensorstream
