#include "tensorstream/io/io_backend.hpp"

#include <fcntl.h>
#include <liburing.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "io/mmap_backend.hpp"
#include "io/pread_backend.hpp"
#include "io/uring_backend.hpp"
#include "tensorstream/error.hpp"

namespace tensorstream {

// ---- IoBackend defaults ----------------------------------------------------------------------------------------

std::span<const std::byte> IoBackend::view(int /*fd*/, uint64_t /*offset*/, uint64_t /*length*/) { return {}; }

// posix_fadvise treats length 0 as "to the end of the file"; for us an empty range means nothing, so skip it.
// The result is ignored: a hint that fails changes nothing a caller relies on.
void IoBackend::will_need(int fd, uint64_t offset, uint64_t length) {
  if (length == 0) return;
  (void)::posix_fadvise(fd, static_cast<off_t>(offset), static_cast<off_t>(length), POSIX_FADV_WILLNEED);
}

void IoBackend::dont_need(int fd, uint64_t offset, uint64_t length) {
  if (length == 0) return;
  (void)::posix_fadvise(fd, static_cast<off_t>(offset), static_cast<off_t>(length), POSIX_FADV_DONTNEED);
}

// ---- io_uring probe -------------------------------------------------------------------------------------------

namespace {

std::string errno_phrase(int error) {
  const char* name = strerrorname_np(error);
  return std::string(name != nullptr ? name : "E?") + ": " + std::strerror(error);
}

struct ProbeResult {
  bool available = false;
  std::string reason;  // why not, when !available
};

ProbeResult probe_io_uring() {
  io_uring ring{};
  // Two entries: the smallest useful ring; creating it is the whole test (seccomp, io_uring_disabled, ENOSYS).
  const int rc = io_uring_queue_init(2, &ring, 0);
  if (rc < 0) {
    std::string reason = "io_uring_queue_init failed with " + errno_phrase(-rc);
    if (rc == -EPERM) reason += " (blocked by a seccomp filter, a container runtime or kernel.io_uring_disabled)";
    if (rc == -ENOSYS) reason += " (kernel built without io_uring)";
    if (rc == -ENOMEM) reason += " (RLIMIT_MEMLOCK too small for the ring on this kernel)";
    return {false, reason};
  }
  ProbeResult result{true, {}};
  // IORING_OP_READ arrived in Linux 5.6, after io_uring itself; older kernels (and ones without the probe
  // opcode, which is also 5.6) cannot run our reads.
  io_uring_probe* probe = io_uring_get_probe_ring(&ring);
  if (probe == nullptr) {
    result = {false, "kernel cannot report io_uring opcodes (older than Linux 5.6, no IORING_OP_READ)"};
  } else {
    if (!io_uring_opcode_supported(probe, IORING_OP_READ)) result = {false, "kernel lacks IORING_OP_READ"};
    io_uring_free_probe(probe);
  }
  io_uring_queue_exit(&ring);
  return result;
}

std::mutex& probe_mutex() {
  static std::mutex mutex;
  return mutex;
}
std::optional<ProbeResult>& cached_probe() {  // guarded by probe_mutex()
  static std::optional<ProbeResult> result;
  return result;
}
std::optional<std::string>& probe_override() {  // guarded by probe_mutex()
  static std::optional<std::string> reason;
  return reason;
}

void log_fallback_once(const std::string& why) {
  static std::atomic<bool> logged{false};
  if (logged.exchange(true)) return;
  std::fprintf(stderr, "tensorstream.io: io_uring unavailable (%s); using the pread pool\n", why.c_str());
}

}  // namespace

bool io_uring_available(std::string* reason) {
  const std::lock_guard lock(probe_mutex());
  if (probe_override()) {
    if (reason != nullptr) *reason = *probe_override();
    return false;
  }
  if (!cached_probe()) cached_probe() = probe_io_uring();
  if (reason != nullptr) *reason = cached_probe()->reason;
  return cached_probe()->available;
}

namespace detail {
void override_io_uring_probe_for_testing(std::optional<std::string> unavailable_reason) {
  const std::lock_guard lock(probe_mutex());
  probe_override() = std::move(unavailable_reason);
}
}  // namespace detail

// ---- factory --------------------------------------------------------------------------------------------------

std::unique_ptr<IoBackend> make_backend(const BackendOptions& options, std::string* reason) {
  if (reason != nullptr) reason->clear();
  const BackendTraits& traits = backend_traits(options.kind);
  switch (traits.reader) {
    case BackendKind::kPread:
      return detail::make_pread_backend(options.num_threads);
    case BackendKind::kMmap:
      return detail::make_mmap_backend();
    case BackendKind::kGpuDirect:
      throw ConfigError("backend", "'" + std::string(traits.name) +
                                       "' reads with cuFile, which this build cannot do yet; use 'cuda' or 'auto'");
    case BackendKind::kAuto:
    case BackendKind::kIoUring:
    case BackendKind::kCuda:  // never a reader (the table says so); treated as kAuto
      break;
  }
  std::string why;
  if (io_uring_available(&why)) {
    try {
      return detail::make_uring_backend(options.queue_depth);
    } catch (const IoError& error) {
      // The tiny probe ring worked but this one did not (RLIMIT_MEMLOCK on old kernels, ENOMEM): still usable.
      why = error.what();
    }
  }
  // Validate the pool before logging, so that a ConfigError does not leave a misleading log line behind.
  auto backend = detail::make_pread_backend(options.num_threads);
  log_fallback_once(why);
  if (reason != nullptr) *reason = "io_uring unavailable (" + why + "); using the pread pool";
  return backend;
}

// ---- blocking reads -------------------------------------------------------------------------------------------

void read_all_blocking(IoBackend& backend, std::span<const ReadRequest> requests, const std::string& path) {
  if (requests.empty()) return;
  // user_data becomes the request's index, so each completion finds its request (the caller's user_data
  // need not be unique).
  std::vector<ReadRequest> indexed(requests.begin(), requests.end());
  for (size_t i = 0; i < indexed.size(); ++i) indexed[i].user_data = i;
  backend.submit(indexed);

  // Reap everything, failures included, before throwing: the backend may still be writing into the caller's
  // buffers until the last completion arrives.
  std::vector<int64_t> results(indexed.size(), 0);
  std::vector<Completion> batch(std::min<size_t>(indexed.size(), 256));
  size_t remaining = indexed.size();
  while (remaining > 0) {
    const size_t n = backend.reap(batch, /*wait=*/true);
    if (n == 0) {
      throw IoError(path, EIO, "read (the backend reported " + std::to_string(remaining) +
                                   " reads neither finished nor in flight)");
    }
    for (size_t i = 0; i < n; ++i) {
      const uint64_t index = batch[i].user_data;
      if (index >= results.size()) continue;  // not ours: the backend is shared, against the contract
      results[index] = batch[i].result;
      --remaining;
    }
  }
  // "First" in request order, not completion order, so the error is the same on every run.
  for (size_t i = 0; i < indexed.size(); ++i) {
    const int64_t result = results[i];
    if (result >= 0) continue;
    std::string operation = "read at offset " + std::to_string(indexed[i].offset);
    if (result == -ENODATA) operation += " (unexpected end of file)";
    throw IoError(path, static_cast<int>(-result), operation);
  }
}

}  // namespace tensorstream
