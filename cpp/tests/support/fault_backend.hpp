// Test support: a FaultBackend, the pread pool with a read syscall that misbehaves on purpose (short reads,
// EINTR, EIO at a chosen file offset, random delays) and completions handed back in shuffled order, so that
// tests prove callers and the pool cope with what real storage does. Also a Watchdog that turns a hang into a
// loud failure, since a lost completion shows up as a reap() that never returns.
//
// Thread-safety: FaultBackend as IoBackend (submit from any thread, reap from one); counters are atomics.
// Watchdog: owned by one thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include "tensorstream/io/io_backend.hpp"

namespace tensorstream::testing {

struct FaultPlan {
  double short_read_probability = 0;  // per syscall: read a random shorter length (at least 1 byte)
  double eintr_probability = 0;       // per syscall: fail with EINTR before reading anything
  std::optional<uint64_t> eio_offset; // any read whose range covers this file offset fails with EIO
  uint32_t max_delay_us = 0;          // per syscall: sleep a random 0..max_delay_us first
  bool reorder = false;               // shuffle each batch of completions inside reap()
  uint64_t seed = 1;
};

// How many faults were actually injected (a test that passes without faults proves nothing).
struct FaultCounters {
  std::atomic<uint64_t> short_reads{0};
  std::atomic<uint64_t> eintrs{0};
  std::atomic<uint64_t> eios{0};
};

class FaultBackend : public IoBackend {
 public:
  [[nodiscard]] virtual const FaultCounters& counters() const noexcept = 0;
};

// Converts to std::unique_ptr<IoBackend> wherever one is expected.
[[nodiscard]] std::unique_ptr<FaultBackend> make_fault_backend(FaultPlan plan, uint32_t num_threads = 4);

// The counters of a backend made by make_fault_backend; throws std::invalid_argument for any other backend.
[[nodiscard]] const FaultCounters& fault_counters(const IoBackend& backend);

// Aborts the process (with a message naming `what`) unless destroyed within `limit`: a hung test then fails
// quickly instead of stalling the whole suite until ctest's timeout.
class Watchdog {
 public:
  explicit Watchdog(const char* what, std::chrono::milliseconds limit = std::chrono::seconds(10));
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

}  // namespace tensorstream::testing
