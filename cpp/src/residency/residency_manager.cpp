// ResidencyManager: slots of the arena, the static resident set, the streaming ring and eviction (DESIGN.md §6).
//
// Everything here is bookkeeping under one mutex: no I/O, no waiting. Admission is computed on a copy of the free
// list and committed only when it succeeds, so a kNoRoom answer never evicts anything.
#include "tensorstream/residency/residency_manager.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "tensorstream/error.hpp"

namespace tensorstream {

namespace {

// Slots start on 4 KiB boundaries: O_DIRECT, cuFile and io_uring fixed buffers need aligned destinations, and
// store blocks are laid out on the same boundary (DESIGN.md §5), so aligning costs nothing in practice.
constexpr uint64_t kSlotAlignment = 4096;
constexpr uint64_t kInfinity = std::numeric_limits<uint64_t>::max();

uint64_t saturating_add(uint64_t a, uint64_t b) { return a > kInfinity - b ? kInfinity : a + b; }
uint64_t saturating_mul(uint64_t a, uint64_t b) { return (b != 0 && a > kInfinity / b) ? kInfinity : a * b; }

uint64_t slot_size(uint64_t bytes, size_t block) {
  if (bytes > kInfinity - (kSlotAlignment - 1)) {
    throw ConfigError("block_bytes", "block " + std::to_string(block) + " is too large (" + std::to_string(bytes) +
                                         " bytes)");
  }
  return (bytes + kSlotAlignment - 1) / kSlotAlignment * kSlotAlignment;
}

// Returns [offset, offset + bytes) to a sorted free list, coalescing with both neighbours.
template <class FreeList>
void give_back(FreeList& free, uint64_t offset, uint64_t bytes) {
  if (bytes == 0) return;
  auto it = std::lower_bound(free.begin(), free.end(), offset,
                             [](const auto& range, uint64_t value) { return range.offset < value; });
  it = free.insert(it, typename FreeList::value_type{offset, bytes});
  auto next = it + 1;
  if (next != free.end() && it->offset + it->bytes == next->offset) {
    it->bytes += next->bytes;
    free.erase(next);
  }
  if (it != free.begin()) {
    auto prev = it - 1;
    if (prev->offset + prev->bytes == it->offset) {
      prev->bytes += it->bytes;
      free.erase(it);
    }
  }
}

}  // namespace

// Presets for memory_pressure_mode. Two rules shape them:
//  * ring_slots >= max_lookahead + 1: the block in use plus every block the prefetcher keeps in flight must fit in
//    the streaming ring, otherwise the deepest prefetch never finds room (it may not evict what is needed sooner).
//  * every ring slot is one block the static set cannot keep, i.e. one more block read per pass
//    (N - (K - ring_slots)), so the ring is only as deep as the lookahead needs.
// conservative: the smallest ring (2, lookahead 1); the static set fills only half of what is left, and the held
//               bytes are capped at static capacity + ring, so half of (budget - ring) stays free as headroom for
//               activations and other allocations.
// balanced:     the smallest ring (2, lookahead 1) and the static set fills the rest: the budget is used in full.
//               One block in flight keeps the disk busy whenever a block takes longer to read than to compute,
//               which is what streaming usually means; every deeper slot costs one block read per pass. Measured
//               (benchmarks/generation.py, 3.2 GB Llama, 1.6 GB budget, cold NVMe-class virtual disk): ring 3 read
//               2.55 GB per token in 0.89 s, ring 2 read 2.23 GB in 0.82 s.
// aggressive:   deep lookahead (4) for storage whose latency exceeds several layers of compute, ring 5, and the
//               static set fills the rest of the budget.
ResidencyPlan plan_for(MemoryPressureMode mode) noexcept {
  switch (mode) {
    case MemoryPressureMode::kConservative:
      return ResidencyPlan{2, 1, 0.5};
    case MemoryPressureMode::kBalanced:
      return ResidencyPlan{2, 1, 1.0};
    case MemoryPressureMode::kAggressive:
      return ResidencyPlan{5, 4, 1.0};
  }
  return ResidencyPlan{3, 2, 1.0};
}

ResidencyManager::ResidencyManager(std::vector<uint64_t> block_bytes, uint64_t arena_bytes, uint64_t budget_bytes,
                                   ResidencyPlan plan)
    : arena_bytes_(arena_bytes), budget_bytes_(budget_bytes), plan_(plan) {
  if (plan_.ring_slots == 0) throw ConfigError("ring_slots", "must be at least 1");
  if (!(plan_.static_fraction >= 0.0 && plan_.static_fraction <= 1.0)) {
    throw ConfigError("static_fraction", "must be within [0, 1], got " + std::to_string(plan_.static_fraction));
  }
  blocks_.resize(block_bytes.size());
  order_positions_.resize(block_bytes.size());
  std::vector<uint64_t> sizes;
  for (size_t i = 0; i < block_bytes.size(); ++i) {
    blocks_[i].bytes = slot_size(block_bytes[i], i);
    max_block_bytes_ = std::max(max_block_bytes_, blocks_[i].bytes);
    sizes.push_back(blocks_[i].bytes);
  }
  if (!sizes.empty()) {  // the median: the size of a transformer layer in a model of layers plus a few odd blocks
    std::nth_element(sizes.begin(), sizes.begin() + static_cast<std::ptrdiff_t>(sizes.size() / 2), sizes.end());
    typical_block_bytes_ = sizes[sizes.size() / 2];
  }
  if (budget_bytes_ > arena_bytes_) {
    throw ConfigError("budget_bytes", std::to_string(budget_bytes_) + " exceeds the arena (" +
                                          std::to_string(arena_bytes_) + " bytes)");
  }
  if (max_block_bytes_ > budget_bytes_) {
    throw ConfigError("budget_bytes", std::to_string(budget_bytes_) + " cannot hold the largest block (" +
                                          std::to_string(max_block_bytes_) + " bytes)");
  }
  if (arena_bytes_ > 0) free_.push_back(FreeRange{0, arena_bytes_});
  recompute_static_capacity();
}

// ---- public ------------------------------------------------------------------------------------------------------

ResidencyManager::Decision ResidencyManager::acquire(size_t block) {
  std::lock_guard lock(mutex_);
  check_block(block);
  const size_t saved_position = position_;
  const size_t saved_last = last_block_;
  advance_position(block);  // victims are ranked from the access being served
  Block& b = blocks_[block];
  switch (b.state) {
    case BlockState::kResident:
    case BlockState::kLoading: {
      ++b.pins;
      touch(block);
      Decision decision;
      decision.action = b.state == BlockState::kResident ? Action::kHit : Action::kInFlight;
      decision.slot_offset = b.slot;
      return decision;
    }
    case BlockState::kOnDisk:
      break;
  }
  Decision decision = admit(block, /*pin=*/true, /*speculative=*/false);
  if (decision.action == Action::kNoRoom) {
    position_ = saved_position;  // the engine retries the same access: count it once
    last_block_ = saved_last;
  }
  return decision;
}

ResidencyManager::Decision ResidencyManager::prefetch(size_t block) {
  std::lock_guard lock(mutex_);
  check_block(block);
  const Block& b = blocks_[block];
  if (b.state != BlockState::kOnDisk) {
    Decision decision;
    decision.action = b.state == BlockState::kResident ? Action::kHit : Action::kInFlight;
    decision.slot_offset = b.slot;
    return decision;
  }
  return admit(block, /*pin=*/false, /*speculative=*/true);
}

std::vector<size_t> ResidencyManager::release(size_t block) {
  std::lock_guard lock(mutex_);
  check_block(block);
  Block& b = blocks_[block];
  if (b.pins == 0) return {};  // unbalanced release: ignored rather than wrapping the count
  --b.pins;
  b.last_use = ++clock_;  // in use until now: the most recently used
  return trim_to_limit();
}

std::vector<size_t> ResidencyManager::load_finished(size_t block, bool ok) {
  std::lock_guard lock(mutex_);
  check_block(block);
  Block& b = blocks_[block];
  if (b.state != BlockState::kLoading) return {};
  loading_bytes_ -= b.bytes;
  if (ok) {
    b.state = BlockState::kResident;
    resident_bytes_ += b.bytes;
    return trim_to_limit();
  }
  free_slot(b.slot, b.bytes);
  flush_released();
  if (b.is_static) static_bytes_ -= b.bytes;
  b.is_static = false;
  b.state = BlockState::kOnDisk;
  b.slot = 0;
  b.used_since_load = false;
  return {};
}

std::vector<size_t> ResidencyManager::set_budget(uint64_t budget_bytes) {
  std::lock_guard lock(mutex_);
  if (budget_bytes > arena_bytes_) {
    throw ConfigError("budget_bytes", std::to_string(budget_bytes) + " exceeds the arena (" +
                                          std::to_string(arena_bytes_) + " bytes)");
  }
  if (budget_bytes < max_block_bytes_) {
    throw ConfigError("budget_bytes", std::to_string(budget_bytes) + " cannot hold the largest block (" +
                                          std::to_string(max_block_bytes_) + " bytes)");
  }
  budget_bytes_ = budget_bytes;
  recompute_static_capacity();
  // A smaller static capacity demotes static blocks (furthest next use first) to streaming: they stay resident if
  // the budget allows and become ordinary eviction candidates. Otherwise a static set above its capacity would eat
  // the ring and leave no room to stream the other blocks.
  if (static_bytes_ > static_capacity_) {
    std::vector<size_t> statics;
    for (size_t i = 0; i < blocks_.size(); ++i) {
      if (blocks_[i].is_static) statics.push_back(i);
    }
    rank(statics);
    for (size_t i : statics) {
      if (static_bytes_ <= static_capacity_) break;
      blocks_[i].is_static = false;
      static_bytes_ -= blocks_[i].bytes;
    }
  }
  return trim_to_limit();
}

bool ResidencyManager::discard(size_t block) {
  std::lock_guard lock(mutex_);
  check_block(block);
  const Block& b = blocks_[block];
  if (b.state != BlockState::kResident || b.pins != 0) return false;
  evict(block);
  flush_released();
  return true;
}

void ResidencyManager::set_order(std::vector<size_t> order) {
  std::lock_guard lock(mutex_);
  for (size_t block : order) check_block(block);
  order_ = std::move(order);
  for (auto& positions : order_positions_) positions.clear();
  for (size_t i = 0; i < order_.size(); ++i) order_positions_[order_[i]].push_back(i);
  // Place the position at the last access, so the next access is ranked from where execution is.
  if (last_block_ != SIZE_MAX && !order_positions_[last_block_].empty()) {
    position_ = order_positions_[last_block_].front();
  } else {
    position_ = order_.empty() ? 0 : order_.size() - 1;
  }
}

void ResidencyManager::set_release_hook(ReleaseHook hook) {
  std::lock_guard lock(mutex_);
  release_hook_ = std::move(hook);
}

BlockState ResidencyManager::state(size_t block) const {
  std::lock_guard lock(mutex_);
  check_block(block);
  return blocks_[block].state;
}

uint32_t ResidencyManager::pins(size_t block) const {
  std::lock_guard lock(mutex_);
  check_block(block);
  return blocks_[block].pins;
}

std::optional<uint64_t> ResidencyManager::slot_offset(size_t block) const {
  std::lock_guard lock(mutex_);
  check_block(block);
  if (blocks_[block].state == BlockState::kOnDisk) return std::nullopt;
  return blocks_[block].slot;
}

bool ResidencyManager::is_static(size_t block) const {
  std::lock_guard lock(mutex_);
  check_block(block);
  return blocks_[block].is_static;
}

uint64_t ResidencyManager::resident_bytes() const {
  std::lock_guard lock(mutex_);
  return resident_bytes_;
}

uint64_t ResidencyManager::in_flight_bytes() const {
  std::lock_guard lock(mutex_);
  return loading_bytes_;
}

uint64_t ResidencyManager::budget_bytes() const {
  std::lock_guard lock(mutex_);
  return budget_bytes_;
}

uint64_t ResidencyManager::static_bytes() const {
  std::lock_guard lock(mutex_);
  return static_bytes_;
}

std::string ResidencyManager::check_invariants() const {
  std::lock_guard lock(mutex_);
  struct Range {
    uint64_t begin;
    uint64_t end;
    long owner;  // block index, or -1 for a free range
  };
  std::vector<Range> ranges;
  uint64_t resident = 0;
  uint64_t loading = 0;
  uint64_t statics = 0;
  bool unpinned_resident = false;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    const Block& b = blocks_[i];
    const std::string name = "block " + std::to_string(i);
    if (b.pins > (1u << 30)) return name + " has a wrapped pin count";
    if (b.state == BlockState::kOnDisk) {
      if (b.is_static) return name + " is static but on disk";
      continue;
    }
    (b.state == BlockState::kResident ? resident : loading) += b.bytes;
    if (b.is_static) statics += b.bytes;
    if (b.state == BlockState::kResident && b.pins == 0) unpinned_resident = true;
    if (b.slot % kSlotAlignment != 0) return name + " has an unaligned slot";
    if (b.slot > arena_bytes_ || arena_bytes_ - b.slot < b.bytes) return name + " has a slot outside the arena";
    if (b.bytes > 0) ranges.push_back(Range{b.slot, b.slot + b.bytes, static_cast<long>(i)});
  }
  uint64_t free_total = 0;
  for (size_t i = 0; i < free_.size(); ++i) {
    if (free_[i].bytes == 0) return "empty free range";
    if (i > 0 && free_[i - 1].offset + free_[i - 1].bytes >= free_[i].offset) {
      return "free list not sorted or not coalesced at offset " + std::to_string(free_[i].offset);
    }
    if (free_[i].offset + free_[i].bytes > arena_bytes_) return "free range outside the arena";
    free_total += free_[i].bytes;
    ranges.push_back(Range{free_[i].offset, free_[i].offset + free_[i].bytes, -1});
  }
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i - 1].end > ranges[i].begin) {
      return "overlap between " + std::to_string(ranges[i - 1].owner) + " and " + std::to_string(ranges[i].owner) +
             " (-1 = free) at offset " + std::to_string(ranges[i].begin);
    }
  }
  if (free_total + resident + loading != arena_bytes_) return "free + held bytes differ from the arena";
  if (resident != resident_bytes_ || loading != loading_bytes_) return "held byte counters are off";
  if (statics != static_bytes_) return "static byte counter is off";
  if (resident + loading > held_limit() && unpinned_resident) {
    return "held bytes exceed the limit while an unpinned block is resident";
  }
  return {};
}

