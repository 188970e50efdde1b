// Tests for ResidencyManager: the loads-per-pass promise under a cyclic order (with the prefetcher issuing
// prefetches as the engine does), eviction choices, first-fit slots in a fragmented arena, run-time budget changes,
// the memory-pressure presets and concurrent use from eight threads.
#include "tensorstream/residency/residency_manager.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <iostream>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "tensorstream/error.hpp"
#include "tensorstream/residency/prefetcher.hpp"

namespace tensorstream {
namespace {

using Action = ResidencyManager::Action;

constexpr uint64_t kPage = 4096;
constexpr uint64_t kMiB = uint64_t{1} << 20;

// Local, so this test links without config.cpp.
std::string strategy_name(PrefetchStrategy strategy) {
  switch (strategy) {
    case PrefetchStrategy::kNone:
      return "none";
    case PrefetchStrategy::kNextLayer:
      return "next_layer";
    case PrefetchStrategy::kAdaptive:
      return "adaptive";
  }
  return "?";
}

uint64_t held(const ResidencyManager& rm) { return rm.resident_bytes() + rm.in_flight_bytes(); }

std::set<size_t> as_set(const std::vector<size_t>& v) { return {v.begin(), v.end()}; }

// Loads a block fully on demand and releases it (acquire -> load_finished -> release).
void use(ResidencyManager& rm, size_t block) {
  const auto d = rm.acquire(block);
  ASSERT_NE(d.action, Action::kNoRoom) << "block " << block;
  if (d.action == Action::kLoad || d.action == Action::kInFlight) (void)rm.load_finished(block, true);
  (void)rm.release(block);
}

// Slots of every held block lie inside the arena and do not overlap, read through the public accessors.
void expect_disjoint_slots(const ResidencyManager& rm, const std::vector<uint64_t>& sizes, uint64_t arena) {
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (size_t b = 0; b < sizes.size(); ++b) {
    const auto offset = rm.slot_offset(b);
    if (!offset) continue;
    EXPECT_EQ(*offset % kPage, 0u) << "block " << b;
    EXPECT_LE(*offset + sizes[b], arena) << "block " << b;
    ranges.emplace_back(*offset, *offset + sizes[b]);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) EXPECT_LE(ranges[i - 1].second, ranges[i].first);
}

// ---- the cyclic-order promise --------------------------------------------------------------------------------

struct PassResult {
  std::vector<uint64_t> loads_per_pass;  // loads attributed to the pass whose access uses them
  uint64_t max_held = 0;
  std::string invariant_error;
};

// Simulates `passes` forward passes over blocks 0..n-1 the way the engine drives the two classes: acquire (a miss
// is loaded at once; a block still in flight completes then), ask the prefetcher, issue prefetch() for its blocks
// (stopping at the first kNoRoom), release. Prefetched loads complete when the next block is acquired (I/O
// finishes during compute), except the one being acquired, which completes as a kInFlight wait. With
// `learn_order`, the learned order is handed to the manager once the prefetcher knows it (as the engine does).
PassResult simulate(size_t n, uint64_t budget_blocks, ResidencyPlan plan, PrefetchStrategy strategy,
                    bool learn_order, int passes) {
  std::vector<uint64_t> sizes(n, kMiB);
  ResidencyManager rm(sizes, budget_blocks * kMiB, budget_blocks * kMiB, plan);
  Prefetcher pf(strategy, n, plan.max_lookahead);
  PassResult result;
  result.loads_per_pass.assign(static_cast<size_t>(passes) + 1, 0);
  std::vector<size_t> pending;
  bool order_given = false;
  const auto note = [&] {
    result.max_held = std::max(result.max_held, held(rm));
    if (result.invariant_error.empty()) result.invariant_error = rm.check_invariants();
  };
  for (int pass = 0; pass < passes; ++pass) {
    for (size_t b = 0; b < n; ++b) {
      for (auto it = pending.begin(); it != pending.end();) {
        if (*it == b) {
          ++it;
          continue;
        }
        (void)rm.load_finished(*it, true);
        it = pending.erase(it);
      }
      const auto d = rm.acquire(b);
      if (d.action == Action::kNoRoom) {
        result.invariant_error = "kNoRoom on a demand access of block " + std::to_string(b);
        return result;
      }
      if (d.action == Action::kLoad) ++result.loads_per_pass[static_cast<size_t>(pass)];
      if (d.action == Action::kLoad || d.action == Action::kInFlight) {
        (void)rm.load_finished(b, true);
        pending.erase(std::remove(pending.begin(), pending.end(), b), pending.end());
      }
      note();
      const std::vector<size_t> ahead = pf.on_access(b);
      if (learn_order && !order_given && pf.order_known()) {
        rm.set_order(pf.learned_order());
        order_given = true;
      }
      for (size_t next : ahead) {
        const auto p = rm.prefetch(next);
        if (p.action == Action::kNoRoom) break;
        if (p.action == Action::kLoad) {
          // Blocks after b in index order belong to this pass, the others to the next.
          ++result.loads_per_pass[static_cast<size_t>(pass) + (next > b ? 0 : 1)];
          pending.push_back(next);
        }
        note();
      }
      (void)rm.release(b);
      note();
    }
  }
  result.loads_per_pass.pop_back();  // prefetches for a pass that never ran
  return result;
}

TEST(ResidencyManagerCyclic, EveryPassAfterTheFirstLoadsExactlyNMinusStaticBlocks) {
  const size_t n = 10;
  const int passes = 6;
  for (const ResidencyPlan plan : {ResidencyPlan{2, 1, 1.0}, ResidencyPlan{3, 2, 1.0}}) {
    for (const PrefetchStrategy strategy :
         {PrefetchStrategy::kNone, PrefetchStrategy::kNextLayer, PrefetchStrategy::kAdaptive}) {
      for (uint64_t k = plan.ring_slots; k <= n + 2; ++k) {
        const PassResult lru = simulate(n, k, plan, strategy, /*learn_order=*/false, passes);
        const PassResult belady = simulate(n, k, plan, strategy, /*learn_order=*/true, passes);
        const std::string where = "ring=" + std::to_string(plan.ring_slots) + " k=" + std::to_string(k) +
                                  " strategy=" + strategy_name(strategy);
        ASSERT_EQ(lru.invariant_error, "") << where;
        ASSERT_EQ(belady.invariant_error, "") << where;
        EXPECT_LE(lru.max_held, k * kMiB) << where;
        EXPECT_LE(belady.max_held, k * kMiB) << where;
        EXPECT_EQ(lru.loads_per_pass[0], n) << where;  // the first pass reads everything once
        const uint64_t expected = k >= n ? 0 : n - (k - plan.ring_slots);
        std::string lru_figures;
        std::string belady_figures;
        for (int pass = 1; pass < passes; ++pass) {
          EXPECT_EQ(lru.loads_per_pass[static_cast<size_t>(pass)], expected) << where << " pass=" << pass;
          EXPECT_LE(belady.loads_per_pass[static_cast<size_t>(pass)], expected) << where << " pass=" << pass;
          lru_figures += " " + std::to_string(lru.loads_per_pass[static_cast<size_t>(pass)]);
          belady_figures += " " + std::to_string(belady.loads_per_pass[static_cast<size_t>(pass)]);
        }
        if (strategy == PrefetchStrategy::kNextLayer) {
          std::cout << "[ figures  ] N=" << n << " " << where << " expected=" << expected << " loads/pass:"
                    << lru_figures << " | with set_order:" << belady_figures << "\n";
        }
      }
    }
  }
}

// With a learned order, furthest next use over every unpinned block (the static set included) is Belady's choice:
// 10 equal blocks with room for 9 and NEXT_LAYER load 1, 1, 1, 2 blocks in passes 1-4, the offline optimum's
// cycle (benchmarks/residency_optimum.py: 1.25 per pass), where the static set and ring alone load 3 every pass.
TEST(ResidencyManagerCyclic, LearnedOrderLoadsWhatTheOfflineOptimumLoads) {
  const PassResult lru = simulate(10, 9, ResidencyPlan{2, 1, 1.0}, PrefetchStrategy::kNextLayer, false, 5);
  const PassResult belady = simulate(10, 9, ResidencyPlan{2, 1, 1.0}, PrefetchStrategy::kNextLayer, true, 5);
  ASSERT_EQ(belady.invariant_error, "");
  EXPECT_EQ(lru.loads_per_pass[2], 3u);
  const std::vector<uint64_t> cycle(belady.loads_per_pass.begin() + 1, belady.loads_per_pass.begin() + 5);
  EXPECT_EQ(cycle, (std::vector<uint64_t>{1, 1, 1, 2}));
}

// ---- construction, states, pins --------------------------------------------------------------------------------

TEST(ResidencyManager, RejectsBadConfiguration) {
  EXPECT_THROW(ResidencyManager({kPage, 3 * kPage}, 8 * kPage, 2 * kPage, {}), ConfigError);  // block > budget
  EXPECT_THROW(ResidencyManager({kPage}, 2 * kPage, 3 * kPage, {}), ConfigError);             // budget > arena
  EXPECT_THROW(ResidencyManager({kPage}, 2 * kPage, 2 * kPage, ResidencyPlan{0, 0, 1.0}), ConfigError);
  EXPECT_THROW(ResidencyManager({kPage}, 2 * kPage, 2 * kPage, ResidencyPlan{2, 1, 1.5}), ConfigError);
  EXPECT_THROW(ResidencyManager({kPage}, 2 * kPage, 2 * kPage, ResidencyPlan{2, 1, -0.1}), ConfigError);
  try {
    ResidencyManager rm({kPage, 5 * kPage}, 8 * kPage, 4 * kPage, {});
    FAIL() << "no exception";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "budget_bytes");
    EXPECT_NE(std::string(e.what()).find(std::to_string(5 * kPage)), std::string::npos) << e.what();
  }
  ResidencyManager rm({kPage, kPage}, 4 * kPage, 4 * kPage, {});
  EXPECT_THROW((void)rm.acquire(2), ConfigError);
  EXPECT_THROW((void)rm.prefetch(7), ConfigError);
  EXPECT_THROW((void)rm.state(2), ConfigError);
  EXPECT_THROW(rm.set_order({0, 5}), ConfigError);
}

TEST(ResidencyManager, SlotSizesAreRoundedUpTo4KiB) {
  ResidencyManager rm({100, kPage + 1, 0}, 8 * kPage, 3 * kPage, ResidencyPlan{2, 1, 0.0});
  auto a = rm.acquire(0);
  auto b = rm.acquire(1);
  auto c = rm.acquire(2);
  ASSERT_EQ(a.action, Action::kLoad);
  ASSERT_EQ(b.action, Action::kLoad);
  ASSERT_EQ(c.action, Action::kLoad);
  EXPECT_EQ(a.slot_offset, 0u);
  EXPECT_EQ(b.slot_offset, kPage);
  EXPECT_EQ(rm.in_flight_bytes(), 3 * kPage);  // 1 page + 2 pages + 0
  EXPECT_EQ(rm.check_invariants(), "");
}

TEST(ResidencyManager, AcquireStatesAndPins) {
  ResidencyManager rm({kPage, kPage, kPage}, 4 * kPage, 4 * kPage, ResidencyPlan{2, 1, 1.0});
  EXPECT_EQ(rm.state(0), BlockState::kOnDisk);
  EXPECT_FALSE(rm.slot_offset(0).has_value());

  const auto load = rm.acquire(0);
  EXPECT_EQ(load.action, Action::kLoad);
  EXPECT_EQ(load.slot_offset % kPage, 0u);
  EXPECT_EQ(rm.state(0), BlockState::kLoading);
  EXPECT_EQ(rm.pins(0), 1u);
  EXPECT_EQ(rm.in_flight_bytes(), kPage);

  const auto in_flight = rm.acquire(0);
  EXPECT_EQ(in_flight.action, Action::kInFlight);
  EXPECT_EQ(in_flight.slot_offset, load.slot_offset);
  EXPECT_EQ(rm.pins(0), 2u);
  EXPECT_EQ(rm.prefetch(0).action, Action::kInFlight);
  EXPECT_EQ(rm.pins(0), 2u);  // a prefetch never pins

  EXPECT_TRUE(rm.load_finished(0, true).empty());
  EXPECT_EQ(rm.state(0), BlockState::kResident);
  EXPECT_EQ(rm.resident_bytes(), kPage);
  EXPECT_EQ(rm.in_flight_bytes(), 0u);
  const auto hit = rm.acquire(0);
  EXPECT_EQ(hit.action, Action::kHit);
  EXPECT_EQ(hit.slot_offset, load.slot_offset);
  EXPECT_EQ(rm.pins(0), 3u);
  EXPECT_EQ(rm.prefetch(0).action, Action::kHit);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(rm.release(0).empty());
  EXPECT_EQ(rm.pins(0), 0u);
  EXPECT_TRUE(rm.release(0).empty());  // unbalanced: ignored, no wrap
  EXPECT_EQ(rm.pins(0), 0u);
  EXPECT_EQ(rm.state(0), BlockState::kResident);

  // load_finished for a block that is not loading is ignored.
  EXPECT_TRUE(rm.load_finished(0, false).empty());
  EXPECT_EQ(rm.state(0), BlockState::kResident);
  EXPECT_EQ(rm.check_invariants(), "");
}

TEST(ResidencyManager, StaticSetIsTheFirstBlocksAdmittedWithinCapacity) {
  // 4 blocks of 1 page, budget 4 pages, ring 2: static capacity 2 pages.
  ResidencyManager rm(std::vector<uint64_t>(4, kPage), 4 * kPage, 4 * kPage, ResidencyPlan{2, 1, 1.0});
  (void)rm.prefetch(2);  // a prefetch admits too
  use(rm, 0);
  use(rm, 1);
  use(rm, 3);
  EXPECT_TRUE(rm.is_static(2));
  EXPECT_TRUE(rm.is_static(0));
  EXPECT_FALSE(rm.is_static(1));
  EXPECT_FALSE(rm.is_static(3));
  EXPECT_EQ(rm.static_bytes(), 2 * kPage);
}

TEST(ResidencyManager, FailedLoadFreesTheSlotAndKeepsThePins) {
  ResidencyManager rm({kPage, kPage}, 4 * kPage, 4 * kPage, ResidencyPlan{2, 1, 1.0});
  const auto d = rm.acquire(0);
  ASSERT_EQ(d.action, Action::kLoad);
  EXPECT_TRUE(rm.is_static(0));
  EXPECT_EQ(rm.acquire(0).action, Action::kInFlight);  // a second waiter
  EXPECT_TRUE(rm.load_finished(0, false).empty());
  EXPECT_EQ(rm.state(0), BlockState::kOnDisk);
  EXPECT_FALSE(rm.slot_offset(0).has_value());
  EXPECT_FALSE(rm.is_static(0));
  EXPECT_EQ(rm.static_bytes(), 0u);
  EXPECT_EQ(rm.pins(0), 2u);
  EXPECT_EQ(held(rm), 0u);
  EXPECT_EQ(rm.check_invariants(), "");
  // The retry reserves again (and pins once more); the engine releases every pin.
  const auto retry = rm.acquire(0);
  EXPECT_EQ(retry.action, Action::kLoad);
  EXPECT_EQ(rm.pins(0), 3u);
  EXPECT_TRUE(rm.load_finished(0, true).empty());
  for (int i = 0; i < 3; ++i) (void)rm.release(0);
  EXPECT_EQ(rm.pins(0), 0u);
  EXPECT_EQ(rm.state(0), BlockState::kResident);
}

// ---- eviction ----------------------------------------------------------------------------------------------------

TEST(ResidencyManagerEviction, NeverPicksPinnedLoadingOrStaticBlocks) {
  // 6 blocks of 1 page, budget 4 pages, ring 2: blocks 0 and 1 become static.
  ResidencyManager rm(std::vector<uint64_t>(6, kPage), 4 * kPage, 4 * kPage, ResidencyPlan{2, 1, 1.0});
  use(rm, 0);
  use(rm, 1);
  ASSERT_TRUE(rm.is_static(0) && rm.is_static(1));
  ASSERT_EQ(rm.acquire(2).action, Action::kLoad);  // pinned
  (void)rm.load_finished(2, true);
  ASSERT_EQ(rm.prefetch(3).action, Action::kLoad);  // loading, unpinned
  ASSERT_EQ(held(rm), 4 * kPage);

  const auto none = rm.acquire(4);
  EXPECT_EQ(none.action, Action::kNoRoom);
  EXPECT_TRUE(none.evicted.empty());
  EXPECT_EQ(rm.pins(4), 0u);  // kNoRoom does not pin
  EXPECT_EQ(rm.state(4), BlockState::kOnDisk);
  EXPECT_EQ(rm.state(3), BlockState::kLoading);
  EXPECT_EQ(rm.state(2), BlockState::kResident);

  (void)rm.load_finished(3, true);
  const auto take3 = rm.acquire(4);
  ASSERT_EQ(take3.action, Action::kLoad);
  EXPECT_EQ(take3.evicted, std::vector<size_t>{3});  // the only unpinned streaming block
  EXPECT_EQ(take3.slot_offset, *rm.slot_offset(4));
  (void)rm.load_finished(4, true);

  EXPECT_EQ(rm.acquire(5).action, Action::kNoRoom);  // 2 and 4 pinned, 0 and 1 static
  (void)rm.release(2);
  const auto take2 = rm.acquire(5);
  ASSERT_EQ(take2.action, Action::kLoad);
  EXPECT_EQ(take2.evicted, std::vector<size_t>{2});
  EXPECT_EQ(rm.state(0), BlockState::kResident);
  EXPECT_EQ(rm.state(1), BlockState::kResident);
  EXPECT_EQ(rm.check_invariants(), "");
}

TEST(ResidencyManagerEviction, NoRoomWhenEverythingIsPinnedThenReleaseMakesRoom) {
  ResidencyManager rm(std::vector<uint64_t>(3, kPage), 2 * kPage, 2 * kPage, ResidencyPlan{2, 1, 0.0});
  ASSERT_EQ(rm.acquire(0).action, Action::kLoad);
  ASSERT_EQ(rm.acquire(1).action, Action::kLoad);
  (void)rm.load_finished(0, true);
  (void)rm.load_finished(1, true);
  EXPECT_EQ(rm.acquire(2).action, Action::kNoRoom);
  EXPECT_EQ(rm.prefetch(2).action, Action::kNoRoom);
  EXPECT_EQ(rm.acquire(2).action, Action::kNoRoom);  // retrying changes nothing
  EXPECT_TRUE(rm.release(0).empty());
  const auto d = rm.acquire(2);
  EXPECT_EQ(d.action, Action::kLoad);
  EXPECT_EQ(d.evicted, std::vector<size_t>{0});
  EXPECT_EQ(d.slot_offset, 0u);
  EXPECT_EQ(rm.state(0), BlockState::kOnDisk);
  EXPECT_EQ(rm.check_invariants(), "");
}

TEST(ResidencyManagerEviction, NoRoomEvictsNothingEvenWhenSomeVictimsExist) {
  // Block 2 needs 2 pages; 1 is pinned, so evicting 0 would not be enough: 0 must stay.
  ResidencyManager rm({kPage, kPage, 2 * kPage}, 2 * kPage, 2 * kPage, ResidencyPlan{2, 1, 0.0});
  use(rm, 0);
  ASSERT_EQ(rm.acquire(1).action, Action::kLoad);
  (void)rm.load_finished(1, true);
  const auto d = rm.acquire(2);
  EXPECT_EQ(d.action, Action::kNoRoom);
  EXPECT_TRUE(d.evicted.empty());
  EXPECT_EQ(rm.state(0), BlockState::kResident);
  EXPECT_EQ(rm.prefetch(2).action, Action::kNoRoom);
  EXPECT_EQ(rm.state(0), BlockState::kResident);
  (void)rm.release(1);
  const auto ok = rm.acquire(2);
  EXPECT_EQ(ok.action, Action::kLoad);
  EXPECT_EQ(as_set(ok.evicted), (std::set<size_t>{0, 1}));
  EXPECT_EQ(rm.check_invariants(), "");
}

TEST(ResidencyManagerEviction, LeastRecentlyUsedWithoutAnOrder) {
  ResidencyManager rm(std::vector<uint64_t>(4, kPage), 3 * kPage, 3 * kPage, ResidencyPlan{3, 2, 0.0});
  use(rm, 0);
  use(rm, 1);
  use(rm, 2);
  use(rm, 0);  // 1 is now the least recently used
  const auto d = rm.acquire(3);
  ASSERT_EQ(d.action, Action::kLoad);
  EXPECT_EQ(d.evicted, std::vector<size_t>{1});
}

TEST(ResidencyManagerEviction, FurthestNextUseWithAnOrderAndUnorderedBlocksFirst) {
  ResidencyManager rm(std::vector<uint64_t>(6, kPage), 3 * kPage, 3 * kPage, ResidencyPlan{3, 2, 0.0});
  rm.set_order({0, 1, 2, 3});  // 4 and 5 never appear
  use(rm, 0);
  use(rm, 4);
  use(rm, 1);  // position 1; resident 0 (next use in 3), 4 (never), 1
  auto d = rm.acquire(2);  // position 2
  ASSERT_EQ(d.action, Action::kLoad);
  EXPECT_EQ(d.evicted, std::vector<size_t>{4});  // outside the order goes first, though recently used
  (void)rm.load_finished(2, true);
  (void)rm.release(2);
  // From position 3: 0 is next used in 1 access, 1 in 2, 2 in 3 -> 2 is furthest.
  d = rm.acquire(3);
  ASSERT_EQ(d.action, Action::kLoad);
  EXPECT_EQ(d.evicted, std::vector<size_t>{2});
  EXPECT_EQ(rm.check_invariants(), "");
}

TEST(ResidencyManagerEviction, PrefetchWithAnOrderSparesBlocksNeededSooner) {
  ResidencyManager rm(std::vector<uint64_t>(6, kPage), 3 * kPage, 3 * kPage, ResidencyPlan{3, 2, 0.0});
  rm.set_order({0, 1, 2, 3, 4, 5});
  use(rm, 0);
  use(rm, 1);
  use(rm, 2);  // position 2; next uses: 3->1, 4->2, 5->3, 0->4, 1->5, 2->6
  auto d = rm.prefetch(3);
  ASSERT_EQ(d.action, Action::kLoad);
  EXPECT_EQ(d.evicted, std::vector<size_t>{2});
  EXPECT_EQ(rm.pins(3), 0u);
  (void)rm.load_finished(3, true);
  d = rm.prefetch(4);
  ASSERT_EQ(d.action, Action::kLoad);
  EXPECT_EQ(d.evicted, std::vector<size_t>{1});
  (void)rm.load_finished(4, true);
  d = rm.prefetch(5);
  ASSERT_EQ(d.action, Action::kLoad);
  EXPECT_EQ(d.evicted, std::vector<size_t>{0});
  (void)rm.load_finished(5, true);
  // Resident 3, 4, 5 are all needed before 1: a prefetch of 1 must not displace them.
  d = rm.prefetch(1);
  EXPECT_EQ(d.action, Action::kNoRoom);
  EXPECT_TRUE(d.evicted.empty());
  EXPECT_EQ(rm.state(1), BlockState::kOnDisk);
  // A demand access of 1 (position 1) evicts the furthest from there: 5.
  d = rm.acquire(1);
  ASSERT_EQ(d.action, Action::kLoad);
  EXPECT_EQ(d.evicted, std::vector<size_t>{5});
}

TEST(ResidencyManagerEviction, PrefetchWithoutAnOrderSparesUnusedPrefetches) {
  ResidencyManager rm(std::vector<uint64_t>(5, kPage), 3 * kPage, 3 * kPage, ResidencyPlan{3, 2, 0.0});
  for (size_t b : {0, 1, 2}) {
    ASSERT_EQ(rm.prefetch(b).action, Action::kLoad);
    (void)rm.load_finished(b, true);
  }
  EXPECT_EQ(rm.prefetch(3).action, Action::kNoRoom);  // none of them was used yet
  use(rm, 1);
  auto d = rm.prefetch(3);
  ASSERT_EQ(d.action, Action::kLoad);
  EXPECT_EQ(d.evicted, std::vector<size_t>{1});
  // A demand access may evict an unused prefetch (least recently touched first).
  (void)rm.load_finished(3, true);
  d = rm.acquire(4);
  ASSERT_EQ(d.action, Action::kLoad);
  EXPECT_EQ(d.evicted, std::vector<size_t>{0});
}

TEST(ResidencyManagerEviction, PrefetchNeverEvictsStaticBlocks) {
  ResidencyManager rm(std::vector<uint64_t>(4, kPage), 3 * kPage, 3 * kPage, ResidencyPlan{2, 1, 1.0});
  use(rm, 0);  // static (capacity 1 page)
  use(rm, 1);
  use(rm, 2);
  ASSERT_TRUE(rm.is_static(0));
  const auto d = rm.prefetch(3);
  ASSERT_EQ(d.action, Action::kLoad);
  EXPECT_EQ(d.evicted, std::vector<size_t>{1});
  (void)rm.load_finished(3, true);
  (void)rm.acquire(3);
  (void)rm.release(3);
  // Only 0 (static) and 3 / 2 remain; 2 and 3 were used, so another prefetch takes 2, never 0.
  const auto again = rm.prefetch(1);
  ASSERT_EQ(again.action, Action::kLoad);
  EXPECT_EQ(again.evicted, std::vector<size_t>{2});
  EXPECT_EQ(rm.state(0), BlockState::kResident);
}

// ---- slots -------------------------------------------------------------------------------------------------------

// Arena = budget = 8 pages. A, B, C, D take 2 pages each; E needs 4 contiguous pages. A ring of 3 slots is the
// largest block (4 pages) plus two median ones (2 pages each): all 8 pages.
void pack_four_blocks(ResidencyManager& rm) {
  for (size_t b = 0; b < 4; ++b) {
    const auto d = rm.acquire(b);
    EXPECT_EQ(d.action, Action::kLoad);
    EXPECT_EQ(d.slot_offset, 2 * kPage * b);  // packed from 0
    (void)rm.load_finished(b, true);
    (void)rm.release(b);
  }
}

TEST(ResidencyManagerSlots, AFragmentedArenaEvictsOneContiguousWindowNotEveryBlockInPolicyOrder) {
  const std::vector<uint64_t> sizes = {2 * kPage, 2 * kPage, 2 * kPage, 2 * kPage, 4 * kPage};
  ResidencyManager rm(sizes, 8 * kPage, 8 * kPage, ResidencyPlan{3, 2, 0.0});
  pack_four_blocks(rm);
  // Recency A < C < B < D. Evicting in policy order until a hole appears would take A, C and B (A and C free 4
  // pages, not contiguous). Windows: [A B] ranks {0, 2}, [B C] {2, 1}, [C D] {1, 3}: [A B] and [B C] tie on their
  // worst victim and on bytes; the lower offset wins.
  use(rm, 2);
  use(rm, 1);
  use(rm, 3);
  const auto d = rm.acquire(4);
  ASSERT_EQ(d.action, Action::kLoad);
  EXPECT_EQ(d.evicted, (std::vector<size_t>{0, 1}));
  EXPECT_EQ(d.slot_offset, 0u);
  EXPECT_EQ(*rm.slot_offset(2), 4 * kPage);
  EXPECT_EQ(*rm.slot_offset(3), 6 * kPage);
  EXPECT_EQ(rm.check_invariants(), "");
  expect_disjoint_slots(rm, sizes, 8 * kPage);
}

TEST(ResidencyManagerSlots, TheWindowWhoseMostValuableVictimRanksLowestWinsOverTheLowestOffset) {
  const std::vector<uint64_t> sizes = {2 * kPage, 2 * kPage, 2 * kPage, 2 * kPage, 4 * kPage};
  ResidencyManager rm(sizes, 8 * kPage, 8 * kPage, ResidencyPlan{3, 2, 0.0});
  pack_four_blocks(rm);
  // Recency C < D < A < B: [C D] evicts the two least recently used blocks.
  use(rm, 2);
  use(rm, 3);
  use(rm, 0);
  use(rm, 1);
  const auto d = rm.acquire(4);
  ASSERT_EQ(d.action, Action::kLoad);
  EXPECT_EQ(d.evicted, (std::vector<size_t>{2, 3}));
  EXPECT_EQ(d.slot_offset, 4 * kPage);
  EXPECT_EQ(rm.state(0), BlockState::kResident);
  EXPECT_EQ(rm.state(1), BlockState::kResident);
  EXPECT_EQ(rm.check_invariants(), "");
  expect_disjoint_slots(rm, sizes, 8 * kPage);
}

TEST(ResidencyManagerPlan, OneOversizedBlockDoesNotEatTheStaticSet) {
  // Ten 1-page layers and one 4-page embedding, budget 10 pages, ring 2: the ring is 4 + 1 x 1 pages, so 5 pages
  // stay for the static set (sizing every ring slot by the embedding would leave 2).
  std::vector<uint64_t> sizes(10, kPage);
  sizes.push_back(4 * kPage);
  ResidencyManager rm(sizes, 10 * kPage, 10 * kPage, plan_for(MemoryPressureMode::kBalanced));
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t b = 0; b < sizes.size(); ++b) use(rm, b);
  }
  EXPECT_EQ(rm.static_bytes(), 5 * kPage);
  EXPECT_EQ(rm.check_invariants(), "");
}

