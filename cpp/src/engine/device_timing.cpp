#include "engine/device_timing.hpp"

#include <iterator>
#include <optional>

namespace tensorstream::detail {

DeviceTiming::DeviceTiming(Transfer& transfer, Stats& stats, Prefetcher& prefetcher,
                           const std::vector<size_t>& position)
    : transfer_(transfer), stats_(stats), prefetcher_(prefetcher), position_(position),
      compute_start_(position.size()) {}

void DeviceTiming::waited(size_t block, EventRef start, EventRef end) {
  bool resolve_now = false;
  {
    const std::lock_guard lock(mutex_);
    if (block < compute_start_.size()) compute_start_[block] = end;
    if (start && end) stalls_.push_back({block, std::move(start), std::move(end)});
    resolve_now = stalls_.size() >= kResolveAt;
  }
  if (resolve_now) resolve();
}

bool DeviceTiming::released(size_t block, const EventRef& fence) {
  const std::lock_guard lock(mutex_);
  if (!fence || block >= compute_start_.size() || !compute_start_[block]) return false;
  computes_.push_back({block, std::move(compute_start_[block]), fence});
  return true;
}

void DeviceTiming::loaded(size_t block, EventRef copy_start, EventRef ready) {
  const std::lock_guard lock(mutex_);
  loads_.push_back({block, std::move(copy_start), std::move(ready)});
}

void DeviceTiming::resolve() {
  std::vector<Pair> stalls;
  std::vector<Pair> loads;
  std::vector<Pair> computes;
  {
    const std::lock_guard lock(mutex_);
    stalls.swap(stalls_);
    loads.swap(loads_);
    computes.swap(computes_);
  }
  // Queries outside the lock: a query is a driver call.
  auto settle = [&](std::vector<Pair>& pairs, auto&& use) {
    std::vector<Pair> pending;
    for (Pair& pair : pairs) {
      const std::optional<uint64_t> ns = transfer_.elapsed_ns(*pair.start, *pair.end);
      if (ns) {
        use(pair.block, *ns);
      } else {
        pending.push_back(std::move(pair));
      }
    }
    pairs.swap(pending);
  };
  settle(stalls, [&](size_t block, uint64_t ns) {
    stats_.on_wait(block, ns);
    stats_.on_device_stall(ns);
  });
  settle(loads, [&](size_t block, uint64_t ns) { prefetcher_.on_load_time(position_[block], ns); });
  settle(computes, [&](size_t block, uint64_t ns) { prefetcher_.on_compute_time(position_[block], ns); });
  const std::lock_guard lock(mutex_);
  auto keep = [](std::vector<Pair>& into, std::vector<Pair>& from) {
    into.insert(into.end(), std::make_move_iterator(from.begin()), std::make_move_iterator(from.end()));
  };
  keep(stalls_, stalls);
  keep(loads_, loads);
  keep(computes_, computes);
}

}  // namespace tensorstream::detail