// ---- private (mutex_ held) ---------------------------------------------------------------------------------------

void ResidencyManager::check_block(size_t block) const {
  if (block >= blocks_.size()) {
    throw ConfigError("block", "index " + std::to_string(block) + " out of range (" + std::to_string(blocks_.size()) +
                                   " blocks)");
  }
}

// The streaming ring must hold the largest block plus (ring_slots - 1) typical ones. Sizing every slot by the
// largest block wastes the budget when one block is much bigger than the rest (an embedding or lm_head next to
// transformer layers): with a half-model budget the ring alone then took the whole budget and nothing stayed
// resident, so every pass re-read the full model.
uint64_t ResidencyManager::ring_bytes() const {
  return saturating_add(max_block_bytes_, saturating_mul(plan_.ring_slots - 1, typical_block_bytes_));
}

void ResidencyManager::recompute_static_capacity() {
  const uint64_t ring = ring_bytes();
  if (budget_bytes_ <= ring) {
    static_capacity_ = 0;
    return;
  }
  const uint64_t rest = budget_bytes_ - ring;
  const long double share = static_cast<long double>(rest) * static_cast<long double>(plan_.static_fraction);
  static_capacity_ = std::min<uint64_t>(rest, static_cast<uint64_t>(std::floor(share)));
}