TEST(ResidencyManagerSlots, FreedNeighboursCoalesce) {
  const std::vector<uint64_t> sizes = {kPage, kPage, kPage, 3 * kPage};
  ResidencyManager rm(sizes, 3 * kPage, 3 * kPage, ResidencyPlan{3, 2, 0.0});
  use(rm, 0);
  use(rm, 1);
  use(rm, 2);
  // Three single-page holes must merge into one 3-page range for block 3.
  const auto d = rm.acquire(3);
  ASSERT_EQ(d.action, Action::kLoad);
  EXPECT_EQ(as_set(d.evicted), (std::set<size_t>{0, 1, 2}));
  EXPECT_EQ(d.slot_offset, 0u);
  EXPECT_EQ(rm.check_invariants(), "");
}

TEST(ResidencyManagerSlots, MixedSizesStayDisjointUnderRandomTraffic) {
  std::mt19937_64 rng(7);
  std::vector<uint64_t> sizes;
  for (int i = 0; i < 24; ++i) sizes.push_back((1 + rng() % 5) * kPage);
  const uint64_t arena = 24 * kPage;
  ResidencyManager rm(sizes, arena, 16 * kPage, ResidencyPlan{3, 2, 0.3});
  std::vector<size_t> loading;
  for (int op = 0; op < 5000; ++op) {
    const size_t b = rng() % sizes.size();
    const int kind = static_cast<int>(rng() % 4);
    if (kind == 0) {
      const auto d = rm.acquire(b);
      if (d.action == Action::kLoad || d.action == Action::kInFlight) {
        (void)rm.load_finished(b, rng() % 8 != 0);
        loading.erase(std::remove(loading.begin(), loading.end(), b), loading.end());
      }
      if (d.action != Action::kNoRoom) (void)rm.release(b);
    } else if (kind == 1) {
      if (rm.prefetch(b).action == Action::kLoad) loading.push_back(b);
    } else if (kind == 2 && !loading.empty()) {
      const size_t i = rng() % loading.size();
      (void)rm.load_finished(loading[i], true);
      loading.erase(loading.begin() + static_cast<std::ptrdiff_t>(i));
    } else if (op % 500 == 0) {
      std::vector<size_t> order(sizes.size());
      for (size_t i = 0; i < order.size(); ++i) order[i] = (i * 7) % order.size();
      rm.set_order(order);
    }
    ASSERT_EQ(rm.check_invariants(), "") << "op " << op;
    ASSERT_LE(held(rm), 16 * kPage);
  }
  expect_disjoint_slots(rm, sizes, arena);
}

