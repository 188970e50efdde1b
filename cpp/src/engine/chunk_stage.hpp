// Private: the stage the engine's workers run on each chunk once its bytes are in memory: verify the checksum,
// decode, and put the bytes into the slot (in place for host slots; through the Transfer for device slots,
// keeping a copy in the host tier on the way). A whole block from the host tier is one copy.
//
// Nothing here throws: a failure is recorded in the load (the first error wins); the caller counts the unit as
// finished afterwards, in every case.
//
// Thread-safety: every method may be called from any worker, concurrently for different chunks.
#pragma once

#include <span>

#include "engine/load_plan.hpp"
#include "engine/load_state.hpp"
#include "tensorstream/engine/transfer.hpp"
#include "tensorstream/memory/host_tier.hpp"
#include "tensorstream/memory/staging_pool.hpp"
#include "tensorstream/stats/stats.hpp"
#include "tensorstream/stats/trace.hpp"
#include "tensorstream/store/store_reader.hpp"

namespace tensorstream::detail {

class ChunkStage {
 public:
  struct Context {
    const StoreReader& store;
    Transfer& transfer;
    TraceRecorder& trace;
    Stats& stats;
    bool verify = true;
    StagingPool* decoded = nullptr;  // device slots: buffers for decoded chunks on their way to the device
    HostTier* tier = nullptr;        // device slots with a host tier
  };
  explicit ChunkStage(Context context) : context_(context) {}

  // A chunk of an all-raw block, where it lies (the slot, or the file mapping: its pages come in here).
  void verify_in_place(LoadState& load, size_t chunk_in_place) noexcept;
  // A chunk read on its own. `stored`: its stored bytes (in `staging`, or already in a host slot).
  void process(LoadState& load, const PlannedRead& read, std::span<const std::byte> stored,
               StagingLease staging) noexcept;
  // A block the host tier holds: one copy from RAM into its device slot.
  void copy_from_tier(LoadState& load) noexcept;

 private:
  Context context_;
};

}  // namespace tensorstream::detail
