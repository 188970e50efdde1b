// Engine: streams blocks of one store into slots of a caller-owned arena, under a byte budget, with prefetch.
//
//   acquire(block) -> Ticket      pins the block; a hit returns a ready ticket, a miss starts the load
//   ticket.wait()                 blocks until the bytes are in the slot; rethrows the load's first error
//   ticket.wait_on_stream(s)      device slots: blocks only until the copies are queued, then makes stream s wait
//                                 for the block's ready event (no host synchronisation)
//   release(block, s)             unpins; with device slots and a consumer stream s, records the fence that every
//                                 later copy into this slot waits for. The block stays resident until evicted
//
// A load splits the block into its chunks and runs each through read (IoBackend) -> verify (checksum) ->
// decode (if compressed) -> transfer (into the slot). Several blocks are in flight at once; `num_io_threads`
// workers verify and decode while the backend keeps up to `queue_depth` reads in flight. A failed load records
// the first error (path, offset, errno or corruption site) in its ticket and frees the slot; the engine stays
// usable and the next acquire of that block retries. Destruction waits for reads in flight, then stops.
//
// Streamed blocks: by default every block of the store. Given a list of block indices, the engine streams only
// those: the residency manager sizes its budget, ring and static set from them alone and the prefetcher orders,
// guesses and learns over them alone, so a block outside the list is never loaded, never prefetched and never
// counted (a store's "(resident)" block, which offload reads once with the store reader, is such a block).
// Every index in the API (acquire, release, prefetch, eviction callback, learned_order, per-block stats) stays
// the block's index in the store; acquiring or prefetching a block outside the list is a ConfigError.
//
// Thread-safety: every public method may be called from any thread, concurrently.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "tensorstream/config.hpp"
#include "tensorstream/engine/transfer.hpp"
#include "tensorstream/io/io_backend.hpp"
#include "tensorstream/stats/stats.hpp"
#include "tensorstream/stats/trace.hpp"
#include "tensorstream/store/store_reader.hpp"

namespace tensorstream {

namespace detail {
struct LoadState;
}

class Ticket {
 public:
  Ticket() = default;
  [[nodiscard]] size_t block() const noexcept { return block_; }
  // Blocks until the block is in its slot; rethrows the load's error (IoError, CorruptionError).
  void wait() const;
  [[nodiscard]] bool ready() const;
  // Device slots: blocks until the block's copies are queued (rethrowing the load's error), then makes `stream` (a
  // native stream handle; 0 is CUDA's legacy default stream) wait for the block's ready event. Host slots: wait().
  void wait_on_stream(uintptr_t stream) const;
  // The block's ready event as a native handle (a CUevent), 0 for host slots. Valid after wait*() while pinned.
  [[nodiscard]] uintptr_t ready_event() const noexcept;
  // The block's bytes (its slot, or a zero-copy view of the file with the mmap backend). Valid after wait()
  // while the block stays pinned.
  [[nodiscard]] std::span<std::byte> data() const noexcept { return data_; }

 private:
  friend class Engine;
  size_t block_ = 0;
  std::span<std::byte> data_;
  // Waits for the load on the host and rethrows its error; returns the block's ready event (null for host slots).
  [[nodiscard]] EventRef wait_for_load() const;
  std::shared_ptr<detail::LoadState> load_;  // null for hits
  mutable EventRef ready_;                   // hits: the event of the load that brought the block in
  class Engine* engine_ = nullptr;
};

class Engine {
 public:
  // `arena` is memory the caller owns (a PyTorch tensor, for instance) and keeps alive longer than the engine.
  // backend / transfer default to make_backend(config) and make_transfer(config.backend) (the reader and the
  // destination of the backend table). `blocks`: the store's block indices this engine streams (std::nullopt: all),
  // each at most once, in any order; ConfigError otherwise.
  Engine(std::shared_ptr<const StoreReader> store, std::span<std::byte> arena, Config config,
         std::unique_ptr<IoBackend> backend = nullptr, std::unique_ptr<Transfer> transfer = nullptr,
         std::optional<std::vector<size_t>> blocks = std::nullopt);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  [[nodiscard]] Ticket acquire(size_t block);
  // `consumer_stream`: device slots only, the native stream whose kernels read the block (0 is CUDA's legacy
  // default stream; nullopt: none, the caller finished with the bytes on the host). Throws CudaError if the fence
  // cannot be recorded (the block is released all the same).
  void release(size_t block, std::optional<uintptr_t> consumer_stream = std::nullopt);
  // Starts a load without pinning (budget permitting); a no-op if resident, in flight or without room.
  void prefetch(size_t block);

  void set_budget(uint64_t budget_bytes);
  [[nodiscard]] uint64_t budget_bytes() const;
  [[nodiscard]] StatsSnapshot stats() const;
  void reset_stats();
  // Called (on an engine thread, without locks held) with each block that lost its slot.
  void set_eviction_callback(std::function<void(size_t)> callback);

  [[nodiscard]] const StoreReader& store() const noexcept;
  [[nodiscard]] const Config& config() const noexcept;
  [[nodiscard]] std::string backend_name() const;
  [[nodiscard]] const std::string& backend_fallback_reason() const noexcept;
  // How reads meet the page cache, decided at open: "fill" (AUTO, and the store plus the arena fit in half of the
  // memory headroom: buffered reads, so later uses are views of cached pages), "bypass" (O_DIRECT for blocks not
  // mostly cached: direct_io on, or AUTO with a store memory cannot hold), "buffered" (direct_io off, or a file
  // system without O_DIRECT), or "mapped" (the MMAP backend: every raw block is a view).
  [[nodiscard]] std::string_view page_cache_policy() const noexcept;
  // Where slots live (host, device by copy, device direct) and the Transfer's name ("host", "cuda").
  [[nodiscard]] SlotAccess slot_access() const noexcept;
  [[nodiscard]] std::string transfer_name() const;
  [[nodiscard]] std::vector<size_t> learned_order() const;
  [[nodiscard]] uint32_t lookahead() const;
  // ADAPTIVE: prefetch is off because passes without it were faster (Prefetcher), and how many such checks ended.
  [[nodiscard]] bool prefetch_off() const;
  [[nodiscard]] uint64_t prefetch_checks() const;
  [[nodiscard]] uint64_t static_bytes() const;

  // Timeline of reads, checksums, decodes, transfers and caller waits (stats/trace.hpp), off until enabled. Off,
  // each recording site costs one relaxed atomic load; on, at most `max_events` are buffered until drained and
  // the rest counted as dropped. enable_tracing throws ConfigError for max_events outside 1..kMaxMaxEvents.
  void enable_tracing(size_t max_events = TraceRecorder::kDefaultMaxEvents);
  void disable_tracing() noexcept;
  [[nodiscard]] bool tracing() const noexcept;
  // Hands over the events buffered so far (and the drop count), leaving the buffer empty.
  [[nodiscard]] TraceBatch drain_trace();

 private:
  friend class Ticket;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tensorstream
