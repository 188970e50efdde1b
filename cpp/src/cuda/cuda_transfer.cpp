#include "tensorstream/cuda/cuda_transfer.hpp"

#include <algorithm>

#include "tensorstream/error.hpp"

namespace tensorstream {

namespace {

class CudaEvent final : public TransferEvent {
 public:
  CudaEvent(std::shared_ptr<CudaApi> api, CuEvent event) : api_(std::move(api)), event_(event) {}
  ~CudaEvent() override { (void)api_->cuEventDestroy(event_); }
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  [[nodiscard]] uintptr_t native() const noexcept override { return reinterpret_cast<uintptr_t>(event_); }

 private:
  std::shared_ptr<CudaApi> api_;
  CuEvent event_;
};

class PinnedAllocator final : public HostAllocator {
 public:
  PinnedAllocator(std::shared_ptr<CudaApi> api, CuContext context) : api_(std::move(api)), context_(context) {}
  [[nodiscard]] std::string name() const override { return "pinned"; }
  [[nodiscard]] bool pinned() const override { return true; }
  [[nodiscard]] std::byte* allocate(size_t bytes) override {
    check_cuda(*api_, api_->cuCtxSetCurrent(context_), "cuCtxSetCurrent");
    void* pointer = nullptr;
    check_cuda(*api_, api_->cuMemHostAlloc(&pointer, bytes, kCuMemHostAllocPortable),
               "cuMemHostAlloc(" + std::to_string(bytes) + " bytes)");
    return static_cast<std::byte*>(pointer);
  }
  void deallocate(std::byte* buffer, size_t /*bytes*/) noexcept override { (void)api_->cuMemFreeHost(buffer); }

