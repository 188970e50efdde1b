// ResidencyManager: which blocks hold a slot of the arena, under a byte budget, and which block gives its slot up
// when another needs one. Pure bookkeeping: it never does I/O and never blocks; the engine acts on its decisions.
//
// Policy (DESIGN.md §6). Forward passes repeat the same order, under which LRU evicts exactly the block needed
// next. Instead, blocks admitted while the static set has room stay resident for good (the static resident set);
// the remaining blocks share a streaming ring of `ring_slots` slots, the least recently used giving its slot up.
// For a cyclic order of N equal blocks with room for K, every pass after the first therefore loads exactly
// N - (K - ring_slots) blocks (the static set holds K - ring_slots of them). Once the order is known (set_order),
// the victim is the unpinned block whose next use is furthest away, static or not: Belady's choice, which on equal
// blocks reads exactly the offline optimum (benchmarks/residency_optimum.py; a prefetch still never evicts a
// block needed no later than the one it loads).
//
// Sizes are counted as slot sizes: each block's bytes rounded up to 4096 (store blocks already are), and every slot
// offset is 4096-aligned. The ring is sized as the largest block plus (ring_slots - 1) median-sized blocks, so one
// oversized block (an embedding) does not eat the static set. Held bytes (resident + loading) never exceed
// min(budget, static capacity + ring); with static_fraction < 1 that leaves headroom under the budget (plan_for).
//
// Thread-safety: every method is safe from any thread (one internal mutex, never held during I/O).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "tensorstream/config.hpp"

namespace tensorstream {

enum class BlockState : uint8_t { kOnDisk, kLoading, kResident };

// What memory_pressure_mode means in numbers.
struct ResidencyPlan {
  uint32_t ring_slots = 2;        // streaming slots: the block in use and max_lookahead in flight (= kBalanced)
  uint32_t max_lookahead = 1;     // blocks the prefetcher may keep in flight
  double static_fraction = 1.0;   // share of (budget - ring) the static set may fill
};
[[nodiscard]] ResidencyPlan plan_for(MemoryPressureMode mode) noexcept;

class ResidencyManager {
 public:
  // block_bytes: slot size of each block. arena_bytes: memory the caller owns for slots; budget_bytes (<= arena)
  // caps what is held at once. Throws ConfigError if the budget cannot hold the largest block.
  ResidencyManager(std::vector<uint64_t> block_bytes, uint64_t arena_bytes, uint64_t budget_bytes, ResidencyPlan plan);

  enum class Action : uint8_t {
    kHit,       // resident: use it
    kInFlight,  // a load is under way: wait for it
    kLoad,      // a slot was reserved at slot_offset: the caller loads the block, then calls load_finished
    kNoRoom,    // nothing can be evicted now (all pinned or loading): retry after a release or load_finished
  };
  struct Decision {
    Action action = Action::kNoRoom;
    uint64_t slot_offset = 0;
    std::vector<size_t> evicted;  // blocks that lost their slots to make room
  };

  // Demand access: pins the block (unless kNoRoom) and records the access for the eviction policy.
  [[nodiscard]] Decision acquire(size_t block);
  // Speculative access: never pins, never evicts a static block or one needed sooner than `block`.
  [[nodiscard]] Decision prefetch(size_t block);
  // Unpins. Returns blocks evicted now: while the held bytes exceed the budget (after set_budget shrank it below
  // what pinned blocks held), an unpinned block leaves at once, the released one included.
  [[nodiscard]] std::vector<size_t> release(size_t block);
  // A load reserved by kLoad completed (ok) or failed (slot freed, block back on disk, pins unchanged: the
  // engine releases them). Returns blocks evicted because the held bytes exceed a shrunk budget (as release).
  // A call for a block that is not loading is ignored.
  [[nodiscard]] std::vector<size_t> load_finished(size_t block, bool ok);

  // Evicts `block` now if it is resident and unpinned (its bytes went bad: a mapped view whose file shrank), and
  // says whether it did.
  [[nodiscard]] bool discard(size_t block);
  // Shrinking evicts unpinned resident blocks (returned; streaming first, then static) until the held bytes fit;
  // pinned ones leave when released. Static blocks beyond the new static capacity become streaming first. Growing
  // evicts nothing: blocks admitted later, and held blocks on their next acquire, fill the larger static set.
  // Throws ConfigError if the budget is below the largest block or above the arena.
  [[nodiscard]] std::vector<size_t> set_budget(uint64_t budget_bytes);
  // The learned execution order of one pass (block indices; blocks may be absent or repeat).
  void set_order(std::vector<size_t> order);
  // Called, under the manager's lock, with each arena range [offset, offset + bytes) that an eviction or a failed
  // load freed and that the same decision did not take again; the engine hands such pages of a host arena back to
  // the OS. Set it before the first access. Must not call back into the manager.
  using ReleaseHook = std::function<void(uint64_t offset, uint64_t bytes)>;
  void set_release_hook(ReleaseHook hook);

