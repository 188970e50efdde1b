#include "io/pread_backend.hpp"

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "tensorstream/error.hpp"
#include "tensorstream/io/completion_queue.hpp"

namespace tensorstream::detail {
namespace {

// More workers than this only adds context switches: storage queues saturate far earlier.
constexpr uint32_t kMaxPreadThreads = 1024;

// Reads the whole request; returns bytes read (== buffer size) or -errno. Runs on a worker thread, so it never
// throws: everything becomes a negative errno.
int64_t read_fully(const ReadSyscall& syscall, const ReadRequest& request) noexcept {
  std::byte* const data = request.buffer.data();
  const size_t size = request.buffer.size();
  size_t done = 0;
  while (done < size) {
    errno = 0;
    ssize_t n = -1;
    const off_t offset = static_cast<off_t>(request.offset + done);
    if (syscall) {
      try {
        n = syscall(request.fd, data + done, size - done, offset);
      } catch (...) {
        // A test syscall that throws must not kill the worker thread; report it as an I/O error.
        return -EIO;
      }
    } else {
      n = ::pread(request.fd, data + done, size - done, offset);
    }
    if (n < 0) {
      const int error = errno;
      if (error == EINTR) continue;  // a signal interrupted the read; nothing was transferred
      return error > 0 ? -static_cast<int64_t>(error) : -EIO;
    }
    if (n == 0) return -ENODATA;  // end of file before the full length
    if (static_cast<size_t>(n) > size - done) return -EIO;  // a read syscall that claims more than asked
    done += static_cast<size_t>(n);  // short read: resume with the rest
  }
  return static_cast<int64_t>(done);
}

// Thread-safety: see pread_backend.hpp. mutex_ guards pending_ and stop_; completions_ has its own lock.
class PreadBackend final : public IoBackend {
 public:
  PreadBackend(uint32_t num_threads, ReadSyscall syscall) : syscall_(std::move(syscall)) {
    workers_.reserve(num_threads);
    try {
      for (uint32_t i = 0; i < num_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
    } catch (...) {
      shutdown();
      throw;
    }
  }

  ~PreadBackend() override { shutdown(); }

  PreadBackend(const PreadBackend&) = delete;
  PreadBackend& operator=(const PreadBackend&) = delete;

  void submit(std::span<const ReadRequest> requests) override {
    if (requests.empty()) return;
    completions_.add_submitted(requests.size());  // before any worker can finish one
    {
      const std::lock_guard lock(mutex_);
      pending_.insert(pending_.end(), requests.begin(), requests.end());
    }
    if (requests.size() == 1) {
      work_cv_.notify_one();
    } else {
      work_cv_.notify_all();
    }
  }

  size_t reap(std::span<Completion> out, bool wait) override { return completions_.reap(out, wait); }

  [[nodiscard]] size_t in_flight() const override { return completions_.in_flight(); }

  [[nodiscard]] BackendCaps caps() const override {
    return BackendCaps{"pread", false, static_cast<uint32_t>(workers_.size())};
  }

 private:
  void worker_loop() {
    std::unique_lock lock(mutex_);
    for (;;) {
      work_cv_.wait(lock, [&] { return stop_ || !pending_.empty(); });
      if (stop_) return;  // queued requests are cancelled by shutdown()
      const ReadRequest request = pending_.front();
      pending_.pop_front();
      lock.unlock();
      completions_.push(Completion{request.user_data, read_fully(syscall_, request)});
      lock.lock();
    }
  }

  void shutdown() noexcept {
    std::vector<Completion> cancelled;
    {
      const std::lock_guard lock(mutex_);
      stop_ = true;
      // Not started: cancel. Nobody can reap after destruction, but the completions keep in_flight() honest
      // should a reaper still be waiting while shutdown runs from the constructor's failure path.
      for (const ReadRequest& request : pending_) cancelled.push_back(Completion{request.user_data, -ECANCELED});
      pending_.clear();
    }
    work_cv_.notify_all();
    try {
      completions_.push(cancelled);
    } catch (...) {
      // Out of memory while shutting down: the cancelled completions are dropped with the backend.
    }
    for (std::thread& worker : workers_) {
      if (worker.joinable()) worker.join();  // waits for a read in progress: its buffer is in use until then
    }
  }

  const ReadSyscall syscall_;
  std::mutex mutex_;
  std::condition_variable work_cv_;  // workers: a request was queued, or stop_
  std::deque<ReadRequest> pending_;
  CompletionQueue completions_;
  bool stop_ = false;
  std::vector<std::thread> workers_;  // last: started after every other member exists
};

}  // namespace

std::unique_ptr<IoBackend> make_pread_backend(uint32_t num_threads, ReadSyscall syscall) {
  if (num_threads == 0 || num_threads > kMaxPreadThreads) {
    throw ConfigError("num_io_threads", "pread pool size " + std::to_string(num_threads) + " is outside 1.." +
                                            std::to_string(kMaxPreadThreads));
  }
  return std::make_unique<PreadBackend>(num_threads, std::move(syscall));
}

}  // namespace tensorstream::detail
