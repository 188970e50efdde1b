// A fixed-bucket latency histogram for monitoring (Prometheus exposes it as tensorstream_*_seconds): relaxed atomic
// counts per bucket, the sum and the count, updated on the hot path without locks.
//
// Buckets are upper bounds in seconds, the same for every histogram so that dashboards can compare them: from
// 100 µs (a hit in the page cache) to 10 s (a stalled network volume), then +Inf.
//
// Thread-safety: observe, snapshot and reset may be called from any thread; a snapshot is not a consistent cut
// (a concurrent observe may be counted in its bucket but not yet in the sum), which is fine for monitoring.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>

namespace tensorstream {

inline constexpr std::array<double, 15> kLatencyBucketBoundsS = {
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0};

struct LatencyHistogramSnapshot {
  std::array<uint64_t, kLatencyBucketBoundsS.size() + 1> counts{};  // per bucket (not cumulative); last: +Inf
  uint64_t count = 0;
  uint64_t sum_ns = 0;
};

class LatencyHistogram {
 public:
  void observe(uint64_t ns) noexcept {
    size_t bucket = 0;
    const double seconds = static_cast<double>(ns) * 1e-9;
    while (bucket < kLatencyBucketBoundsS.size() && seconds > kLatencyBucketBoundsS[bucket]) ++bucket;
    counts_[bucket].fetch_add(1, std::memory_order_relaxed);
    count_.fetch_add(1, std::memory_order_relaxed);
    sum_ns_.fetch_add(ns, std::memory_order_relaxed);
  }

  [[nodiscard]] LatencyHistogramSnapshot snapshot() const noexcept {
    LatencyHistogramSnapshot out;
    for (size_t i = 0; i < counts_.size(); ++i) out.counts[i] = counts_[i].load(std::memory_order_relaxed);
    out.count = count_.load(std::memory_order_relaxed);
    out.sum_ns = sum_ns_.load(std::memory_order_relaxed);
    return out;
  }

  void reset() noexcept {
    for (auto& count : counts_) count.store(0, std::memory_order_relaxed);
    count_.store(0, std::memory_order_relaxed);
    sum_ns_.store(0, std::memory_order_relaxed);
  }

 private:
  std::array<std::atomic<uint64_t>, kLatencyBucketBoundsS.size() + 1> counts_{};
  std::atomic<uint64_t> count_{0};
  std::atomic<uint64_t> sum_ns_{0};
};

}  // namespace tensorstream
