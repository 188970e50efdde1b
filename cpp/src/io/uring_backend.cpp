#include "io/uring_backend.hpp"

#include <liburing.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
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

// The ring holds queue_depth reads plus the wake-up read, and the kernel refuses rings over 32768 entries.
constexpr uint32_t kMaxQueueDepth = 16384;
// One SQE carries at most this many bytes: the length field is 32 bits and Linux caps a single read near
// 2 GiB anyway. A multiple of 4 KiB, so the remainder of an O_DIRECT read stays aligned.
constexpr uint64_t kMaxSqeBytes = uint64_t{1} << 30;
// user_data of the eventfd read that wakes the ring thread; read slots use their index (< kMaxQueueDepth).
constexpr uint64_t kWakeTag = UINT64_MAX;
// When io_uring_submit itself failed (EAGAIN/EBUSY under memory pressure) our entries sit in the SQ ring and
// nothing may complete to wake us: retry at this interval.
constexpr long kSubmitRetryNs = 1'000'000;

// Per-request progress. A request owns a slot from the moment it gets an SQE until its final completion, so the
// kernel never holds more than `depth` of our reads and the CQ ring (twice the SQ ring) cannot overflow.
struct Slot {
  ReadRequest request;
  uint64_t done = 0;  // bytes already read (short reads resume from here)
};

// Thread-safety: see uring_backend.hpp. mutex_ guards the hand-over of requests (incoming_, stop_); completions_
// has its own lock; the ring, slots and everything marked "ring thread" are touched only by the ring thread (and
// by the constructor and destructor while it does not run).
class UringBackend final : public IoBackend {
 public:
  explicit UringBackend(uint32_t depth) : depth_(depth) {
    wake_fd_ = ::eventfd(0, EFD_CLOEXEC);  // blocking: io_uring answers -EAGAIN for O_NONBLOCK files
    if (wake_fd_ < 0) throw_errno("io_uring", "eventfd");
    const int rc = io_uring_queue_init(depth + 1, &ring_, 0);
    if (rc < 0) {
      ::close(wake_fd_);
      throw IoError("io_uring", -rc, "io_uring_queue_init(" + std::to_string(depth + 1) + ")");
    }
    slots_.resize(depth);
    free_slots_.reserve(depth);
    for (uint32_t i = depth; i > 0; --i) free_slots_.push_back(i - 1);
    try {
      thread_ = std::thread([this] { ring_loop(); });
    } catch (...) {
      io_uring_queue_exit(&ring_);
      ::close(wake_fd_);
      throw;
    }
  }

  ~UringBackend() override {
    {
      const std::lock_guard lock(mutex_);
      stop_ = true;
    }
    wake();
    thread_.join();  // returns once the kernel holds none of our reads
    io_uring_queue_exit(&ring_);
    ::close(wake_fd_);
  }

  UringBackend(const UringBackend&) = delete;
  UringBackend& operator=(const UringBackend&) = delete;

  void submit(std::span<const ReadRequest> requests) override {
    if (requests.empty()) return;
    completions_.add_submitted(requests.size());  // before the ring thread can finish one
    std::vector<Completion> empty_reads;
    {
      const std::lock_guard lock(mutex_);
      for (const ReadRequest& request : requests) {
        if (request.buffer.empty()) {
          empty_reads.push_back(Completion{request.user_data, 0});  // nothing to read
        } else {
          incoming_.push_back(request);
        }
      }
    }
    completions_.push(empty_reads);
    // One eventfd write per batch of submits: a wake-up already pending covers this request too, because the
    // ring thread clears the flag before it takes incoming_.
    if (!wake_pending_.exchange(true)) wake();
  }

  size_t reap(std::span<Completion> out, bool wait) override { return completions_.reap(out, wait); }

  [[nodiscard]] size_t in_flight() const override { return completions_.in_flight(); }

  [[nodiscard]] BackendCaps caps() const override { return BackendCaps{"io_uring", false, depth_}; }