uint64_t ResidencyManager::held_bytes() const { return resident_bytes_ + loading_bytes_; }

uint64_t ResidencyManager::held_limit() const {
  return std::min(budget_bytes_, saturating_add(static_capacity_, ring_bytes()));
}

void ResidencyManager::touch(size_t block) {
  Block& b = blocks_[block];
  b.last_use = ++clock_;
  b.used_since_load = true;
  // A held block joins the static set once it has room (after set_budget grew it, or a static load failed): it
  // is already here, so keeping it costs no read.
  if (!b.is_static && static_bytes_ + b.bytes <= static_capacity_) {
    b.is_static = true;
    static_bytes_ += b.bytes;
  }
}

void ResidencyManager::advance_position(size_t block) {
  last_block_ = block;
  if (order_.empty() || order_positions_[block].empty()) return;
  // The occurrence of `block` nearest after the current position (a block may repeat within a pass).
  const size_t n = order_.size();
  size_t best = order_positions_[block].front();
  size_t best_step = n + 1;
  for (size_t p : order_positions_[block]) {
    const size_t step = (p + n - position_ % n - 1) % n + 1;  // 1..n
    if (step < best_step) {
      best_step = step;
      best = p;
    }
  }
  position_ = best;
}

uint64_t ResidencyManager::distance_to_next_use(size_t block) const {
  const auto& positions = order_positions_[block];
  if (positions.empty()) return kInfinity;  // not in the order: no known next use
  const size_t n = order_.size();
  uint64_t best = kInfinity;
  for (size_t p : positions) best = std::min<uint64_t>(best, (p + n - position_ % n - 1) % n + 1);
  return best;
}