// ---- budget changes ----------------------------------------------------------------------------------------------

TEST(ResidencyManagerBudget, ShrinkEvictsUnpinnedAndPinnedLeaveOnRelease) {
  const std::vector<uint64_t> sizes(8, kPage);
  ResidencyManager rm(sizes, 8 * kPage, 8 * kPage, ResidencyPlan{2, 1, 1.0});
  for (size_t b = 0; b < 8; ++b) use(rm, b);
  EXPECT_EQ(rm.static_bytes(), 6 * kPage);  // 0..5
  ASSERT_EQ(rm.acquire(7).action, Action::kHit);  // keep 7 pinned

  // Budget 4 pages: static capacity 2 pages. 0..3 (least recently used) are demoted, then streaming blocks
  // leave in LRU order until 4 pages are held.
  const auto evicted = rm.set_budget(4 * kPage);
  EXPECT_EQ(evicted, (std::vector<size_t>{0, 1, 2, 3}));
  EXPECT_EQ(rm.budget_bytes(), 4 * kPage);
  EXPECT_EQ(held(rm), 4 * kPage);
  EXPECT_EQ(rm.static_bytes(), 2 * kPage);
  EXPECT_TRUE(rm.is_static(4) && rm.is_static(5));
  EXPECT_EQ(rm.state(7), BlockState::kResident);
  EXPECT_EQ(rm.check_invariants(), "");

  // Budget 1 page while 6 and 7 are pinned: everything unpinned leaves, the pinned stay until released.
  ASSERT_EQ(rm.acquire(6).action, Action::kHit);
  const auto evicted2 = rm.set_budget(kPage);
  EXPECT_EQ(as_set(evicted2), (std::set<size_t>{4, 5}));
  EXPECT_EQ(rm.static_bytes(), 0u);
  EXPECT_EQ(held(rm), 2 * kPage);
  EXPECT_EQ(rm.check_invariants(), "");
  EXPECT_EQ(rm.acquire(0).action, Action::kNoRoom);
  EXPECT_EQ(rm.release(7), std::vector<size_t>{7});  // over budget: leaves at once
  EXPECT_EQ(rm.state(7), BlockState::kOnDisk);
  EXPECT_TRUE(rm.release(6).empty());  // fits now
  EXPECT_EQ(held(rm), kPage);

  // Shrinking while a load is in flight evicts the unpinned resident block; the load stays.
  EXPECT_TRUE(rm.set_budget(2 * kPage).empty());
  ASSERT_EQ(rm.prefetch(1).action, Action::kLoad);
  EXPECT_EQ(rm.set_budget(kPage), std::vector<size_t>{6});
  EXPECT_EQ(rm.state(1), BlockState::kLoading);
  EXPECT_TRUE(rm.load_finished(1, true).empty());
  EXPECT_EQ(held(rm), kPage);
  EXPECT_EQ(rm.check_invariants(), "");
}