 private:
  void wake() noexcept {
    const uint64_t one = 1;
    ssize_t n;
    do {
      n = ::write(wake_fd_, &one, sizeof(one));
    } while (n < 0 && errno == EINTR);
    // Any other failure would mean the counter is at its maximum: a wake-up is pending anyway.
  }

  // The ring thread. Never throws (a std::bad_alloc here would terminate the process, as on any thread).
  void ring_loop() noexcept {
    bool stopping = false;
    for (;;) {
      bool stop_now = false;
      {
        const std::lock_guard lock(mutex_);
        overflow_.insert(overflow_.end(), incoming_.begin(), incoming_.end());
        incoming_.clear();
        stop_now = stop_;
      }
      if (stop_now && !stopping) {
        stopping = true;
        // Never given to the kernel: cancelled. Nobody can reap after destruction, so they are just dropped.
        overflow_.clear();
        for (const uint32_t slot : ready_) free_slots_.push_back(slot);
        ready_.clear();
      }
      if (!wake_armed_ && !stopping) arm_wake();
      pump();
      const bool kernel_holds_ours = in_kernel_ > 0 || wake_in_kernel_;
      if (stopping && !kernel_holds_ours) return;  // entries left in the SQ ring die with it, unstarted

      if (!kernel_holds_ours) {
        // Only after a failed submit (else the wake read is in the kernel): no completion will come, so poll.
        const timespec pause{0, kSubmitRetryNs};
        nanosleep(&pause, nullptr);
      } else {
        io_uring_cqe* cqe = nullptr;
        const int rc = io_uring_wait_cqe(&ring_, &cqe);
        if (rc < 0 && rc != -EINTR && rc != -EAGAIN) {
          const timespec pause{0, kSubmitRetryNs};  // unexpected; back off rather than spin
          nanosleep(&pause, nullptr);
        }
      }
      harvest(stopping);
    }
  }

  // Queues the eventfd read whose completion wakes io_uring_wait_cqe when submit() or the destructor writes.
  void arm_wake() {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (sqe == nullptr) return;  // SQ ring full after a failed submit: armed on a later turn
    io_uring_prep_read(sqe, wake_fd_, &wake_value_, sizeof(wake_value_), 0);
    io_uring_sqe_set_data64(sqe, kWakeTag);
    wake_armed_ = true;
    sq_pending_.push_back(true);
  }

  // Moves every available CQE out of the ring and settles it.
  void harvest(bool stopping) {
    bool settled_reads = false;
    for (;;) {
      io_uring_cqe* cqe = nullptr;
      if (io_uring_peek_cqe(&ring_, &cqe) != 0 || cqe == nullptr) break;
      const uint64_t tag = io_uring_cqe_get_data64(cqe);
      const int32_t res = cqe->res;
      io_uring_cqe_seen(&ring_, cqe);
      if (tag == kWakeTag) {
        wake_armed_ = false;
        wake_in_kernel_ = false;
        // Cleared before the next look at incoming_ (top of ring_loop): a submit() after this point writes
        // the eventfd again.
        wake_pending_.store(false);
        if (res < 0 && res != -EINTR && res != -EAGAIN) {
          const timespec pause{0, kSubmitRetryNs};  // a broken eventfd read: re-arm, but do not spin
          nanosleep(&pause, nullptr);
        }
        continue;
      }
      --in_kernel_;
      settle(static_cast<uint32_t>(tag), res, stopping);
      settled_reads = true;
    }
    if (!settled_reads || finished_.empty()) return;
    completions_.push(finished_);
    finished_.clear();
  }