  [[nodiscard]] BlockState state(size_t block) const;
  [[nodiscard]] uint32_t pins(size_t block) const;
  [[nodiscard]] std::optional<uint64_t> slot_offset(size_t block) const;
  [[nodiscard]] bool is_static(size_t block) const;
  [[nodiscard]] uint64_t resident_bytes() const;   // state kResident
  [[nodiscard]] uint64_t in_flight_bytes() const;  // state kLoading
  [[nodiscard]] uint64_t budget_bytes() const;
  [[nodiscard]] uint64_t static_bytes() const;
  [[nodiscard]] size_t num_blocks() const noexcept { return blocks_.size(); }
  [[nodiscard]] const ResidencyPlan& plan() const noexcept { return plan_; }
  // Checks every internal invariant under the lock (slots inside the arena and disjoint, free list sorted,
  // coalesced and disjoint from slots, byte counters, held <= limit unless every resident block is pinned).
  // Returns "" when all hold, else what broke. For tests and debugging.
  [[nodiscard]] std::string check_invariants() const;

 private:
  struct Block {
    uint64_t bytes = 0;
    BlockState state = BlockState::kOnDisk;
    uint32_t pins = 0;
    uint64_t slot = 0;
    bool is_static = false;
    uint64_t last_use = 0;  // access clock value
    bool used_since_load = false;  // a demand access since the slot was reserved (prefetch victims need one)
  };
  struct FreeRange {
    uint64_t offset;
    uint64_t bytes;
  };
  // A contiguous range of the arena that can hold a block once `victims` leave (best_window).
  struct Window {
    uint64_t offset;
    size_t worst_rank;       // 1 + the highest position in the victim ranking among `victims`; 0: none
    uint64_t evicted_bytes;
    std::vector<size_t> victims;
  };

  Decision admit(size_t block, bool pin, bool speculative);
  std::optional<Window> best_window(uint64_t need, const std::vector<size_t>& ranked, size_t forced) const;
  bool take_range(uint64_t offset, uint64_t bytes);  // carve a known-free range out of free_
  void check_block(size_t block) const;
  void touch(size_t block);                 // a demand access: clock, used flag, static promotion
  void advance_position(size_t block);      // position_ to the next occurrence of block in order_
  void drop(size_t block);                  // slot already returned to the free list: block back on disk
  void free_slot(uint64_t offset, uint64_t bytes);  // back to free_, noted in released_ for the release hook
  void evict(size_t block);                 // free_slot, then drop
  void flush_released();                    // calls release_hook_ with the parts of released_ still free
  std::vector<size_t> victims(size_t for_block, bool speculative) const;  // in eviction order
  void rank(std::vector<size_t>& candidates) const;                        // sorts into eviction order
  std::vector<size_t> trim_to_limit();      // evicts unpinned resident blocks while held > held_limit()
  uint64_t distance_to_next_use(size_t block) const;  // in accesses, from the current position
  uint64_t held_bytes() const;  // resident + loading
  uint64_t ring_bytes() const;  // the largest block plus (ring_slots - 1) typical ones
  uint64_t held_limit() const;  // min(budget, static capacity + ring)
  void recompute_static_capacity();

  mutable std::mutex mutex_;
  std::vector<Block> blocks_;
  std::vector<FreeRange> free_;  // sorted by offset, coalesced
  std::vector<FreeRange> released_;  // freed during the current decision (for release_hook_)
  ReleaseHook release_hook_;
  uint64_t arena_bytes_;
  uint64_t budget_bytes_;
  uint64_t static_capacity_ = 0;
  uint64_t static_bytes_ = 0;
  uint64_t max_block_bytes_ = 0;
  uint64_t typical_block_bytes_ = 0;  // median block size
  uint64_t resident_bytes_ = 0;
  uint64_t loading_bytes_ = 0;
  ResidencyPlan plan_;
  uint64_t clock_ = 0;
  std::vector<size_t> order_;                 // learned order (one pass)
  std::vector<std::vector<size_t>> order_positions_;  // block -> positions in order_
  size_t position_ = 0;                       // index in order_ of the last demand access
  size_t last_block_ = SIZE_MAX;              // the last demand access (places position_ when the order changes)
};

}  // namespace tensorstream