// Eviction order: with a learned order, furthest next use first (Belady), blocks outside the order before all
// others; ties and the no-order case by least recent use.
void ResidencyManager::rank(std::vector<size_t>& candidates) const {
  if (order_.empty()) {
    std::sort(candidates.begin(), candidates.end(),
              [&](size_t a, size_t b) { return blocks_[a].last_use < blocks_[b].last_use; });
    return;
  }
  std::vector<std::pair<uint64_t, size_t>> keyed;
  keyed.reserve(candidates.size());
  for (size_t c : candidates) keyed.emplace_back(distance_to_next_use(c), c);
  std::sort(keyed.begin(), keyed.end(), [&](const auto& a, const auto& b) {
    if (a.first != b.first) return a.first > b.first;
    return blocks_[a.second].last_use < blocks_[b.second].last_use;
  });
  for (size_t i = 0; i < keyed.size(); ++i) candidates[i] = keyed[i].second;
}

// Candidates: resident, unpinned, streaming. A prefetch is speculative and must not make things worse, so it
// also spares, with a learned order, every block needed no later than the prefetched one, and without an order,
// every block not yet used since it was loaded (an earlier prefetch that has not been consumed: evicting it for a
// later one would throw away the read) — of the rest it takes the least recently used.
std::vector<size_t> ResidencyManager::victims(size_t for_block, bool speculative) const {
  const bool ordered = !order_.empty();
  const uint64_t own_distance = speculative && ordered ? distance_to_next_use(for_block) : 0;
  std::vector<size_t> candidates;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    const Block& b = blocks_[i];
    if (i == for_block || b.state != BlockState::kResident || b.pins != 0) continue;
    // Without an order the static set is what keeps a cyclic pass from evicting exactly the block needed next;
    // with one, furthest next use over every unpinned block is Belady's choice (benchmarks/residency_optimum.py).
    if (b.is_static && !ordered) continue;
    if (speculative) {
      if (ordered && distance_to_next_use(i) <= own_distance) continue;
      if (!ordered && !b.used_since_load) continue;
    }
    candidates.push_back(i);
  }
  rank(candidates);
  return candidates;
}