  // One CQE for `slot`: finish the request, or queue the rest of it again.
  void settle(uint32_t slot_index, int32_t res, bool stopping) {
    Slot& slot = slots_[slot_index];
    const uint64_t size = slot.request.buffer.size();
    int64_t result = 0;
    bool again = false;
    if (res == -EINTR || res == -EAGAIN) {
      again = true;  // nothing transferred; the kernel asks us to try again
    } else if (res < 0) {
      result = res;
    } else if (res == 0) {
      result = -ENODATA;  // end of file before the full length
    } else if (static_cast<uint64_t>(res) > size - slot.done) {
      result = -EIO;  // more than asked: never trust it
    } else {
      slot.done += static_cast<uint64_t>(res);
      if (slot.done < size) {
        again = true;  // short read: resume with the remainder
      } else {
        result = static_cast<int64_t>(size);
      }
    }
    if (again && stopping) {
      again = false;
      result = -ECANCELED;
    }
    if (again) {
      ready_.push_back(slot_index);
      return;
    }
    finished_.push_back(Completion{slot.request.user_data, result});
    slot = Slot{};
    free_slots_.push_back(slot_index);
  }

  // Gives waiting requests a slot and an SQE, then hands the SQ to the kernel. Never blocks.
  void pump() {
    while (!overflow_.empty() && !free_slots_.empty()) {
      const uint32_t slot_index = free_slots_.back();
      free_slots_.pop_back();
      slots_[slot_index] = Slot{overflow_.front(), 0};
      overflow_.pop_front();
      ready_.push_back(slot_index);
    }
    while (!ready_.empty()) {
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
      if (sqe == nullptr) break;  // SQ ring full of unsubmitted entries (only after a failed submit)
      const uint32_t slot_index = ready_.front();
      ready_.pop_front();
      const Slot& slot = slots_[slot_index];
      const uint64_t length = std::min<uint64_t>(slot.request.buffer.size() - slot.done, kMaxSqeBytes);
      io_uring_prep_read(sqe, slot.request.fd, slot.request.buffer.data() + slot.done,
                         static_cast<unsigned>(length), slot.request.offset + slot.done);
      io_uring_sqe_set_data64(sqe, slot_index);
      sq_pending_.push_back(false);
    }
    if (sq_pending_.empty()) return;
    const int rc = io_uring_submit(&ring_);
    if (rc <= 0) return;  // EAGAIN, EBUSY, EINTR: the entries stay in the SQ ring for the next submit
    // The kernel takes SQEs in ring order, so the first `rc` pending entries are the ones it took.
    const size_t taken = std::min(static_cast<size_t>(rc), sq_pending_.size());
    for (size_t i = 0; i < taken; ++i) {
      if (sq_pending_.front()) {
        wake_in_kernel_ = true;
      } else {
        ++in_kernel_;
      }
      sq_pending_.pop_front();
    }
  }

  io_uring ring_{};
  int wake_fd_ = -1;
  const uint32_t depth_;
  std::atomic<bool> wake_pending_{false};  // an eventfd write is on its way to the ring thread
  CompletionQueue completions_;

  std::mutex mutex_;
  std::deque<ReadRequest> incoming_;
  bool stop_ = false;

  // Ring thread only.
  std::vector<Slot> slots_;
  std::vector<uint32_t> free_slots_;
  std::deque<ReadRequest> overflow_;  // waiting for a slot
  std::deque<uint32_t> ready_;        // have a slot, waiting for an SQE
  std::vector<Completion> finished_;  // settled this turn, published to done_ in one lock
  uint64_t wake_value_ = 0;           // the eventfd read's buffer
  bool wake_armed_ = false;           // the eventfd read is queued (in the SQ ring or the kernel)
  bool wake_in_kernel_ = false;       // ... and the kernel has taken it
  std::deque<bool> sq_pending_;       // SQEs in the SQ ring not yet taken by the kernel, oldest first (true: wake)
  uint32_t in_kernel_ = 0;            // reads the kernel took whose CQE we have not settled

  std::thread thread_;  // last: started once everything above exists
};

}  // namespace

std::unique_ptr<IoBackend> make_uring_backend(uint32_t queue_depth) {
  if (queue_depth == 0 || queue_depth > kMaxQueueDepth) {
    throw ConfigError("queue_depth", "io_uring queue depth " + std::to_string(queue_depth) + " is outside 1.." +
                                         std::to_string(kMaxQueueDepth));
  }
  return std::make_unique<UringBackend>(queue_depth);
}

}  // namespace tensorstream::detail
