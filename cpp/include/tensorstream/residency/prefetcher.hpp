// Prefetcher: decides which blocks to start loading ahead of use.
//
//   NONE        nothing; every block loads on demand.
//   NEXT_LAYER  the next `max_lookahead` blocks in execution order (block index order until one pass was seen).
//   ADAPTIVE    learns the order during the first pass, including blocks that only some passes use (each block
//               keeps its observed successors with counts; besides the most frequent successor, every successor
//               seen at least half as often as it is prefetched too), and sets the lookahead from measured load time
//               against compute time per block so data arrives just in time: lookahead = ceil(load / compute),
//               within [1, max_lookahead].
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
  Prefetcher(PrefetchStrategy strategy, size_t num_blocks, uint32_t max_lookahead);

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
  [[nodiscard]] uint32_t lookahead() const;
  [[nodiscard]] PrefetchStrategy strategy() const noexcept { return strategy_; }
  void set_max_lookahead(uint32_t max_lookahead);

 private:
  struct Successor {
    size_t block;
    uint64_t count;
  };
  std::vector<size_t> predict_locked(size_t block) const;
  uint32_t lookahead_locked() const;

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
};

}  // namespace tensorstream