// Where a block of `need` bytes goes. Blocks differ in size (an lm_head beside transformer layers), so evicting in
// policy order until a first-fit hole appears evicts far more than the bytes require: the blocks freed first are
// seldom next to each other. Instead every contiguous window of the arena that could hold the block is scored by
// what it would evict, using the policy's ranking (victims(): index 0 is the block to lose first): the window whose
// most valuable victim ranks lowest wins, then the one evicting fewest bytes, then the lowest offset. On equal blocks
// a window is one slot, so this is exactly the policy's own choice; on the demo's Llama it brought bytes read per
// pass from 1.46x to within a few percent of benchmarks/residency_optimum.py.
//
// `forced`: the first `forced` blocks of the ranking leave whatever the window, because the held bytes must fit the
// limit. Their slots cost nothing and count as free; so a window over them (memory already in use) ties with free
// space elsewhere and wins on offset, instead of a fresh part of the arena's slack being touched (first touches of
// memory cost 0.5 GB/s on the development VM).
std::optional<ResidencyManager::Window> ResidencyManager::best_window(uint64_t need, const std::vector<size_t>& ranked,
                                                                      size_t forced) const {
  // The arena as segments in offset order: free ranges, candidate blocks (with their rank) and fixed blocks.
  struct Segment {
    uint64_t begin;
    uint64_t end;
    size_t rank;  // kFree, kFixed, or the victim's position in `ranked`
    size_t block;
  };
  constexpr size_t kFree = SIZE_MAX;
  constexpr size_t kFixed = SIZE_MAX - 1;
  std::vector<size_t> rank_of(blocks_.size(), kFixed);
  for (size_t r = 0; r < ranked.size(); ++r) rank_of[ranked[r]] = r;
  std::vector<Segment> segments;
  segments.reserve(free_.size() + blocks_.size());
  for (const FreeRange& range : free_) segments.push_back({range.offset, range.offset + range.bytes, kFree, 0});
  for (size_t i = 0; i < blocks_.size(); ++i) {
    const Block& b = blocks_[i];
    if (b.state == BlockState::kOnDisk || b.bytes == 0) continue;
    segments.push_back({b.slot, b.slot + b.bytes, rank_of[i], i});
  }
  std::sort(segments.begin(), segments.end(), [](const Segment& a, const Segment& b) { return a.begin < b.begin; });

  std::optional<Window> best;
  auto better = [](const Window& a, const Window& b) {
    if (a.worst_rank != b.worst_rank) return a.worst_rank < b.worst_rank;  // 0 (no victim) sorts first
    if (a.evicted_bytes != b.evicted_bytes) return a.evicted_bytes < b.evicted_bytes;
    return a.offset < b.offset;
  };
  for (size_t first = 0; first < segments.size(); ++first) {
    if (segments[first].rank == kFixed) continue;
    const uint64_t offset = (segments[first].begin + kSlotAlignment - 1) / kSlotAlignment * kSlotAlignment;
    Window window{offset, 0, 0, {}};
    uint64_t reach = segments[first].begin;  // end of the contiguous run so far
    for (size_t last = first; last < segments.size(); ++last) {
      const Segment& segment = segments[last];
      if (segment.rank == kFixed || segment.begin != reach) break;  // gaps only between misaligned neighbours
      reach = segment.end;
      if (segment.rank != kFree) {
        window.victims.push_back(segment.block);
        if (segment.rank >= forced) {
          window.worst_rank = std::max(window.worst_rank, segment.rank + 1);
          window.evicted_bytes += segment.end - segment.begin;
        }
      }
      if (reach >= offset && reach - offset >= need) {
        if (!best || better(window, *best)) best = window;
        break;
      }
      if (best && !better(window, *best)) break;  // extending only adds victims
    }
  }
  return best;
}

