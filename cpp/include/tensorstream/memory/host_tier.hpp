// HostTier: decoded blocks kept in (pinned) host memory between device slots and storage. The common GPU user has
// a model too big for VRAM but not for RAM; a block that has left VRAM is then copied again from RAM at
// host-to-device speed instead of being read, verified and decoded again.
//
// A bounded static set: a block is admitted when it is loaded into a streaming (not a static) device slot and the
// tier has room, filled chunk by chunk as the load verifies and decodes it, and kept for the engine's lifetime.
// In the repeating order of forward passes a static set reads the fewest bytes a tier without a learned order can
// (the same argument as the device's static set, residency_manager.hpp); eviction by next use is left for when
// the order is learned (not built yet). Buffers are allocated per block on admission and freed with the tier.
//
// Thread-safety: every method may be called from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "tensorstream/memory/staging_pool.hpp"

namespace tensorstream {

class HostTier {
 public:
  HostTier(size_t num_blocks, uint64_t capacity_bytes, std::unique_ptr<HostAllocator> allocator);
  ~HostTier();
  HostTier(const HostTier&) = delete;
  HostTier& operator=(const HostTier&) = delete;

  // Reserves room for `block` (`bytes`) to be filled by its load: false when the block is held or being filled
  // already, or does not fit. Cheap: called under the engine's lock; the memory comes with fill_buffer().
  [[nodiscard]] bool reserve(size_t block, uint64_t bytes);
  // The reserved block's buffer, allocated by the first call (pinning memory can take a while: this runs on the
  // engine's workers, never under its lock); empty if the allocation failed (the load then commits false).
  [[nodiscard]] std::span<std::byte> fill_buffer(size_t block);
  // The load that reserved the buffer finished: with ok the block is held from now on, else its room is freed.
  void commit(size_t block, bool ok);
  // The block's bytes when the tier holds them completely, else an empty span. Valid for the tier's lifetime.
  [[nodiscard]] std::span<const std::byte> find(size_t block) const;
  [[nodiscard]] uint64_t capacity_bytes() const noexcept { return capacity_; }
  [[nodiscard]] uint64_t held_bytes() const;  // committed blocks

 private:
  enum class State : uint8_t { kEmpty, kFilling, kHeld };
  struct Entry {
    State state = State::kEmpty;
    uint64_t bytes = 0;       // reserved (rounded to 4 KiB)
    std::span<std::byte> buffer;
    bool allocation_failed = false;
    std::unique_ptr<std::once_flag> allocated;  // fill_buffer's first call allocates (a once_flag cannot move)
  };
  const uint64_t capacity_;
  const std::unique_ptr<HostAllocator> allocator_;
  mutable std::mutex mutex_;
  std::vector<Entry> entries_;
  uint64_t reserved_ = 0;  // filling + held
  uint64_t held_ = 0;
};

}  // namespace tensorstream
