// Prefetcher: order learning, successor prediction and the adaptive lookahead (DESIGN.md §6).
#include "tensorstream/residency/prefetcher.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <string>

#include "tensorstream/error.hpp"

namespace tensorstream {

namespace {

// Weight of a new timing sample in the moving averages: about the last five blocks count, which smooths the noise
// of a shared machine (page-cache hits, a busy neighbour) yet follows a real change within a fraction of a pass.
constexpr double kEwmaAlpha = 0.2;

// A pass longer than this many accesses per block is not a forward pass (the first block never came back, for
// instance): stop recording it rather than grow without bound.
constexpr size_t kMaxPassAccessesPerBlock = 16;
constexpr size_t kMinPassCap = 4096;

// ceil() of a ratio that is an integer up to rounding error must not round up to the next integer.
constexpr double kCeilSlack = 1e-9;

// ADAPTIVE's check of prefetch on against off (see the header): passes timed per side, the margin prefetch-off must
// win by, the ratio that ends a check early, and the interval between checks.
constexpr uint32_t kCheckPasses = 2;
constexpr double kOffMustWinBy = 0.03;
constexpr double kOffGivesUpAt = 1.25;
constexpr uint32_t kFirstCheckDelay = 8;  // passes after the order is known
constexpr uint32_t kFirstCheckInterval = 16;
constexpr uint32_t kMaxCheckInterval = 256;
// Passes shorter than this are not compared: their timing noise (a page fault, a busy neighbour) is larger than
// what the check looks for, and the bytes at stake are few. Prefetch stays on for them. A decoded token of the
// demo takes 0.3-0.5 s; unit-test models take milliseconds.
constexpr uint64_t kMinComparedPassNs = 100'000'000;

uint64_t steady_now_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

void ewma(double& average, uint64_t& samples, uint64_t ns) {
  const auto value = static_cast<double>(ns);
  average = samples == 0 ? value : average + kEwmaAlpha * (value - average);
  ++samples;
}

}  // namespace

Prefetcher::Prefetcher(PrefetchStrategy strategy, size_t num_blocks, uint32_t max_lookahead, Clock clock)
    : strategy_(strategy),
      num_blocks_(num_blocks),
      max_lookahead_(max_lookahead),
      successors_(num_blocks),
      visits_(num_blocks, 0),
      clock_(clock != nullptr ? clock : &steady_now_ns) {}

std::vector<size_t> Prefetcher::on_access(size_t block) {
  std::lock_guard lock(mutex_);
  if (block >= num_blocks_) {
    throw ConfigError("block", "index " + std::to_string(block) + " out of range (" + std::to_string(num_blocks_) +
                                   " blocks)");
  }
  // Pass boundary: the first block ever accessed comes back. The finished pass is the learned order (each later
  // pass replaces it, so the order follows the model if it changes).
  const bool timed = strategy_ == PrefetchStrategy::kAdaptive;
  const uint64_t now = timed ? clock_() : 0;
  if (first_block_ == SIZE_MAX) {
    first_block_ = block;
    pass_first_ns_ = now;
  } else if (block == first_block_ && !current_pass_.empty()) {
    learned_order_ = std::move(current_pass_);
    current_pass_.clear();
    order_known_ = true;
    order_position_ = SIZE_MAX;
    if (timed) {
      on_pass_end_locked(pass_last_ns_ - pass_first_ns_);
      pass_first_ns_ = now;
    }
  }
  pass_last_ns_ = now;
  if (current_pass_.size() < std::max(kMinPassCap, kMaxPassAccessesPerBlock * num_blocks_)) {
    current_pass_.push_back(block);
  }
  // Successor counts (the transition from a pass's last block to the next pass's first one included).
  if (has_previous_) {
    auto& list = successors_[previous_];
    auto it = std::find_if(list.begin(), list.end(), [&](const Successor& s) { return s.block == block; });
    if (it == list.end()) {
      list.push_back(Successor{block, 1});
    } else {
      ++it->count;
    }
  }
  ++visits_[block];
  has_previous_ = true;
  previous_ = block;

  // Where this access sits in the learned order: the occurrence nearest after the previous one.
  size_t position = SIZE_MAX;
  if (order_known_ && !learned_order_.empty()) {
    const size_t n = learned_order_.size();
    const size_t from = order_position_ == SIZE_MAX ? n - 1 : order_position_;
    for (size_t step = 1; step <= n; ++step) {
      const size_t p = (from + step) % n;
      if (learned_order_[p] == block) {
        position = p;
        break;
      }
    }
    if (position != SIZE_MAX) order_position_ = position;
  }

  std::vector<size_t> ahead;
  const auto add = [&](size_t candidate) {
    if (candidate != block && std::find(ahead.begin(), ahead.end(), candidate) == ahead.end()) {
      ahead.push_back(candidate);
    }
  };
  switch (strategy_) {
    case PrefetchStrategy::kNone:
      break;
    case PrefetchStrategy::kNextLayer: {
      const size_t depth = max_lookahead_;
      if (position != SIZE_MAX) {
        // The next blocks of the learned order, wrapping into the next pass.
        const size_t n = learned_order_.size();
        for (size_t step = 1; step < n && ahead.size() < depth; ++step) add(learned_order_[(position + step) % n]);
      } else {
        // No order yet (or a block outside it): the next indices, not past the last block.
        for (size_t next = block + 1; next < num_blocks_ && ahead.size() < depth; ++next) add(next);
      }
      break;
    }
    case PrefetchStrategy::kAdaptive:
      ahead = predict_locked(block);
      break;
  }
  return ahead;
}

// Successor chain: at the first step every successor seen at least half as often as the most frequent one (the
// alternatives of a conditional block, e.g. MoE experts); then the most frequent successor of each block in turn,
// `lookahead` steps deep in all. Before a transition from `block` was seen: the next unused indices (first pass only).
std::vector<size_t> Prefetcher::predict_locked(size_t block) const {
  std::vector<size_t> ahead;
  const uint32_t depth = lookahead_locked();
  if (depth == 0) return ahead;
  const auto top = [&](size_t from) -> const Successor* {
    const Successor* best = nullptr;
    for (const Successor& s : successors_[from]) {
      if (best == nullptr || s.count > best->count) best = &s;  // ties: the first seen
    }
    return best;
  };
  const Successor* first = top(block);
  const auto add = [&](size_t candidate) {
    if (candidate != block && std::find(ahead.begin(), ahead.end(), candidate) == ahead.end()) {
      ahead.push_back(candidate);
    }
  };
  if (first == nullptr) {
    // Nothing learned from this block yet. During the first pass guess storage order (blocks are written in module
    // order, which is usually execution order), skipping blocks this pass already used: otherwise a model's first
    // forward pass, often its only one, would load every block on demand.
    if (!order_known_) {
      for (size_t next = block + 1; next < num_blocks_ && ahead.size() < depth; ++next) {
        if (std::find(current_pass_.begin(), current_pass_.end(), next) == current_pass_.end()) add(next);
      }
    }
    return ahead;
  }
  add(first->block);
  std::vector<Successor> alternatives;
  for (const Successor& s : successors_[block]) {
    if (&s != first && s.count * 2 >= first->count) alternatives.push_back(s);
  }
  std::stable_sort(alternatives.begin(), alternatives.end(),
                   [](const Successor& a, const Successor& b) { return a.count > b.count; });
  for (const Successor& s : alternatives) add(s.block);

  size_t current = first->block;
  for (uint32_t step = 1; step < depth; ++step) {
    const Successor* next = top(current);
    if (next == nullptr || next->block == block) break;  // unknown, or the chain came back round
    add(next->block);
    current = next->block;
  }
  return ahead;
}

// At the end of each pass (ADAPTIVE): the check of prefetch on against off. A pass's time runs from its first access
// to its last one, so time outside the model (between generate() calls, or a server waiting for requests) is not
// counted; the last block's compute is left out on both sides alike.
void Prefetcher::on_pass_end_locked(uint64_t pass_ns) {
  switch (stage_) {
    case CheckStage::kWaitingForOrder:
      // This pass taught the order. A check costs up to two passes with prefetch off, which a short run (a few
      // tokens: M1 and B2 of make bench decode 3-5) would feel and never win back, so the first one waits.
      stage_ = CheckStage::kSettled;
      passes_until_check_ = kFirstCheckDelay;
      return;
    case CheckStage::kTimingOn:
      best_on_ns_ = best_on_ns_ == 0 ? pass_ns : std::min(best_on_ns_, pass_ns);
      if (++stage_passes_ < kCheckPasses) return;
      if (best_on_ns_ < kMinComparedPassNs) {
        settle_locked(false);
        return;
      }
      stage_ = CheckStage::kTimingOff;
      stage_passes_ = 0;
      best_off_ns_ = 0;
      off_ = true;
      return;
    case CheckStage::kTimingOff: {
      best_off_ns_ = best_off_ns_ == 0 ? pass_ns : std::min(best_off_ns_, pass_ns);
      ++stage_passes_;
      const auto on = static_cast<double>(best_on_ns_);
      if (static_cast<double>(pass_ns) > kOffGivesUpAt * on) {
        settle_locked(false);
      } else if (stage_passes_ >= kCheckPasses) {
        settle_locked(static_cast<double>(best_off_ns_) < (1.0 - kOffMustWinBy) * on);
      }
      return;
    }
    case CheckStage::kSettled:
      if (--passes_until_check_ > 0) return;
      break;
  }
  // Start a check: the next passes prefetch and are timed.
  stage_ = CheckStage::kTimingOn;
  stage_passes_ = 0;
  best_on_ns_ = 0;
  off_ = false;
}

void Prefetcher::settle_locked(bool off) {
  const bool same = check_interval_ != 0 && off == settled_off_;
  check_interval_ = same ? std::min(check_interval_ * 2, kMaxCheckInterval) : kFirstCheckInterval;
  settled_off_ = off;
  off_ = off;
  stage_ = CheckStage::kSettled;
  passes_until_check_ = check_interval_;
  ++checks_;
}

uint32_t Prefetcher::lookahead_locked() const {
  if (strategy_ == PrefetchStrategy::kNone || max_lookahead_ == 0) return 0;
  if (strategy_ == PrefetchStrategy::kAdaptive && off_) return 0;
  if (strategy_ == PrefetchStrategy::kNextLayer) return max_lookahead_;
  // Before both a load and a compute time were measured: half the allowed depth, rounded up. A guess between
  // "compute hides the read" (1) and "reads dominate" (max); by the second pass there are measurements.
  if (load_samples_ == 0 || compute_samples_ == 0) return (max_lookahead_ + 1) / 2;
  if (compute_ns_avg_ <= 0) return max_lookahead_;
  const double ratio = std::ceil(load_ns_avg_ / compute_ns_avg_ - kCeilSlack);
  if (ratio <= 1.0) return 1;
  if (ratio >= static_cast<double>(max_lookahead_)) return max_lookahead_;
  return static_cast<uint32_t>(ratio);
}

void Prefetcher::on_load_time(size_t block, uint64_t ns) {
  std::lock_guard lock(mutex_);
  if (block >= num_blocks_) return;
  ewma(load_ns_avg_, load_samples_, ns);
}

void Prefetcher::on_compute_time(size_t block, uint64_t ns) {
  std::lock_guard lock(mutex_);
  if (block >= num_blocks_) return;
  ewma(compute_ns_avg_, compute_samples_, ns);
}

bool Prefetcher::order_known() const {
  std::lock_guard lock(mutex_);
  return order_known_;
}

std::pair<std::vector<size_t>, size_t> Prefetcher::learned_order_and_position() const {
  std::lock_guard lock(mutex_);
  return {learned_order_, order_position_};
}

std::vector<size_t> Prefetcher::learned_order() const {
  std::lock_guard lock(mutex_);
  return learned_order_;
}

uint32_t Prefetcher::lookahead() const {
  std::lock_guard lock(mutex_);
  return lookahead_locked();
}

bool Prefetcher::prefetch_off() const {
  std::lock_guard lock(mutex_);
  return stage_ == CheckStage::kSettled && off_;
}

uint64_t Prefetcher::prefetch_checks() const {
  std::lock_guard lock(mutex_);
  return checks_;
}

void Prefetcher::set_max_lookahead(uint32_t max_lookahead) {
  std::lock_guard lock(mutex_);
  max_lookahead_ = max_lookahead;
}

}  // namespace tensorstream