ResidencyManager::Decision ResidencyManager::admit(size_t block, bool pin, bool speculative) {
  Block& b = blocks_[block];
  const uint64_t need = b.bytes;
  const uint64_t limit = held_limit();
  const std::vector<size_t> ranked = victims(block, speculative);
  // The victims the limit takes whatever the window: the shortest prefix of the ranking that makes room.
  size_t forced = 0;
  for (uint64_t held = held_bytes(); forced < ranked.size() && (held > limit || limit - held < need); ++forced) {
    held -= blocks_[ranked[forced]].bytes;
  }
  std::vector<size_t> evicted;
  std::optional<uint64_t> slot;
  if (need == 0) {
    slot = 0;  // zero-byte slots take no room
  } else {
    const std::optional<Window> window = best_window(need, ranked, forced);
    if (!window) return Decision{};  // kNoRoom, nothing changed
    slot = window->offset;
    evicted = window->victims;
  }
  // The held bytes must also fit the limit, which may be below the arena (static_fraction < 1, a shrunk budget):
  // further victims in policy order, wherever they sit.
  uint64_t held = held_bytes();
  for (size_t victim : evicted) held -= blocks_[victim].bytes;
  for (size_t victim : ranked) {
    if (held <= limit && limit - held >= need) break;
    if (std::find(evicted.begin(), evicted.end(), victim) != evicted.end()) continue;
    held -= blocks_[victim].bytes;
    evicted.push_back(victim);
  }
  if (held > limit || limit - held < need) return Decision{};  // kNoRoom, nothing changed

  for (size_t victim : evicted) evict(victim);
  if (need != 0 && !take_range(*slot, need)) {
    throw std::logic_error("residency: the chosen window is not free after its evictions");
  }
  flush_released();  // what the victims held beyond the new slot
  Decision decision;
  decision.action = Action::kLoad;
  decision.slot_offset = *slot;
  decision.evicted = std::move(evicted);

  b.state = BlockState::kLoading;
  b.slot = *slot;
  loading_bytes_ += need;
  b.is_static = static_bytes_ + need <= static_capacity_;
  if (b.is_static) static_bytes_ += need;
  if (pin) ++b.pins;
  b.used_since_load = !speculative;
  b.last_use = ++clock_;
  return decision;
}

