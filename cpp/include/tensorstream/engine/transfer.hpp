// Transfer: the last stage of the chunk pipeline, which puts verified, decoded bytes into the block's slot, and the
// device-side ordering that goes with it. One per engine; its slot_access() tells the load planner where slots
// live (engine/slot_access.hpp).
//
// Host slots (make_host_transfer): raw chunks are read straight into the slot and compressed ones decoded into it,
// so copy_async is never needed for them; events are null (host work is complete when it returns).
//
// Device slots (cuda/cuda_transfer.hpp): bytes arrive in host staging buffers; copy_async queues an asynchronous
// copy on the Transfer's copy stream and takes the buffer's lease, which returns to its pool when the copy has
// completed (never earlier: the device reads the buffer until then). After a block's last copy the engine records
// the block's ready event (record_ready); a consumer makes its compute stream wait on it (stream_wait) instead of
// blocking the host. When the consumer releases the block it hands over a fence, an event recorded on its compute
// stream after the last kernel that reads the block (record_on_stream); before a later load copies into any part
// of that slot, the copy stream waits for the fence (copy_stream_wait), so no queued kernel ever sees its
// weights overwritten.
//
// Streams are native handles, and 0 is a stream like any other: CUDA's legacy default stream (the one PyTorch's
// default `torch.cuda.current_stream().cuda_stream` names).
//
// Results: calls made on engine workers (copy_async, record_ready, stream_wait) never throw; they return bytes or
// a negative value and put the typed error (CudaError naming the call and the driver's error text) into *error.
// Calls made on the caller's thread (record_on_stream, synchronize) throw it.
//
// Thread-safety: every method may be called from any thread, concurrently.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "tensorstream/config.hpp"
#include "tensorstream/engine/slot_access.hpp"
#include "tensorstream/memory/staging_pool.hpp"
#include "tensorstream/stats/trace.hpp"

namespace tensorstream {

// An event of a Transfer (a CUevent for CUDA): complete once the device work recorded before it is. Destroyed with
// its last reference. native() is the handle a framework can use (CUevent as an integer).
class TransferEvent {
 public:
  virtual ~TransferEvent() = default;
  [[nodiscard]] virtual uintptr_t native() const noexcept = 0;
};
using EventRef = std::shared_ptr<const TransferEvent>;

// What a Transfer moved: bytes copied to device slots and the wall time during which at least one copy was queued
// or running (so bytes / busy time is the copy rate while copying).
// What a copy is of, for the trace (block index in the store; tensor and chunk -1 for a whole block).
struct CopyTag {
  uint32_t block = 0;
  int32_t tensor = -1;
  int32_t chunk = -1;
};

struct TransferStats {
  uint64_t copies = 0;
  uint64_t bytes = 0;
  uint64_t busy_ns = 0;
};

class Transfer {
 public:
  virtual ~Transfer() = default;
  [[nodiscard]] virtual std::string name() const = 0;
  // Where slots live and who may write them; constant for the Transfer's lifetime.
  [[nodiscard]] virtual SlotAccess slot_access() const = 0;
  // Where staging buffers should come from: page-locked memory for a device (a DMA source), pageable on the host.
  [[nodiscard]] virtual std::unique_ptr<HostAllocator> staging_allocator() const = 0;

  // Queues a copy of `bytes` (which lie inside `source`'s buffer) into `slot` at `offset`. The Transfer owns
  // `source` from now on and releases it once the copy has completed. Returns bytes.size(), or a negative value with
  // *error set (the source is then released at once). Never blocks on the copy itself.
  virtual int64_t copy_async(StagingLease source, std::span<const std::byte> bytes, std::span<std::byte> slot,
                             uint64_t offset, std::exception_ptr* error, CopyTag tag = {}) = 0;
  // An event that completes once every copy queued so far has (timed, like record_timed's). Null for host slots
  // (nothing to wait for), and null with *error set on failure.
  [[nodiscard]] virtual EventRef record_ready(std::exception_ptr* error) = 0;
  // An event recorded on the consumer's `stream` (its native handle): the fence a release hands over (timed, so
  // the kernels' time can be measured up to it). Null for host slots. Throws CudaError.
  [[nodiscard]] virtual EventRef record_on_stream(uintptr_t stream) = 0;
  // Makes the consumer's `stream` wait for `event` without blocking the host. Returns 0, or a negative value with
  // *error set.
  virtual int stream_wait(const TransferEvent& event, uintptr_t stream, std::exception_ptr* error) = 0;
  // Makes the Transfer's own copy stream wait for `event` (a fence): later copies run after it.
  virtual int copy_stream_wait(const TransferEvent& event, std::exception_ptr* error) = 0;
  // Blocks the calling thread until `event` is complete. Throws CudaError.
  virtual void synchronize(const TransferEvent& event) = 0;
  // Device slots: an event with timing on the consumer's `stream`, and the time between two of them once both
  // completed (nullopt
  // before, and for host slots). How stalls are measured where they happen: on the consumer's stream.
  [[nodiscard]] virtual EventRef record_timed(uintptr_t /*stream*/, std::exception_ptr* /*error*/) { return nullptr; }
  // The same on the Transfer's copy stream (where a load's device time starts).
  [[nodiscard]] virtual EventRef record_copy_timed(std::exception_ptr* /*error*/) { return nullptr; }
  [[nodiscard]] virtual std::optional<uint64_t> elapsed_ns(const TransferEvent& /*start*/,
                                                           const TransferEvent& /*end*/) {
    return std::nullopt;
  }
  // Blocks until every queued copy has completed and its source was released. Never throws.
  virtual void drain() noexcept = 0;
  // Counters so far (zero for host slots). Thread-safe; not a consistent cut across fields.
  [[nodiscard]] virtual TransferStats stats() const { return {}; }
  // Where to record kCopy events (on lane {kCopy, 0}) while `trace` is enabled; null stops. The recorder must
  // outlive the Transfer's copies (the engine drains them before its recorder goes).
  virtual void set_trace(TraceRecorder* /*trace*/) noexcept {}
};

// Slots in host memory: nothing is ever copied or waited for.
[[nodiscard]] std::unique_ptr<Transfer> make_host_transfer();

// The destination half of the backend table (config.hpp's backend_traits): host slots for the host backends, a
// CudaTransfer on device `device_ordinal` for "cuda" (and, with device-direct slots, for "gpudirect"). Without a
// usable CUDA driver (or cuFile, for "gpudirect"), a ConfigError naming the backend and the reason. Engine uses it
// when it is not given a Transfer; make_backend() is the reader half (the engine makes the cuFile reader itself,
// over the transfer's driver and its arena).
[[nodiscard]] std::unique_ptr<Transfer> make_transfer(BackendKind kind, int device_ordinal = 0);

}  // namespace tensorstream
