// CompletionQueue: the half of an IoBackend that every backend shares. It counts reads submitted and not yet
// reaped, holds the completions that arrived, and implements reap()'s contract once: move out what is there,
// and with wait=true block until a completion arrives or nothing is in flight any more.
//
// A backend calls add_submitted(n) before any of those n reads can complete (so a waiting reaper never sees zero
// in flight while one is still running), push() as reads finish, and forwards reap() / in_flight() here.
//
// Thread-safety: add_submitted(), push() and in_flight() from any thread; reap() from one thread at a time.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <mutex>
#include <span>

#include "tensorstream/io/io_backend.hpp"

namespace tensorstream {

class CompletionQueue {
 public:
  // Thread-safe. Counts `count` more reads in flight.
  void add_submitted(size_t count) noexcept;
  // Thread-safe. Queues finished reads (each counted by an earlier add_submitted) and wakes the reaper.
  void push(const Completion& completion);
  void push(std::span<const Completion> completions);
  // One thread at a time. Moves up to out.size() completions into `out`; see IoBackend::reap.
  size_t reap(std::span<Completion> out, bool wait);
  // Thread-safe. Reads submitted and not yet reaped.
  [[nodiscard]] size_t in_flight() const noexcept { return in_flight_.load(std::memory_order_relaxed); }

 private:
  std::mutex mutex_;
  std::condition_variable arrived_;
  std::deque<Completion> done_;
  std::atomic<size_t> in_flight_{0};
};

}  // namespace tensorstream
