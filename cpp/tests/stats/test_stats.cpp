#include "tensorstream/stats/stats.hpp"

#include <gtest/gtest.h>

#include <thread>

namespace tensorstream {
namespace {

TEST(Stats, CountsAndRates) {
  Stats stats(3);
  stats.on_acquire(0, /*hit=*/false, /*prefetched=*/false);
  stats.on_load_done(0, 1000, 2000, 50);
  stats.on_acquire(0, /*hit=*/true, /*prefetched=*/false);
  stats.on_acquire(1, /*hit=*/false, /*prefetched=*/true);
  stats.on_eviction(0);
  stats.on_wait(1, 30);
  stats.on_checksum_failure();
  stats.on_io_started(100);
  stats.on_io_idle(600);
  const StatsSnapshot s = stats.snapshot();
  EXPECT_EQ(s.acquires, 3u);
  EXPECT_EQ(s.hits, 1u);
  EXPECT_EQ(s.misses, 2u);
  EXPECT_EQ(s.prefetch_hits, 1u);
  EXPECT_EQ(s.bytes_read, 1000u);
  EXPECT_EQ(s.bytes_delivered, 2000u);
  EXPECT_EQ(s.evictions, 1u);
  EXPECT_EQ(s.checksum_failures, 1u);
  EXPECT_EQ(s.io_busy_ns, 500u);
  EXPECT_DOUBLE_EQ(s.io_throughput_bytes_per_s(), 1000.0 * 1e9 / 500.0);
  EXPECT_DOUBLE_EQ(s.hit_rate(), 1.0 / 3.0);
  ASSERT_EQ(s.blocks.size(), 3u);
  EXPECT_EQ(s.blocks[0].loads, 1u);
  EXPECT_EQ(s.blocks[0].hits, 1u);
  EXPECT_EQ(s.blocks[0].evictions, 1u);
  EXPECT_EQ(s.blocks[1].wait_ns, 30u);
  EXPECT_EQ(s.blocks[1].prefetch_hits, 1u);
}

TEST(Stats, AReuseIsAHitThatNoPrefetchReadForThisUse) {
  // cache_hit_rate (python) counts reuses: a block a prefetch read just in time was ready, but it was read.
  Stats stats(2);
  stats.on_acquire(0, /*hit=*/true, /*prefetched=*/true);   // prefetched and ready: a hit, not a reuse
  stats.on_acquire(0, /*hit=*/true, /*prefetched=*/false);  // still there on the next use: a reuse
  stats.on_acquire(1, /*hit=*/false, /*prefetched=*/true);  // prefetch still in flight: neither
  stats.on_acquire(1, /*hit=*/false, /*prefetched=*/false); // read on demand: neither
  const StatsSnapshot s = stats.snapshot();
  EXPECT_EQ(s.hits, 2u);
  EXPECT_EQ(s.reuses, 1u);
  EXPECT_EQ(s.blocks[0].hits, 2u);
  EXPECT_EQ(s.blocks[0].reuses, 1u);
  EXPECT_EQ(s.blocks[1].reuses, 0u);
  stats.reset();
  EXPECT_EQ(stats.snapshot().reuses, 0u);
  EXPECT_EQ(stats.snapshot().blocks[0].reuses, 0u);
}

TEST(Stats, LoadsAndBlockingWaitsFillTheirLatencyHistograms) {
  Stats stats(2);
  stats.on_load_done(0, 10, 10, 50'000);          // 50 µs: the first bucket (<= 100 µs)
  stats.on_load_done(1, 10, 10, 3'000'000);       // 3 ms: (2.5 ms, 5 ms]
  stats.on_load_done(1, 10, 10, 60'000'000'000);  // 60 s: +Inf
  stats.on_wait(0, 100'000);                      // exactly 100 µs: a bound belongs to its own bucket
  LatencyHistogramSnapshot load = stats.snapshot().load_latency;
  EXPECT_EQ(load.count, 3u);
  EXPECT_EQ(load.sum_ns, 50'000u + 3'000'000u + 60'000'000'000u);
  EXPECT_EQ(load.counts[0], 1u);
  EXPECT_EQ(load.counts[5], 1u);  // kLatencyBucketBoundsS[5] = 0.005
  EXPECT_EQ(load.counts.back(), 1u);
  uint64_t total = 0;
  for (uint64_t count : load.counts) total += count;
  EXPECT_EQ(total, load.count);
  const LatencyHistogramSnapshot wait = stats.snapshot().wait_latency;
  EXPECT_EQ(wait.count, 1u);
  EXPECT_EQ(wait.counts[0], 1u);
  stats.reset();
  EXPECT_EQ(stats.snapshot().load_latency.count, 0u);
  EXPECT_EQ(stats.snapshot().wait_latency.counts[0], 0u);
}

TEST(Stats, ResetClearsCounters) {
  Stats stats(1);
  stats.on_acquire(0, true, false);
  stats.on_io_started(10);
  stats.on_io_idle(20);
  stats.reset();
  const StatsSnapshot s = stats.snapshot();
  EXPECT_EQ(s.acquires, 0u);
  EXPECT_EQ(s.blocks[0].hits, 0u);
  EXPECT_EQ(s.io_busy_ns, 0u);
  EXPECT_DOUBLE_EQ(s.hit_rate(), 0.0);
  EXPECT_DOUBLE_EQ(s.io_throughput_bytes_per_s(), 0.0);
}

TEST(Stats, CountersAreExactUnderConcurrency) {
  Stats stats(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 10000; ++i) stats.on_acquire(static_cast<size_t>(t % 4), i % 2 == 0, false);
    });
  }
  for (auto& thread : threads) thread.join();
  const StatsSnapshot s = stats.snapshot();
  EXPECT_EQ(s.acquires, 80000u);
  EXPECT_EQ(s.hits, 40000u);
  EXPECT_EQ(s.blocks[0].hits + s.blocks[1].hits + s.blocks[2].hits + s.blocks[3].hits, 40000u);
}

}  // namespace
}  // namespace tensorstream
