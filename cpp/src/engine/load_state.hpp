// Private: one load of one block into its slot, shared by the engine, the reads in flight and every ticket that
// waits for it. The plan (engine/load_plan.hpp) fixes its shape; this holds its progress and its first error.
//
// Thread-safety: the counters are atomics; error and done are guarded by `mutex`; the rest is written before the
// load's reads are submitted and only read afterwards.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <span>

#include "engine/load_plan.hpp"
#include "tensorstream/engine/transfer.hpp"

namespace tensorstream::detail {

struct LoadState {
  size_t block = 0;
  std::span<std::byte> data;  // the slot, or a view of the file mapping (kMapped)
  LoadPlan plan;
  // kMapped: an earlier load verified these very pages (the same view of the same mapping): not hashed again.
  bool verified_before = false;
  uint64_t start_ns = 0;
  std::atomic<size_t> units_left{0};  // chunks (or reads) not yet finished; the load completes at zero
  // kRegion: per chunk of plan.in_place, the reads covering it that are still outstanding.
  std::unique_ptr<std::atomic<uint32_t>[]> reads_left_per_chunk;
  std::atomic<uint64_t> stored_bytes{0};
  std::atomic<uint64_t> decoded_bytes{0};
  EventRef ready;  // device slots: completes once the block's copies have (set before `done`)
  EventRef copy_start;  // device slots: timed, on the copy stream when the load started (its device time)
  bool tier_fill = false;                // host tier: this load fills the tier's buffer for its block
  std::span<const std::byte> from_tier;  // host tier: the block's bytes, copied instead of read (empty: read)

  std::mutex mutex;
  std::condition_variable done_cv;
  bool done = false;
  std::exception_ptr error;

  void set_error(std::exception_ptr e) {
    const std::lock_guard lock(mutex);
    if (!error) error = std::move(e);  // the first error is the cause; later ones are consequences
  }
  bool failed() {
    const std::lock_guard lock(mutex);
    return error != nullptr;
  }
  [[nodiscard]] bool mapped() const noexcept { return plan.kind == LoadPlan::Kind::kMapped; }
};

}  // namespace tensorstream::detail
