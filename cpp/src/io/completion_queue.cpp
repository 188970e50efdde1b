#include "tensorstream/io/completion_queue.hpp"

#include <algorithm>

namespace tensorstream {

void CompletionQueue::add_submitted(size_t count) noexcept {
  // Under the mutex, so that a reaper evaluating its wait predicate sees either the old or the new count with
  // the queue it belongs to, never a torn view.
  const std::lock_guard lock(mutex_);
  in_flight_.fetch_add(count, std::memory_order_relaxed);
}

void CompletionQueue::push(const Completion& completion) { push(std::span<const Completion>(&completion, 1)); }

void CompletionQueue::push(std::span<const Completion> completions) {
  if (completions.empty()) return;
  {
    const std::lock_guard lock(mutex_);
    done_.insert(done_.end(), completions.begin(), completions.end());
  }
  arrived_.notify_one();  // one reaper at a time, by contract
}

size_t CompletionQueue::reap(std::span<Completion> out, bool wait) {
  if (out.empty()) return 0;
  std::unique_lock lock(mutex_);
  if (wait) {
    // in_flight_ counts reads not yet reaped: when it is zero there is nothing left to wait for.
    arrived_.wait(lock, [&] { return !done_.empty() || in_flight_.load(std::memory_order_relaxed) == 0; });
  }
  const size_t n = std::min(out.size(), done_.size());
  std::copy_n(done_.begin(), n, out.begin());
  done_.erase(done_.begin(), done_.begin() + static_cast<std::ptrdiff_t>(n));
  in_flight_.fetch_sub(n, std::memory_order_relaxed);
  return n;
}

}  // namespace tensorstream