// Removes [offset, offset + bytes) from the free list; it must lie inside one free range (it does after the
// window's evictions, the free list being coalesced). False if it does not.
bool ResidencyManager::take_range(uint64_t offset, uint64_t bytes) {
  for (size_t i = 0; i < free_.size(); ++i) {
    const uint64_t begin = free_[i].offset;
    const uint64_t end = begin + free_[i].bytes;
    if (offset < begin || offset >= end || end - offset < bytes) continue;
    const uint64_t tail = offset + bytes;
    if (offset == begin && tail == end) {
      free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
    } else if (offset == begin) {
      free_[i].offset = tail;
      free_[i].bytes = end - tail;
    } else {
      free_[i].bytes = offset - begin;
      if (tail != end) free_.insert(free_.begin() + static_cast<std::ptrdiff_t>(i) + 1, FreeRange{tail, end - tail});
    }
    return true;
  }
  return false;
}

void ResidencyManager::drop(size_t block) {
  Block& b = blocks_[block];
  if (b.state == BlockState::kResident) resident_bytes_ -= b.bytes;
  if (b.state == BlockState::kLoading) loading_bytes_ -= b.bytes;
  if (b.is_static) static_bytes_ -= b.bytes;
  b.is_static = false;
  b.state = BlockState::kOnDisk;
  b.slot = 0;
  b.used_since_load = false;
}

void ResidencyManager::free_slot(uint64_t offset, uint64_t bytes) {
  give_back(free_, offset, bytes);
  if (release_hook_ && bytes > 0) released_.push_back(FreeRange{offset, bytes});
}

void ResidencyManager::evict(size_t block) {
  free_slot(blocks_[block].slot, blocks_[block].bytes);
  drop(block);
}

void ResidencyManager::flush_released() {
  if (!release_hook_) {
    released_.clear();
    return;
  }
  for (const FreeRange& range : released_) {
    const uint64_t end = range.offset + range.bytes;
    for (const FreeRange& free : free_) {
      const uint64_t begin = std::max(range.offset, free.offset);
      const uint64_t stop = std::min(end, free.offset + free.bytes);
      if (begin < stop) release_hook_(begin, stop - begin);
    }
  }
  released_.clear();
}

// Over the limit (the budget shrank below what pinned or loading blocks held): unpinned resident blocks leave,
// streaming ones first, then static ones, each group in eviction order.
std::vector<size_t> ResidencyManager::trim_to_limit() {
  std::vector<size_t> evicted;
  const uint64_t limit = held_limit();
  if (held_bytes() <= limit) return evicted;
  std::vector<size_t> streaming;
  std::vector<size_t> statics;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    const Block& b = blocks_[i];
    if (b.state != BlockState::kResident || b.pins != 0) continue;
    (b.is_static ? statics : streaming).push_back(i);
  }
  rank(streaming);
  rank(statics);
  streaming.insert(streaming.end(), statics.begin(), statics.end());
  for (size_t victim : streaming) {
    if (held_bytes() <= limit) break;
    evict(victim);
    evicted.push_back(victim);
  }
  flush_released();
  return evicted;
}

}  // namespace tensorstream
