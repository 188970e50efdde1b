// Private: what an engine with device slots measures in device time, with timed events, once they complete:
//   stalls    a consumer stream's wait for a block's ready event (Ticket::wait_on_stream) -> Stats wait time
//   loads     from a timed event on the copy stream at the load's start to its ready event -> ADAPTIVE
//   kernels   from the end of the consumer's wait to the fence of its release              -> ADAPTIVE
// Host timings would see kernel launches and queued copies instead. Pairs whose events are not complete yet wait
// for a later resolve() (the engine calls it on each acquire and on stats()).
//
// Thread-safety: every method may be called from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

#include "tensorstream/engine/transfer.hpp"
#include "tensorstream/residency/prefetcher.hpp"
#include "tensorstream/stats/stats.hpp"

namespace tensorstream::detail {

class DeviceTiming {
 public:
  // `position`: store block index -> the prefetcher's index (the engine's translation table, kept alive by it).
  DeviceTiming(Transfer& transfer, Stats& stats, Prefetcher& prefetcher, const std::vector<size_t>& position);

  // A consumer waited for `block` between `start` and `end` (either may be null: no measurement); the block's
  // kernels start at `end`.
  void waited(size_t block, EventRef start, EventRef end);
  // The consumer released `block` with `fence`: true when its kernels' time will be measured (a wait started it).
  bool released(size_t block, const EventRef& fence);
  // A load of `block` ran on the copy stream from `copy_start` to `ready`.
  void loaded(size_t block, EventRef copy_start, EventRef ready);
  // Counts what completed; the rest waits.
  void resolve();

 private:
  struct Pair {
    size_t block = 0;
    EventRef start;
    EventRef end;
  };
  // Resolving costs an event query per pair: batch them, but keep the events pending bounded.
  static constexpr size_t kResolveAt = 256;

  Transfer& transfer_;
  Stats& stats_;
  Prefetcher& prefetcher_;
  const std::vector<size_t>& position_;
  std::mutex mutex_;
  std::vector<Pair> stalls_;
  std::vector<Pair> loads_;
  std::vector<Pair> computes_;
  std::vector<EventRef> compute_start_;  // per store block
};

}  // namespace tensorstream::detail