TEST(ResidencyManagerBudget, LoadFinishingOverBudgetIsEvicted) {
  ResidencyManager rm(std::vector<uint64_t>(3, kPage), 3 * kPage, 3 * kPage, ResidencyPlan{3, 2, 0.0});
  ASSERT_EQ(rm.prefetch(0).action, Action::kLoad);
  ASSERT_EQ(rm.prefetch(1).action, Action::kLoad);
  EXPECT_TRUE(rm.set_budget(kPage).empty());  // both loading: nothing can leave yet
  EXPECT_EQ(held(rm), 2 * kPage);
  EXPECT_EQ(rm.load_finished(0, true), std::vector<size_t>{0});
  EXPECT_TRUE(rm.load_finished(1, true).empty());  // 1 page held: fits
  EXPECT_EQ(rm.state(1), BlockState::kResident);
  EXPECT_EQ(rm.check_invariants(), "");
}

TEST(ResidencyManagerBudget, GrowFillsTheStaticSetWithoutRereading) {
  const size_t n = 8;
  ResidencyManager rm(std::vector<uint64_t>(n, kPage), 8 * kPage, 4 * kPage, ResidencyPlan{2, 1, 1.0});
  for (size_t b = 0; b < n; ++b) use(rm, b);
  EXPECT_EQ(rm.static_bytes(), 2 * kPage);
  EXPECT_TRUE(rm.set_budget(8 * kPage).empty());
  EXPECT_EQ(rm.budget_bytes(), 8 * kPage);
  ASSERT_FALSE(rm.is_static(7));
  ASSERT_EQ(rm.acquire(7).action, Action::kHit);  // still resident: joins the static set on its next use
  EXPECT_TRUE(rm.is_static(7));
  (void)rm.release(7);
  // Resident streaming blocks join the static set when next used; missing ones are admitted as static.
  uint64_t loads = 0;
  for (int pass = 0; pass < 3; ++pass) {
    for (size_t b = 0; b < n; ++b) {
      const auto d = rm.acquire(b);
      ASSERT_NE(d.action, Action::kNoRoom);
      if (d.action == Action::kLoad) {
        ++loads;
        (void)rm.load_finished(b, true);
      }
      (void)rm.release(b);
    }
  }
  EXPECT_EQ(rm.static_bytes(), 6 * kPage);
  EXPECT_LE(loads, n);  // only the first pass after growing reads, and not the blocks still resident
  EXPECT_EQ(held(rm), 8 * kPage);
}

