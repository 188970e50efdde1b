// Tests for Prefetcher: the three strategies, order learning (including a pass that does not start at block 0),
// conditional successors, the lookahead derived from load and compute times, and use from several threads.
#include "tensorstream/residency/prefetcher.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "tensorstream/error.hpp"

namespace tensorstream {
namespace {

using Blocks = std::vector<size_t>;

std::set<size_t> as_set(const Blocks& v) { return {v.begin(), v.end()}; }

// Feeds a sequence of accesses and returns the prefetch list of the last one.
Blocks feed(Prefetcher& pf, const Blocks& accesses) {
  Blocks last;
  for (size_t b : accesses) last = pf.on_access(b);
  return last;
}

void set_timings(Prefetcher& pf, uint64_t load_ns, uint64_t compute_ns) {
  pf.on_load_time(0, load_ns);
  pf.on_compute_time(0, compute_ns);
}

TEST(Prefetcher, NoneNeverPrefetchesButStillLearnsTheOrder) {
  Prefetcher pf(PrefetchStrategy::kNone, 4, 3);
  for (int pass = 0; pass < 3; ++pass) {
    for (size_t b = 0; b < 4; ++b) EXPECT_TRUE(pf.on_access(b).empty());
  }
  EXPECT_EQ(pf.lookahead(), 0u);
  EXPECT_TRUE(pf.order_known());
  EXPECT_EQ(pf.learned_order(), (Blocks{0, 1, 2, 3}));
  EXPECT_EQ(pf.strategy(), PrefetchStrategy::kNone);
}

TEST(Prefetcher, NextLayerUsesIndicesUntilTheOrderIsKnown) {
  Prefetcher pf(PrefetchStrategy::kNextLayer, 6, 2);
  EXPECT_EQ(pf.lookahead(), 2u);
  EXPECT_EQ(pf.on_access(3), (Blocks{4, 5}));
  EXPECT_EQ(pf.on_access(4), (Blocks{5}));  // stops at the last block: no wrapping before the order is known
  EXPECT_TRUE(pf.on_access(5).empty());
  EXPECT_FALSE(pf.order_known());
}

TEST(Prefetcher, NextLayerFollowsTheLearnedOrderAndWraps) {
  Prefetcher pf(PrefetchStrategy::kNextLayer, 4, 2);
  EXPECT_EQ(pf.on_access(2), (Blocks{3}));  // index order before the order is known
  EXPECT_EQ(pf.on_access(0), (Blocks{1, 2}));
  (void)pf.on_access(1);
  (void)pf.on_access(3);
  EXPECT_FALSE(pf.order_known());
  EXPECT_EQ(pf.on_access(2), (Blocks{0, 1}));  // the pass closed: order 2, 0, 1, 3
  EXPECT_TRUE(pf.order_known());
  EXPECT_EQ(pf.learned_order(), (Blocks{2, 0, 1, 3}));
  EXPECT_EQ(pf.on_access(0), (Blocks{1, 3}));
  EXPECT_EQ(pf.on_access(1), (Blocks{3, 2}));
  EXPECT_EQ(pf.on_access(3), (Blocks{2, 0}));  // wraps into the next pass
  pf.set_max_lookahead(3);
  EXPECT_EQ(pf.on_access(2), (Blocks{0, 1, 3}));
  pf.set_max_lookahead(10);
  EXPECT_EQ(pf.on_access(0), (Blocks{1, 3, 2}));  // never the accessed block, never twice
}

TEST(Prefetcher, AdaptiveGuessesStorageOrderInTheFirstPassThenPredictsTheChain) {
  Prefetcher pf(PrefetchStrategy::kAdaptive, 4, 3);
  // First pass, starting at block 2: no transition seen yet, so the next indices this pass has not used.
  EXPECT_EQ(pf.on_access(2), (Blocks{3}));
  EXPECT_EQ(pf.on_access(0), (Blocks{1, 3}));
  EXPECT_EQ(pf.on_access(1), (Blocks{3}));
  EXPECT_TRUE(pf.on_access(3).empty());
  EXPECT_FALSE(pf.order_known());
  EXPECT_EQ(pf.lookahead(), 2u);  // no measurements: half of 3, rounded up
  const Blocks at2 = pf.on_access(2);
  EXPECT_TRUE(pf.order_known());
  EXPECT_EQ(pf.learned_order(), (Blocks{2, 0, 1, 3}));
  EXPECT_EQ(at2, (Blocks{0, 1}));
  EXPECT_EQ(pf.on_access(0), (Blocks{1, 3}));
  EXPECT_EQ(pf.on_access(1), (Blocks{3, 2}));
  EXPECT_EQ(pf.on_access(3), (Blocks{2, 0}));
}

TEST(Prefetcher, AdaptiveRepeatedPassesKeepOrUpdateTheOrder) {
  Prefetcher pf(PrefetchStrategy::kAdaptive, 5, 2);
  set_timings(pf, 2000, 1000);  // lookahead 2
  for (int pass = 0; pass < 5; ++pass) feed(pf, {1, 2, 3, 4, 0});
  (void)pf.on_access(1);
  EXPECT_EQ(pf.learned_order(), (Blocks{1, 2, 3, 4, 0}));
  EXPECT_EQ(pf.on_access(2), (Blocks{3, 4}));
  // The model changes its order: the next finished pass replaces the learned one.
  feed(pf, {4, 3, 0});
  (void)pf.on_access(1);
  EXPECT_EQ(pf.learned_order(), (Blocks{1, 2, 4, 3, 0}));
}

TEST(Prefetcher, AdaptivePrefetchesEveryFrequentAlternativeOfAConditionalBlock) {
  // MoE-like: after block 3 comes expert 4 or expert 5, then 6.
  Prefetcher pf(PrefetchStrategy::kAdaptive, 7, 2);
  set_timings(pf, 2000, 1000);  // lookahead 2
  for (int pass = 0; pass < 6; ++pass) feed(pf, {0, 1, 2, 3, pass % 2 == 0 ? size_t{4} : size_t{5}, 6});
  feed(pf, {0, 1, 2});
  const Blocks ahead = pf.on_access(3);
  EXPECT_EQ(as_set(Blocks(ahead.begin(), ahead.begin() + 2)), (std::set<size_t>{4, 5}));  // both, nearest first
  EXPECT_EQ(ahead.size(), 3u);
  EXPECT_EQ(ahead[2], 6u);  // the chain goes on past the alternatives

  // A rare alternative (seen less than half as often as the top one) is not prefetched.
  Prefetcher rare(PrefetchStrategy::kAdaptive, 7, 1);
  set_timings(rare, 1000, 1000);  // lookahead 1
  for (int pass = 0; pass < 9; ++pass) feed(rare, {0, 1, 2, 3, pass % 4 == 3 ? size_t{5} : size_t{4}, 6});
  feed(rare, {0, 1, 2});
  EXPECT_EQ(rare.on_access(3), (Blocks{4}));
}

TEST(Prefetcher, LookaheadFollowsLoadOverComputeTime) {
  Prefetcher pf(PrefetchStrategy::kAdaptive, 8, 4);
  EXPECT_EQ(pf.lookahead(), 2u);  // before measurements
  set_timings(pf, 3000, 1000);
  EXPECT_EQ(pf.lookahead(), 3u);

  Prefetcher slow_compute(PrefetchStrategy::kAdaptive, 8, 4);
  set_timings(slow_compute, 500, 1000);
  EXPECT_EQ(slow_compute.lookahead(), 1u);

  Prefetcher clamped(PrefetchStrategy::kAdaptive, 8, 4);
  set_timings(clamped, 100000, 1000);
  EXPECT_EQ(clamped.lookahead(), 4u);

  Prefetcher small(PrefetchStrategy::kAdaptive, 8, 2);
  set_timings(small, 3000, 1000);
  EXPECT_EQ(small.lookahead(), 2u);
  small.set_max_lookahead(5);
  EXPECT_EQ(small.lookahead(), 3u);

  // Moving averages with weight 0.2: 1000 then 6000 averages to 2000 -> lookahead 2.
  Prefetcher ewma(PrefetchStrategy::kAdaptive, 8, 8);
  ewma.on_compute_time(1, 1000);
  ewma.on_load_time(1, 1000);
  EXPECT_EQ(ewma.lookahead(), 1u);
  ewma.on_load_time(2, 6000);
  EXPECT_EQ(ewma.lookahead(), 2u);
  for (int i = 0; i < 60; ++i) ewma.on_load_time(3, 6000);
  EXPECT_EQ(ewma.lookahead(), 6u);

  // The lookahead limits the chain.
  Prefetcher chain(PrefetchStrategy::kAdaptive, 8, 4);
  set_timings(chain, 3000, 1000);
  for (int pass = 0; pass < 2; ++pass) feed(chain, {0, 1, 2, 3, 4, 5, 6, 7});
  EXPECT_EQ(chain.on_access(0), (Blocks{1, 2, 3}));

  EXPECT_EQ(Prefetcher(PrefetchStrategy::kAdaptive, 8, 0).lookahead(), 0u);
  EXPECT_EQ(Prefetcher(PrefetchStrategy::kAdaptive, 8, 1).lookahead(), 1u);
  EXPECT_EQ(Prefetcher(PrefetchStrategy::kAdaptive, 8, 3).lookahead(), 2u);
}

TEST(Prefetcher, AdaptiveChainStopsWhenItComesBackRound) {
  Prefetcher pf(PrefetchStrategy::kAdaptive, 3, 8);
  set_timings(pf, 100000, 1000);  // lookahead 8 > number of blocks
  feed(pf, {0, 1, 2, 0, 1, 2});
  EXPECT_EQ(pf.on_access(0), (Blocks{1, 2}));
}

TEST(Prefetcher, NeverReturnsTheAccessedBlockOrDuplicates) {
  std::mt19937_64 rng(3);
  for (const PrefetchStrategy strategy : {PrefetchStrategy::kNextLayer, PrefetchStrategy::kAdaptive}) {
    Prefetcher pf(strategy, 12, 6);
    set_timings(pf, 9000, 1000);
    for (int i = 0; i < 5000; ++i) {
      // Mostly a cyclic order with random detours, so successor lists grow long.
      const size_t b = rng() % 4 == 0 ? rng() % 12 : static_cast<size_t>(i % 12);
      const Blocks ahead = pf.on_access(b);
      EXPECT_EQ(as_set(ahead).size(), ahead.size()) << "duplicates at access " << i;
      EXPECT_EQ(std::count(ahead.begin(), ahead.end(), b), 0) << "accessed block at access " << i;
      for (size_t a : ahead) EXPECT_LT(a, 12u);
    }
  }
}

TEST(Prefetcher, RejectsOutOfRangeBlocks) {
  Prefetcher pf(PrefetchStrategy::kAdaptive, 4, 4);
  EXPECT_THROW((void)pf.on_access(4), ConfigError);
  pf.on_load_time(9, 100);  // timings from an engine thread never throw
  pf.on_compute_time(9, 100);
  EXPECT_EQ(pf.lookahead(), 2u);  // ...but out-of-range samples are ignored: still the default
}

// ---- ADAPTIVE's check of prefetch on against off, on a clock the test moves ----------------------------------

std::atomic<uint64_t> g_now{1};
uint64_t test_clock() { return g_now.load(); }

constexpr uint64_t kMs = 1'000'000;

// Runs `passes` passes over blocks 0..3; each access advances the clock by `on_ms` or `off_ms`, as the prefetcher
// has prefetch on or off at that moment, and `idle_ms` passes between passes (outside the model). Returns how many
// passes ran with prefetch off.
int run_passes(Prefetcher& pf, int passes, double on_ms, double off_ms, double idle_ms = 0) {
  int off_passes = 0;
  for (int pass = 0; pass < passes; ++pass) {
    bool off = false;
    for (size_t b = 0; b < 4; ++b) {
      (void)pf.on_access(b);
      if (b == 0) off = pf.lookahead() == 0;
      g_now += static_cast<uint64_t>((pf.lookahead() == 0 ? off_ms : on_ms) * kMs);
    }
    off_passes += off ? 1 : 0;
    g_now += static_cast<uint64_t>(idle_ms * kMs);
  }
  return off_passes;
}

TEST(PrefetcherCheck, PrefetchTurnsOffWhenPassesWithoutItAreFaster) {
  Prefetcher pf(PrefetchStrategy::kAdaptive, 4, 2, &test_clock);
  set_timings(pf, 3000, 1000);
  // Pass 1 learns the order; 8 passes later, 10-11 are timed with prefetch, 12-13 without; from 14 on it is off.
  EXPECT_EQ(run_passes(pf, 9, 100, 80), 0);  // a short run is never checked
  EXPECT_EQ(run_passes(pf, 4, 100, 80), 2);
  EXPECT_EQ(pf.prefetch_checks(), 0u);
  EXPECT_EQ(run_passes(pf, 1, 100, 80), 1);
  EXPECT_EQ(pf.prefetch_checks(), 1u);
  EXPECT_TRUE(pf.prefetch_off());
  EXPECT_EQ(pf.lookahead(), 0u);
  EXPECT_TRUE(pf.on_access(0).empty());  // nothing predicted while off
  g_now += 80 * kMs;
  for (size_t b = 1; b < 4; ++b) {
    (void)pf.on_access(b);
    g_now += 80 * kMs;
  }
  // 16 passes after it settled (at the start of pass 14) it checks again: passes 16-29 off, 30-31 on, 32-33 off;
  // the answer is the same, so the next check waits 32 passes.
  EXPECT_EQ(run_passes(pf, 20, 100, 80), 18);
  EXPECT_EQ(pf.prefetch_checks(), 2u);
  EXPECT_TRUE(pf.prefetch_off());
  EXPECT_EQ(run_passes(pf, 30, 100, 80), 30);
  EXPECT_EQ(pf.prefetch_checks(), 2u);
}

TEST(PrefetcherCheck, PrefetchStaysOnWhenItWinsAndACheckThatLosesEndsAtOnce) {
  Prefetcher pf(PrefetchStrategy::kAdaptive, 4, 2, &test_clock);
  set_timings(pf, 3000, 1000);
  // Without prefetch a pass takes twice as long: the first pass off ends the check.
  EXPECT_EQ(run_passes(pf, 8 + 8, 100, 200), 1);
  EXPECT_EQ(pf.prefetch_checks(), 1u);
  EXPECT_FALSE(pf.prefetch_off());
  EXPECT_EQ(pf.lookahead(), 2u);  // ceil(3000 / 1000) = 3, at most max_lookahead 2
  EXPECT_EQ(pf.on_access(0), (Blocks{1, 2}));
}

TEST(PrefetcherCheck, OffMustWinByMoreThanThreePercent) {
  Prefetcher pf(PrefetchStrategy::kAdaptive, 4, 2, &test_clock);
  set_timings(pf, 3000, 1000);
  EXPECT_EQ(run_passes(pf, 8 + 8, 100, 98), 2);  // 2 % faster without: noise, prefetch stays on
  EXPECT_EQ(pf.prefetch_checks(), 1u);
  EXPECT_FALSE(pf.prefetch_off());
}

TEST(PrefetcherCheck, TimeBetweenPassesIsNotCounted) {
  // Passes with prefetch are slower, but each is followed by a long idle gap (a server waiting for requests):
  // only the passes themselves are compared.
  Prefetcher pf(PrefetchStrategy::kAdaptive, 4, 2, &test_clock);
  set_timings(pf, 3000, 1000);
  (void)run_passes(pf, 8 + 8, 100, 80, /*idle_ms=*/5000);
  EXPECT_TRUE(pf.prefetch_off());
}

TEST(PrefetcherCheck, ARecheckTurnsPrefetchBackOnWhenItWinsAgain) {
  Prefetcher pf(PrefetchStrategy::kAdaptive, 4, 2, &test_clock);
  set_timings(pf, 3000, 1000);
  (void)run_passes(pf, 6 + 8, 100, 80);
  ASSERT_TRUE(pf.prefetch_off());
  (void)run_passes(pf, 16 + 4, 100, 200);  // the model changed: passes without prefetch now take twice as long
  EXPECT_EQ(pf.prefetch_checks(), 2u);
  EXPECT_FALSE(pf.prefetch_off());
  EXPECT_EQ(pf.lookahead(), 2u);  // ceil(3000 / 1000) = 3, at most max_lookahead 2
}

TEST(PrefetcherCheck, ShortPassesAreNotCompared) {
  Prefetcher pf(PrefetchStrategy::kAdaptive, 4, 2, &test_clock);
  set_timings(pf, 3000, 1000);
  EXPECT_EQ(run_passes(pf, 40, 10, 1), 0);  // 40 ms passes: under the 100 ms a comparison needs
  EXPECT_FALSE(pf.prefetch_off());
  EXPECT_EQ(pf.lookahead(), 2u);  // ceil(3000 / 1000) = 3, at most max_lookahead 2
}

uint64_t counting_clock() {
  static std::atomic<uint64_t> calls{0};
  return ++calls;
}

TEST(PrefetcherCheck, FixedStrategiesNeverTimePasses) {
  for (const PrefetchStrategy strategy : {PrefetchStrategy::kNone, PrefetchStrategy::kNextLayer}) {
    Prefetcher pf(strategy, 4, 2, &counting_clock);
    const uint64_t before = counting_clock();
    for (int pass = 0; pass < 40; ++pass) feed(pf, {0, 1, 2, 3});
    EXPECT_EQ(counting_clock(), before + 1);
    EXPECT_EQ(pf.prefetch_checks(), 0u);
    EXPECT_FALSE(pf.prefetch_off());
  }
}

TEST(Prefetcher, SafeFromSeveralThreads) {
  Prefetcher pf(PrefetchStrategy::kAdaptive, 16, 4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&pf, t] {
      for (int i = 0; i < 2000; ++i) {
        const size_t b = static_cast<size_t>(i + t) % 16;
        const Blocks ahead = pf.on_access(b);
        EXPECT_EQ(std::count(ahead.begin(), ahead.end(), b), 0);
        pf.on_load_time(b, 1000 + static_cast<uint64_t>(t) * 100);
        pf.on_compute_time(b, 700);
        (void)pf.lookahead();
        (void)pf.learned_order();
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_TRUE(pf.order_known());
  EXPECT_EQ(pf.lookahead(), 2u);  // loads ~1.15-1.45x compute
}

}  // namespace
}  // namespace tensorstream
