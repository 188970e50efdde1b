// Prefetcher: decides which blocks to start loading ahead of use.
//
//   NONE        nothing; every block loads on demand.
//   NEXT_LAYER  the next `max_lookahead` blocks in execution order (block index order until one pass was seen).
//   ADAPTIVE    learns the order during the first pass, including blocks that only some passes use (each block
//               keeps its observed successors with counts; besides the most frequent successor, every successor
//               seen at least half as often as it is prefetched too), and sets the lookahead from measured load time
//               against compute time per block so data arrives just in time: lookahead = ceil(load / compute),
//               within [1, max_lookahead]. And it checks that prefetching pays at all: a block in flight holds
//               memory, so under a tight budget prefetching can read more than it overlaps (issue #16: the optimum
//               for 4 layers of 8 is 4.53 layers read per pass without prefetch and 5.30 with one block in flight).
//               8 passes after the order is known it times two passes with prefetch and two without (the time
//               from a pass's first access to its last, so idle time between passes does not count), keeps
//               prefetch off when that was more than 3 % faster, and checks again after 16 passes, doubling the
//               interval (up to 256) while the answer stays the same. Short runs (a few tokens) are never checked:
//               they could not win back what a check costs. A pass without prefetch that takes 1.25x the best pass
//               with it ends the check at once, which bounds what a check costs when prefetch clearly wins. Passes
//               under 100 ms are not compared (prefetch stays on): their noise exceeds the difference looked for.
//
// Every strategy records the order (NONE too, so the engine can hand it to the ResidencyManager).
//
// The engine asks the ResidencyManager for room before each prefetch, so the budget is never exceeded.
//
// Thread-safety: all methods are safe from any thread (internal mutex).
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

#include "tensorstream/config.hpp"

namespace tensorstream {

class Prefetcher {
 public:
  // `clock` (monotonic nanoseconds) times ADAPTIVE's passes; tests pass their own.
  using Clock = uint64_t (*)();
  Prefetcher(PrefetchStrategy strategy, size_t num_blocks, uint32_t max_lookahead, Clock clock = nullptr);

  // Records a demand access of `block` and returns the blocks to prefetch now, nearest first (no duplicates,
  // never `block` itself).
  [[nodiscard]] std::vector<size_t> on_access(size_t block);
  void on_load_time(size_t block, uint64_t ns);     // read + verify + decode of one block
  void on_compute_time(size_t block, uint64_t ns);  // time between acquire and release of one block

  // The execution order of one pass, once a pass was seen (the first block accessed again closes a pass).
  [[nodiscard]] bool order_known() const;
  [[nodiscard]] std::vector<size_t> learned_order() const;
  // The learned order and the index in it of the latest access (SIZE_MAX when not placed yet), read together.
  [[nodiscard]] std::pair<std::vector<size_t>, size_t> learned_order_and_position() const;
  [[nodiscard]] uint32_t lookahead() const;  // 0 while ADAPTIVE found prefetching slower (or times it off)
  // ADAPTIVE: whether prefetch is off because passes without it were faster (false while being checked again).
  [[nodiscard]] bool prefetch_off() const;
  [[nodiscard]] uint64_t prefetch_checks() const;  // checks of prefetch-on against prefetch-off finished so far
  [[nodiscard]] PrefetchStrategy strategy() const noexcept { return strategy_; }
  void set_max_lookahead(uint32_t max_lookahead);

 private:
  struct Successor {
    size_t block;
    uint64_t count;
  };
  // ADAPTIVE's check of prefetch on against off: which passes it is timing.
  enum class CheckStage { kWaitingForOrder, kTimingOn, kTimingOff, kSettled };

  std::vector<size_t> predict_locked(size_t block) const;
  uint32_t lookahead_locked() const;
  void on_pass_end_locked(uint64_t pass_ns);
  void settle_locked(bool off);

  mutable std::mutex mutex_;
  PrefetchStrategy strategy_;
  size_t num_blocks_;
  uint32_t max_lookahead_;
  std::vector<std::vector<Successor>> successors_;
  std::vector<uint64_t> visits_;
  std::vector<size_t> current_pass_;
  std::vector<size_t> learned_order_;
  bool order_known_ = false;
  size_t first_block_ = SIZE_MAX;
  bool has_previous_ = false;
  size_t previous_ = 0;
  double load_ns_avg_ = 0;     // exponentially weighted averages per block access
  double compute_ns_avg_ = 0;
  uint64_t load_samples_ = 0;
  uint64_t compute_samples_ = 0;
  size_t order_position_ = SIZE_MAX;  // index in learned_order_ of the last access (NEXT_LAYER)

  Clock clock_;
  uint64_t pass_first_ns_ = 0;  // clock at this pass's first access (ADAPTIVE only)
  uint64_t pass_last_ns_ = 0;   // ... and at its latest access
  CheckStage stage_ = CheckStage::kWaitingForOrder;
  uint32_t stage_passes_ = 0;
  uint64_t best_on_ns_ = 0;   // fastest timed pass with prefetch on in this check (0: none yet)
  uint64_t best_off_ns_ = 0;  // ... with prefetch off
  bool off_ = false;          // prefetch off (settled, or while timing it off)
  bool settled_off_ = false;  // the last check's answer
  uint32_t passes_until_check_ = 0;
  uint32_t check_interval_ = 0;  // 0 until the first check ends
  uint64_t checks_ = 0;
};

}  // namespace tensorstream