TEST(ResidencyManagerBudget, RejectsImpossibleBudgets) {
  ResidencyManager rm({2 * kPage, kPage}, 8 * kPage, 4 * kPage, ResidencyPlan{2, 1, 1.0});
  EXPECT_THROW((void)rm.set_budget(kPage), ConfigError);       // below the largest block
  EXPECT_THROW((void)rm.set_budget(9 * kPage), ConfigError);   // above the arena
  EXPECT_EQ(rm.budget_bytes(), 4 * kPage);
  EXPECT_TRUE(rm.set_budget(2 * kPage).empty());
}

// ---- presets -----------------------------------------------------------------------------------------------------

TEST(ResidencyPlanPresets, DifferAsDocumented) {
  const ResidencyPlan conservative = plan_for(MemoryPressureMode::kConservative);
  const ResidencyPlan balanced = plan_for(MemoryPressureMode::kBalanced);
  const ResidencyPlan aggressive = plan_for(MemoryPressureMode::kAggressive);
  for (const ResidencyPlan& plan : {conservative, balanced, aggressive}) {
    EXPECT_GE(plan.ring_slots, plan.max_lookahead + 1);  // block in use + blocks in flight fit in the ring
    EXPECT_GE(plan.max_lookahead, 1u);
  }
  EXPECT_LE(conservative.max_lookahead, balanced.max_lookahead);
  EXPECT_LT(balanced.max_lookahead, aggressive.max_lookahead);
  EXPECT_EQ(balanced.ring_slots, 2u);  // the smallest ring: every deeper slot is one more block read per pass
  EXPECT_LT(conservative.static_fraction, 1.0);
  EXPECT_EQ(balanced.static_fraction, 1.0);
  EXPECT_EQ(aggressive.static_fraction, 1.0);
  const ResidencyPlan defaults;
  EXPECT_EQ(defaults.ring_slots, balanced.ring_slots);
  EXPECT_EQ(defaults.max_lookahead, balanced.max_lookahead);
  EXPECT_EQ(defaults.static_fraction, balanced.static_fraction);

  // 20 blocks, budget 10: conservative keeps static 0.5 x (10 - 2) = 4 blocks and holds at most 4 + 2 = 6 (headroom);
  // balanced (ring 2) keeps 8 and aggressive (ring 5) 5, and both fill the budget.
  struct Expect {
    ResidencyPlan plan;
    uint64_t static_blocks;
    uint64_t max_held_blocks;
  };
  for (const Expect& e : {Expect{conservative, 4, 6}, Expect{balanced, 8, 10}, Expect{aggressive, 5, 10}}) {
    ResidencyManager rm(std::vector<uint64_t>(20, kMiB), 10 * kMiB, 10 * kMiB, e.plan);
    uint64_t max_held = 0;
    for (int pass = 0; pass < 2; ++pass) {
      for (size_t b = 0; b < 20; ++b) {
        use(rm, b);
        max_held = std::max(max_held, held(rm));
      }
    }
    EXPECT_EQ(rm.static_bytes(), e.static_blocks * kMiB) << "ring " << e.plan.ring_slots;
    EXPECT_EQ(max_held, e.max_held_blocks * kMiB) << "ring " << e.plan.ring_slots;
  }
}

