// Private: the pread(2) thread-pool backend. Always available (no kernel feature needed), so it is what every
// other backend falls back to, and the base of the test FaultBackend (which swaps in a faulty read syscall).
//
// Thread-safety: submit() from any thread; reap() from one thread at a time; in_flight()/caps() from any thread.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

#include "tensorstream/io/io_backend.hpp"

namespace tensorstream::detail {

// Behaves like pread(2): returns bytes read, 0 at end of file, or -1 with errno set. Called on worker threads,
// concurrently, so it must be thread-safe.
using ReadSyscall = std::function<ssize_t(int fd, void* buf, size_t count, off_t offset)>;

// A pool of `num_threads` workers (1..1024, else ConfigError) reading requests in submission order; each
// request is read fully (EINTR retried, short reads resumed, end of file first => -ENODATA). An empty
// `syscall` means ::pread.
//
// Destruction cancels the requests no worker has started yet (their -ECANCELED completions are dropped with
// the backend) and waits for the reads already running, so no worker touches a caller's buffer once the
// destructor returns.
[[nodiscard]] std::unique_ptr<IoBackend> make_pread_backend(uint32_t num_threads, ReadSyscall syscall = {});

}  // namespace tensorstream::detail
