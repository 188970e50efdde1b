// Private: the io_uring backend (liburing). One ring per backend, driven by one thread the backend owns: only
// that thread touches the ring. submit() queues requests and wakes it (an eventfd the ring thread keeps a read
// armed on), reap() takes finished completions from a queue. Why not submit on the caller's thread: the kernel
// finishes a buffered read that missed the page cache on behalf of the task that submitted it, so a caller
// thread that exits first turns its reads into -EFAULT (observed on Linux 6.18), and a live one is interrupted
// to copy the data. Requests beyond the ring's depth wait in an overflow list, so submit() never blocks on I/O
// and the completion queue never overflows.
//
// Thread-safety: submit() from any thread; reap() from one thread at a time; in_flight()/caps() from any thread.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "tensorstream/io/io_backend.hpp"

namespace tensorstream::detail {

// A ring of `queue_depth` reads in flight (1..16384, else ConfigError). Throws IoError("io_uring", errno, ...) when
// io_uring_queue_init fails (ENOSYS, EPERM under seccomp, ENOMEM from RLIMIT_MEMLOCK on old kernels).
// Works for buffered and O_DIRECT descriptors alike; for O_DIRECT the caller supplies 4 KiB aligned buffers,
// offsets and lengths (the kernel answers -EINVAL otherwise).
//
// Destruction drops the requests the kernel has not been given yet (their -ECANCELED completions go with the
// backend) and waits for every read it has, so no buffer is written after the destructor returns.
[[nodiscard]] std::unique_ptr<IoBackend> make_uring_backend(uint32_t queue_depth);

// Test hook: makes io_uring_available() answer as if the probe had returned `unavailable_reason`
// (std::nullopt restores the real probe). Lets tests exercise the fallback on machines that have io_uring.
void override_io_uring_probe_for_testing(std::optional<std::string> unavailable_reason);

}  // namespace tensorstream::detail