 private:
  std::shared_ptr<CudaApi> api_;
  CuContext context_;
};

}  // namespace

std::unique_ptr<HostAllocator> make_pinned_allocator(std::shared_ptr<CudaApi> api, CuContext context) {
  return std::make_unique<PinnedAllocator>(std::move(api), context);
}

// What the host function behind a copy releases: the lease, and the Transfer's count of copies in flight.
struct CudaTransfer::PendingCopy {
  StagingLease lease;
  CudaTransfer* transfer = nullptr;
  CopyTag tag;
  uint64_t bytes = 0;
  uint64_t queued_ns = 0;
};

CudaTransfer::CudaTransfer(std::shared_ptr<CudaApi> api, int ordinal, SlotAccess access)
    : api_(std::move(api)), access_(access) {
  if (!api_) throw ConfigError("backend", "cuda needs a CUDA driver; none was given");
  if (host_addressable(access_)) throw ConfigError("backend", "a CudaTransfer has device slots, not host slots");
  check_cuda(*api_, api_->cuInit(0), "cuInit");
  check_cuda(*api_, api_->cuDeviceGet(&device_, ordinal), "cuDeviceGet(" + std::to_string(ordinal) + ")");
  check_cuda(*api_, api_->cuDevicePrimaryCtxRetain(&context_, device_), "cuDevicePrimaryCtxRetain");
  try {
    check_cuda(*api_, make_current(), "cuCtxSetCurrent");
    // Non-blocking: the copy stream must not serialize with the legacy default stream torch may use.
    check_cuda(*api_, api_->cuStreamCreate(&copy_stream_, kCuStreamNonBlocking), "cuStreamCreate");
  } catch (...) {
    (void)api_->cuDevicePrimaryCtxRelease(device_);
    throw;
  }
}

CudaTransfer::~CudaTransfer() {
  drain();
  (void)make_current();
  (void)api_->cuStreamDestroy(copy_stream_);
  (void)api_->cuDevicePrimaryCtxRelease(device_);
}

std::unique_ptr<HostAllocator> CudaTransfer::staging_allocator() const { return make_pinned_allocator(api_, context_); }

CuResult CudaTransfer::make_current() noexcept {
  // Asked each time (a thread-local read in the driver), never cached: another library on the same thread (torch
  // switching devices) may have made another context current since, and a cache keyed by this object's address
  // would be fooled by a new Transfer at the address of an old one.
  CuContext current = nullptr;
  if (api_->cuCtxGetCurrent(&current) == kCudaSuccess && current == context_) return kCudaSuccess;
  return api_->cuCtxSetCurrent(context_);
}

int64_t CudaTransfer::copy_async(StagingLease source, std::span<const std::byte> bytes, std::span<std::byte> slot,
                                 uint64_t offset, std::exception_ptr* error, CopyTag tag) {
  if (offset > slot.size() || bytes.size() > slot.size() - offset) {
    *error = std::make_exception_ptr(CudaError(kCudaErrorInvalidValue, "cuMemcpyHtoDAsync: copy of " +
                                                                           std::to_string(bytes.size()) +
                                                                           " bytes at offset " + std::to_string(offset) +
                                                                           " overruns the slot"));
    return -1;
  }
  CuResult result = make_current();
  std::string call = "cuCtxSetCurrent";
  if (result == kCudaSuccess) {
    call = "cuMemcpyHtoDAsync";
    const auto destination = static_cast<CuDevicePtr>(reinterpret_cast<uintptr_t>(slot.data()) + offset);
    result = api_->cuMemcpyHtoDAsync(destination, bytes.data(), bytes.size(), copy_stream_);
  }
  if (result != kCudaSuccess) {
    *error = std::make_exception_ptr(CudaError(result, cuda_error_text(*api_, result, call)));
    return -1;  // nothing was queued: the lease returns now
  }
  auto* pending = new PendingCopy{std::move(source), this, tag, bytes.size(), trace_now_ns()};
  {
    const std::lock_guard lock(drained_mutex_);
    if (in_flight_.fetch_add(1) == 0) busy_since_ns_ = trace_now_ns();
    ++copies_;
    bytes_ += bytes.size();
  }
  result = api_->cuLaunchHostFunc(copy_stream_, &CudaTransfer::copy_completed, pending);
  if (result != kCudaSuccess) {
    // The copy is queued but nothing will tell us when it is done: wait for it here (a rare error path), so the
    // lease never returns while the device may still read it.
    (void)api_->cuStreamSynchronize(copy_stream_);
    copy_completed(pending);
    *error = std::make_exception_ptr(CudaError(result, cuda_error_text(*api_, result, "cuLaunchHostFunc")));
    return -1;
  }
  return static_cast<int64_t>(bytes.size());
}

void CudaTransfer::copy_completed(void* opaque) {
  auto* pending = static_cast<PendingCopy*>(opaque);
  CudaTransfer* transfer = pending->transfer;
  const CopyTag tag = pending->tag;
  const uint64_t bytes = pending->bytes;
  const uint64_t queued_ns = pending->queued_ns;
  delete pending;  // returns the staging lease (which may let a queued read go)
  const std::lock_guard lock(transfer->drained_mutex_);
  const uint64_t done = trace_now_ns();
  TraceRecorder* trace = transfer->trace_.load();
  if (trace != nullptr && trace->enabled()) {
    TraceEvent event;
    event.kind = TraceKind::kCopy;
    event.start_ns = std::min(std::max(queued_ns, transfer->last_done_ns_), done);  // in order on the stream
    event.end_ns = done;
    event.bytes = bytes;
    event.block = tag.block;
    event.tensor = tag.tensor;
    event.chunk = tag.chunk;
    event.lane = {TraceLaneKind::kCopy, 0};
    trace->record(event);
  }
  transfer->last_done_ns_ = done;
  if (transfer->in_flight_.fetch_sub(1) == 1) transfer->busy_ns_ += done - transfer->busy_since_ns_;
  transfer->drained_.notify_all();  // under the lock: once drain() sees zero, nothing here touches the Transfer
}

EventRef CudaTransfer::record(CuStream stream, std::exception_ptr* error, unsigned flags) {
  CuResult result = make_current();
  std::string call = "cuCtxSetCurrent";
  CuEvent event = nullptr;
  if (result == kCudaSuccess) {
    call = "cuEventCreate";
    result = api_->cuEventCreate(&event, flags);
  }
  if (result == kCudaSuccess) {
    call = "cuEventRecord";
    result = api_->cuEventRecord(event, stream);
    if (result != kCudaSuccess) (void)api_->cuEventDestroy(event);
  }
  if (result != kCudaSuccess) {
    *error = std::make_exception_ptr(CudaError(result, cuda_error_text(*api_, result, call)));
    return nullptr;
  }
  return std::make_shared<CudaEvent>(api_, event);
}

EventRef CudaTransfer::record_ready(std::exception_ptr* error) { return record(copy_stream_, error, 0); }

EventRef CudaTransfer::record_copy_timed(std::exception_ptr* error) { return record(copy_stream_, error, 0); }

EventRef CudaTransfer::record_on_stream(uintptr_t stream) {
  std::exception_ptr error;
  EventRef event = record(reinterpret_cast<CuStream>(stream), &error, 0);
  if (error) std::rethrow_exception(error);
  return event;
}

int CudaTransfer::wait(const TransferEvent& event, CuStream stream, std::exception_ptr* error) {
  CuResult result = make_current();
  std::string call = "cuCtxSetCurrent";
  if (result == kCudaSuccess) {
    call = "cuStreamWaitEvent";
    result = api_->cuStreamWaitEvent(stream, reinterpret_cast<CuEvent>(event.native()), 0);
  }
  if (result != kCudaSuccess) {
    *error = std::make_exception_ptr(CudaError(result, cuda_error_text(*api_, result, call)));
    return -1;
  }
  return 0;
}

int CudaTransfer::stream_wait(const TransferEvent& event, uintptr_t stream, std::exception_ptr* error) {
  return wait(event, reinterpret_cast<CuStream>(stream), error);
}

int CudaTransfer::copy_stream_wait(const TransferEvent& event, std::exception_ptr* error) {
  return wait(event, copy_stream_, error);
}

EventRef CudaTransfer::record_timed(uintptr_t stream, std::exception_ptr* error) {
  return record(reinterpret_cast<CuStream>(stream), error, 0);
}

std::optional<uint64_t> CudaTransfer::elapsed_ns(const TransferEvent& start, const TransferEvent& end) {
  if (make_current() != kCudaSuccess) return std::nullopt;
  float milliseconds = 0;
  const CuResult result = api_->cuEventElapsedTime(&milliseconds, reinterpret_cast<CuEvent>(start.native()),
                                                   reinterpret_cast<CuEvent>(end.native()));
  if (result != kCudaSuccess || milliseconds < 0) return std::nullopt;  // not complete yet (or not timed)
  return static_cast<uint64_t>(static_cast<double>(milliseconds) * 1e6);
}

void CudaTransfer::synchronize(const TransferEvent& event) {
  check_cuda(*api_, make_current(), "cuCtxSetCurrent");
  check_cuda(*api_, api_->cuEventSynchronize(reinterpret_cast<CuEvent>(event.native())), "cuEventSynchronize");
}

TransferStats CudaTransfer::stats() const {
  const std::lock_guard lock(drained_mutex_);
  TransferStats out{copies_, bytes_, busy_ns_};
  if (in_flight_.load() > 0) out.busy_ns += trace_now_ns() - busy_since_ns_;
  return out;
}

void CudaTransfer::drain() noexcept {
  std::unique_lock lock(drained_mutex_);
  drained_.wait(lock, [&] { return in_flight_.load() == 0; });
}

}  // namespace tensorstream
