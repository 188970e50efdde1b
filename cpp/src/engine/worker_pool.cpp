#include "engine/worker_pool.hpp"

namespace tensorstream::detail {

WorkerPool::WorkerPool(uint32_t threads, const std::function<void(uint32_t)>& on_start) {
  threads_.reserve(threads);
  try {
    for (uint32_t i = 0; i < threads; ++i) {
      threads_.emplace_back([this, i, on_start] {
        if (on_start) on_start(i);
        work_loop();
      });
    }
  } catch (...) {
    shutdown();
    throw;
  }
}

void WorkerPool::post(std::function<void()> job) {
  {
    const std::lock_guard lock(mutex_);
    jobs_.push_back(std::move(job));
  }
  cv_.notify_one();
}

void WorkerPool::shutdown() noexcept {
  {
    const std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (std::thread& thread : threads_) {
    if (thread.joinable()) thread.join();
  }
}

void WorkerPool::work_loop() {
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock lock(mutex_);
      cv_.wait(lock, [&] { return !jobs_.empty() || stopping_; });
      if (jobs_.empty()) return;  // stopping, and nothing left to run
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    job();
  }
}

}  // namespace tensorstream::detail
