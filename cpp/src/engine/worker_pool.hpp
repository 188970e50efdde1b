// Private: the engine's verify / decode workers. A FIFO of jobs run by a fixed set of threads.
//
// Jobs must not throw (they record errors in their load); shutdown() runs every job already posted, including
// jobs those jobs post, before it joins, so no load is left half finished.
//
// Thread-safety: post() from any thread, also from a job; shutdown() from one thread, not from a job.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace tensorstream::detail {

class WorkerPool {
 public:
  // `on_start(i)` runs first on worker i (to name the thread's trace lane, for instance).
  WorkerPool(uint32_t threads, const std::function<void(uint32_t)>& on_start);
  ~WorkerPool() { shutdown(); }
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  void post(std::function<void()> job);
  // Runs what is queued, then joins the threads. Idempotent.
  void shutdown() noexcept;

 private:
  void work_loop();

  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;  // last: started once everything above exists
};

}  // namespace tensorstream::detail
