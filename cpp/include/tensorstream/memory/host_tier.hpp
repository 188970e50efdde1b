// HostTier: decoded blocks kept in (pinned) host memory between device slots and storage. The common GPU user has
// a model too big for VRAM but not for RAM; a block that has left VRAM is then copied again from RAM at
// host-to-device speed instead of being read, verified and decoded again.
//
// A block is admitted when it is loaded into a streaming (not a static) device slot, filled chunk by chunk as the
// load verifies and decodes it. When the tier is full, held blocks used later than the one being loaded are
// evicted, furthest next use first (Belady), given how far ahead each block is used next (the engine's learned
// order; without one nothing is evicted and the tier is a static set). In a repeating order the block being loaded
// is always the one used furthest ahead, so nothing is evicted there either: the static set is what next-use
// eviction converges to; orders with conditional blocks (MoE) are where it differs.
//
// An evicted buffer may still be the source of a queued copy: it is retired with a check that says when the copies
// queued so far have completed, and freed (and its room returned) only then.
//
// Thread-safety: every method may be called from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
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

  // How many accesses ahead a block is used next; nullopt: not known.
  using NextUse = std::function<std::optional<uint64_t>(size_t block)>;
  // Made when blocks were evicted: true once every copy queued so far has completed (their buffers may go then).
  using RetireCheck = std::function<bool()>;

  // Reserves room for `block` (`bytes`) to be filled by its load: false when the block is held or being filled
  // already, or does not fit even after evicting the held blocks `next_use` says are used later than it (their
  // buffers are retired behind one `make_check()`). Cheap: called under the engine's lock; the memory comes with
  // fill_buffer().
  [[nodiscard]] bool reserve(size_t block, uint64_t bytes, const NextUse& next_use = {},
                             const std::function<RetireCheck()>& make_check = {});
  // Frees the retired buffers whose check passes. Called by reserve(); harmless at any time.
  void reclaim();
  // The reserved block's buffer, allocated by the first call (pinning memory can take a while: this runs on the
  // engine's workers, never under its lock); empty if the allocation failed (the load then commits false).
  [[nodiscard]] std::span<std::byte> fill_buffer(size_t block);
  // The load that reserved the buffer finished: with ok the block is held from now on, else its room is freed.
  void commit(size_t block, bool ok);
  // The block's bytes when the tier holds them completely, else an empty span. Valid for the tier's lifetime.
  [[nodiscard]] std::span<const std::byte> find(size_t block) const;
  [[nodiscard]] uint64_t capacity_bytes() const noexcept { return capacity_; }
  [[nodiscard]] uint64_t held_bytes() const;  // committed blocks
  [[nodiscard]] uint64_t evictions() const;

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
  struct Retired {
    std::span<std::byte> buffer;
    std::shared_ptr<RetireCheck> check;  // shared by the buffers one eviction retired
  };
  std::vector<Entry> entries_;
  std::vector<Retired> retired_;
  uint64_t reserved_ = 0;  // filling + held + retired
  uint64_t held_ = 0;
  uint64_t evictions_ = 0;
};

}  // namespace tensorstream
