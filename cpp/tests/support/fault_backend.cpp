#include "support/fault_backend.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <stdexcept>
#include <vector>

// Relative: cpp/src is private to tensorstream_core, and this private header is what the FaultBackend wraps.
#include "io/pread_backend.hpp"

namespace tensorstream::testing {
namespace {

// The faulty syscall's random decisions. One generator behind a mutex: workers call it concurrently, and the
// sequence only needs to be random, not reproducible per thread (thread timing already varies).
class FaultRng {
 public:
  explicit FaultRng(uint64_t seed) : engine_(seed) {}
  bool chance(double probability) {
    if (probability <= 0) return false;
    const std::lock_guard lock(mutex_);
    return std::uniform_real_distribution<double>(0.0, 1.0)(engine_) < probability;
  }
  uint64_t below(uint64_t bound) {  // uniform in [0, bound)
    if (bound <= 1) return 0;
    const std::lock_guard lock(mutex_);
    return std::uniform_int_distribution<uint64_t>(0, bound - 1)(engine_);
  }

 private:
  std::mutex mutex_;
  std::mt19937_64 engine_;
};

struct FaultState {
  FaultPlan plan;
  FaultRng rng;
  FaultCounters counters;
  explicit FaultState(const FaultPlan& p) : plan(p), rng(p.seed) {}
};

ssize_t faulty_pread(FaultState& state, int fd, void* buf, size_t count, off_t offset) {
  const FaultPlan& plan = state.plan;
  if (plan.max_delay_us > 0) {
    std::this_thread::sleep_for(std::chrono::microseconds(state.rng.below(uint64_t{plan.max_delay_us} + 1)));
  }
  if (state.rng.chance(plan.eintr_probability)) {
    state.counters.eintrs.fetch_add(1, std::memory_order_relaxed);
    errno = EINTR;
    return -1;
  }
  const auto start = static_cast<uint64_t>(offset);
  if (plan.eio_offset && count > 0 && *plan.eio_offset >= start && *plan.eio_offset - start < count) {
    state.counters.eios.fetch_add(1, std::memory_order_relaxed);
    errno = EIO;
    return -1;
  }
  if (count > 1 && state.rng.chance(plan.short_read_probability)) {
    count = 1 + static_cast<size_t>(state.rng.below(count - 1));  // 1 .. count-1
    state.counters.short_reads.fetch_add(1, std::memory_order_relaxed);
  }
  return ::pread(fd, buf, count, offset);
}

// Thread-safety: as IoBackend. held_ is touched only by the reaping thread.
class FaultBackendImpl final : public FaultBackend {
 public:
  FaultBackendImpl(const FaultPlan& plan, uint32_t num_threads)
      : state_(std::make_shared<FaultState>(plan)), reorder_rng_(plan.seed ^ 0x5eedull) {
    // The syscall holds the state by shared_ptr: workers may still run it while this object is destroyed
    // (inner_ is destroyed first, and joins them, but shared ownership makes the order irrelevant).
    std::shared_ptr<FaultState> state = state_;
    inner_ = detail::make_pread_backend(num_threads, [state](int fd, void* buf, size_t count, off_t offset) {
      return faulty_pread(*state, fd, buf, count, offset);
    });
  }

  void submit(std::span<const ReadRequest> requests) override { inner_->submit(requests); }

  size_t reap(std::span<Completion> out, bool wait) override {
    if (out.empty()) return 0;
    if (!state_->plan.reorder) return inner_->reap(out, wait);
    // Collect everything ready (waiting for the first one if asked), shuffle, hand back a prefix; the rest
    // stays held and is mixed with the next batch.
    std::vector<Completion> batch(std::max<size_t>(out.size(), 64));
    size_t got = inner_->reap(batch, /*wait=*/false);
    if (got == 0 && held_.empty() && wait) got = inner_->reap(batch, /*wait=*/true);
    held_.insert(held_.end(), batch.begin(), batch.begin() + static_cast<std::ptrdiff_t>(got));
    std::shuffle(held_.begin(), held_.end(), reorder_rng_);
    const size_t n = std::min(out.size(), held_.size());
    std::copy_n(held_.end() - static_cast<std::ptrdiff_t>(n), n, out.begin());
    held_.resize(held_.size() - n);
    return n;
  }

  [[nodiscard]] size_t in_flight() const override { return inner_->in_flight() + held_.size(); }

  [[nodiscard]] BackendCaps caps() const override {
    BackendCaps caps = inner_->caps();
    caps.name = "fault";
    return caps;
  }

  [[nodiscard]] const FaultCounters& counters() const noexcept override { return state_->counters; }

 private:
  std::shared_ptr<FaultState> state_;
  std::mt19937_64 reorder_rng_;
  std::vector<Completion> held_;
  std::unique_ptr<IoBackend> inner_;
};

}  // namespace

std::unique_ptr<FaultBackend> make_fault_backend(FaultPlan plan, uint32_t num_threads) {
  return std::make_unique<FaultBackendImpl>(plan, num_threads);
}

const FaultCounters& fault_counters(const IoBackend& backend) {
  const auto* fault = dynamic_cast<const FaultBackend*>(&backend);
  if (fault == nullptr) throw std::invalid_argument("fault_counters: not a FaultBackend");
  return fault->counters();
}

Watchdog::Watchdog(const char* what, std::chrono::milliseconds limit) {
  thread_ = std::thread([this, what, limit] {
    std::unique_lock lock(mutex_);
    if (!cv_.wait_for(lock, limit, [&] { return done_; })) {
      std::fprintf(stderr, "watchdog: '%s' did not finish within %lld ms (a hang); aborting\n", what,
                   static_cast<long long>(limit.count()));
      std::abort();
    }
  });
}

Watchdog::~Watchdog() {
  {
    const std::lock_guard lock(mutex_);
    done_ = true;
  }
  cv_.notify_one();
  thread_.join();
}

}  // namespace tensorstream::testing