// ---- threads -----------------------------------------------------------------------------------------------------

TEST(ResidencyManagerThreads, EightThreadsKeepEveryInvariant) {
  std::mt19937_64 seed_rng(42);
  std::vector<uint64_t> sizes;
  for (int i = 0; i < 16; ++i) sizes.push_back((1 + seed_rng() % 4) * kPage);
  const uint64_t arena = 40 * kPage;
  const uint64_t big_budget = 24 * kPage;
  const uint64_t small_budget = 12 * kPage;
  ResidencyManager rm(sizes, arena, big_budget, ResidencyPlan{3, 2, 0.5});
  rm.set_order({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15});

  std::atomic<bool> done{false};
  std::atomic<int> failures{0};
  std::string first_failure;
  std::mutex failure_mutex;
  const auto fail = [&](const std::string& what) {
    if (failures.fetch_add(1) == 0) {
      std::lock_guard lock(failure_mutex);
      first_failure = what;
    }
  };

  std::thread checker([&] {
    while (!done.load()) {
      const std::string why = rm.check_invariants();
      if (!why.empty()) fail("checker: " + why);
      std::this_thread::yield();
    }
  });

  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(1000 + static_cast<uint64_t>(t));
      std::vector<size_t> pinned;   // pins this thread holds
      std::vector<size_t> loading;  // loads this thread reserved and must finish
      for (int op = 0; op < 3000; ++op) {
        const size_t b = rng() % sizes.size();
        const int kind = static_cast<int>(rng() % 10);
        if (kind < 3 && pinned.size() < 2) {
          const auto d = rm.acquire(b);
          if (d.action != Action::kNoRoom) pinned.push_back(b);
          if (d.action == Action::kLoad) loading.push_back(b);
          for (size_t e : d.evicted) {
            if (e == b) fail("evicted the acquired block");
          }
        } else if (kind < 5) {
          const auto d = rm.prefetch(b);
          if (d.action == Action::kLoad) loading.push_back(b);
        } else if (kind < 7 && !loading.empty()) {
          const size_t i = rng() % loading.size();
          (void)rm.load_finished(loading[i], rng() % 10 != 0);
          loading.erase(loading.begin() + static_cast<std::ptrdiff_t>(i));
        } else if (kind < 9 && !pinned.empty()) {
          const size_t i = rng() % pinned.size();
          if (rm.pins(pinned[i]) == 0) fail("pinned block with no pins");
          (void)rm.release(pinned[i]);
          pinned.erase(pinned.begin() + static_cast<std::ptrdiff_t>(i));
        } else if (t == 0 && op % 100 == 0) {
          (void)rm.set_budget(op % 200 == 0 ? small_budget : big_budget);
        }
      }
      for (size_t b : loading) (void)rm.load_finished(b, true);
      for (size_t b : pinned) (void)rm.release(b);
    });
  }
  for (auto& thread : threads) thread.join();
  done = true;
  checker.join();
  EXPECT_EQ(failures.load(), 0) << first_failure;

  EXPECT_EQ(rm.check_invariants(), "");
  uint64_t resident = 0;
  for (size_t b = 0; b < sizes.size(); ++b) {
    EXPECT_EQ(rm.pins(b), 0u) << "block " << b;
    EXPECT_NE(rm.state(b), BlockState::kLoading) << "block " << b;
    if (rm.state(b) == BlockState::kResident) resident += sizes[b];
  }
  EXPECT_EQ(rm.resident_bytes(), resident);
  EXPECT_EQ(rm.in_flight_bytes(), 0u);
  EXPECT_LE(resident, rm.budget_bytes());
  expect_disjoint_slots(rm, sizes, arena);
}

}  // namespace
}  // namespace tensorstream
