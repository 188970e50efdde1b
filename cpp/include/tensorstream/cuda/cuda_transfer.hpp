// CudaTransfer: the Transfer of BackendKind::kCuda (engine/transfer.hpp has the contract). Slots live in device
// memory on one device; bytes arrive in pinned staging buffers (cuMemHostAlloc through pinned_allocator()) and go
// to the slot with cuMemcpyHtoDAsync on a copy stream of its own. Each copy's staging lease is released by a host
// function queued behind the copy (cuLaunchHostFunc), so a buffer is reused only after the device has read it.
// Ready events and fences are timed CUevents: the engine measures loads and kernels with them (ADAPTIVE's lookahead,
// stall time), so what it learns is device time, not the host's launch time.
//
// It works in the device's primary context, the one PyTorch uses, retained for the Transfer's lifetime and made
// current on each thread that calls in (checked on every call: something else may have changed it). Streams passed
// in (consumer streams) are native CUstream handles, e.g. torch.cuda.current_stream().cuda_stream (0 for torch's
// default stream: CUDA's legacy default stream).
//
// Thread-safety: every method may be called from any thread, concurrently (Transfer's contract).
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <condition_variable>

#include "tensorstream/cuda/cuda_api.hpp"
#include "tensorstream/engine/transfer.hpp"

namespace tensorstream {

class CudaTransfer final : public Transfer {
 public:
  // Retains device `ordinal`'s primary context and creates the copy stream. Throws CudaError naming the call.
  // `access`: kDeviceByCopy ("cuda"), or kDeviceDirect ("gpudirect": the engine's reader, make_cufile_reader,
  // writes raw chunks into slots itself; the rest still comes through copies).
  CudaTransfer(std::shared_ptr<CudaApi> api, int ordinal, SlotAccess access = SlotAccess::kDeviceByCopy);
  ~CudaTransfer() override;
  CudaTransfer(const CudaTransfer&) = delete;
  CudaTransfer& operator=(const CudaTransfer&) = delete;

  [[nodiscard]] std::string name() const override {
    return access_ == SlotAccess::kDeviceDirect ? "gpudirect" : "cuda";
  }
  [[nodiscard]] SlotAccess slot_access() const override { return access_; }
  [[nodiscard]] std::unique_ptr<HostAllocator> staging_allocator() const override;
  int64_t copy_async(StagingLease source, std::span<const std::byte> bytes, std::span<std::byte> slot, uint64_t offset,
                     std::exception_ptr* error, CopyTag tag = {}) override;
  [[nodiscard]] EventRef record_ready(std::exception_ptr* error) override;
  [[nodiscard]] EventRef record_on_stream(uintptr_t stream) override;
  int stream_wait(const TransferEvent& event, uintptr_t stream, std::exception_ptr* error) override;
  int copy_stream_wait(const TransferEvent& event, std::exception_ptr* error) override;
  void synchronize(const TransferEvent& event) override;
  [[nodiscard]] EventRef record_timed(uintptr_t stream, std::exception_ptr* error) override;
  [[nodiscard]] EventRef record_copy_timed(std::exception_ptr* error) override;
  [[nodiscard]] std::optional<uint64_t> elapsed_ns(const TransferEvent& start, const TransferEvent& end) override;
  void drain() noexcept override;
  [[nodiscard]] TransferStats stats() const override;
  void set_trace(TraceRecorder* trace) noexcept override { trace_.store(trace); }

  [[nodiscard]] CuStream copy_stream() const noexcept { return copy_stream_; }
  [[nodiscard]] const std::shared_ptr<CudaApi>& api() const noexcept { return api_; }
  [[nodiscard]] CuContext context() const noexcept { return context_; }
  [[nodiscard]] uint64_t copies_in_flight() const noexcept { return in_flight_.load(); }

 private:
  struct PendingCopy;
  static void copy_completed(void* pending);  // the host function queued behind each copy
  // Makes the primary context current on the calling thread; returns its CUresult.
  CuResult make_current() noexcept;
  EventRef record(CuStream stream, std::exception_ptr* error, unsigned flags = kCuEventDisableTiming);
  int wait(const TransferEvent& event, CuStream stream, std::exception_ptr* error);

  const std::shared_ptr<CudaApi> api_;
  const SlotAccess access_;
  CuDevice device_ = 0;
  CuContext context_ = nullptr;
  CuStream copy_stream_ = nullptr;
  std::atomic<uint64_t> in_flight_{0};  // copies queued whose lease has not come back
  mutable std::mutex drained_mutex_;    // also guards the counters below
  std::condition_variable drained_;
  uint64_t copies_ = 0;
  uint64_t bytes_ = 0;
  uint64_t busy_ns_ = 0;
  uint64_t busy_since_ns_ = 0;  // when in_flight_ went 0 -> 1
  uint64_t last_done_ns_ = 0;   // when the latest copy completed (the copy stream runs them in order)
  std::atomic<TraceRecorder*> trace_{nullptr};
};

// Pinned host memory from cuMemHostAlloc (portable), for staging pools that feed a device.
[[nodiscard]] std::unique_ptr<HostAllocator> make_pinned_allocator(std::shared_ptr<CudaApi> api, CuContext context);

}  // namespace tensorstream
