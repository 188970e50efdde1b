// CudaDouble: a CudaApi that runs on the CPU, so the GPU path is tested on every machine (`make test`), not only
// on a lent GPU. Device memory is host memory (a "device pointer" is a host address), each stream is a FIFO worker
// thread, events complete when their stream reaches them, and the ordering CUDA guarantees holds: a stream runs its
// work in order, cuStreamWaitEvent holds a stream until the event completes, cuEventSynchronize blocks the caller.
// What makes it a useful double rather than a memcpy:
//   - copies run later, on the stream, after an injected latency, and read their source then: a staging buffer
//     reused before its copy ran shows up as wrong bytes in the slot;
//   - context-bound calls fail with CUDA_ERROR_INVALID_CONTEXT on a thread that did not make the context current;
//   - the next call of a named entry point can be made to fail with a chosen CUresult (fail_next);
//   - every operation is logged in the order streams executed it (log()), and enqueue() runs a caller's function
//     on a stream as a kernel would, for tests that check what a kernel saw.
//   - cuFile is emulated (options.cufile): handles wrap the fd, cuFileRead is a pread into the device pointer
//     (host memory here), and a read into a range never registered with cuFileBufRegister is counted, since real
//     GDS would bounce it; with options.cufile false the cuFile calls report "not loaded".
//
// Thread-safety: every method may be called from any thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tensorstream/cuda/cuda_api.hpp"

namespace tensorstream {

inline constexpr CuResult kCudaErrorInvalidContext = 201;
inline constexpr CuResult kCudaErrorInvalidHandle = 400;
inline constexpr CuResult kCudaErrorLaunchFailed = 719;

struct CudaDoubleOptions {
  int device_count = 1;
  std::chrono::microseconds copy_latency{0};   // each copy waits this long on its stream before it runs
  uint64_t seed = 1;                            // for jitter: each copy's latency is uniform in [0, copy_latency]
  bool jitter = false;
  bool cufile = true;  // emulate cuFile: cuFileRead is a pread into the "device" pointer (host memory)
};

struct CudaDoubleOp {
  std::string kind;       // "copy", "record", "wait", "host_func", "kernel"
  uintptr_t stream = 0;   // the stream that executed it
  uintptr_t event = 0;    // record / wait
  uint64_t bytes = 0;     // copy
  uint64_t sequence = 0;  // global execution order
};

class CudaDouble final : public CudaApi {
 public:
  explicit CudaDouble(CudaDoubleOptions options = {});
  ~CudaDouble() override;
  CudaDouble(const CudaDouble&) = delete;
  CudaDouble& operator=(const CudaDouble&) = delete;

  // Test controls.
  void fail_next(const std::string& call, CuResult result);  // the next call of `call` returns `result`
  [[nodiscard]] std::vector<CudaDoubleOp> log() const;        // executed operations, in execution order
  [[nodiscard]] uint64_t pinned_bytes() const;                // cuMemHostAlloc'ed and not freed
  [[nodiscard]] uint64_t device_bytes() const;                // cuMemAlloc'ed and not freed
  [[nodiscard]] uint64_t live_streams() const;
  [[nodiscard]] uint64_t live_events() const;
  // Runs `kernel` on `stream` in order with its other work, as a kernel launch would (logged as "kernel").
  void enqueue(CuStream stream, std::function<void()> kernel);

  [[nodiscard]] std::string name() const override { return "double"; }
  CuResult cuInit(unsigned flags) override;
  CuResult cuDriverGetVersion(int* version) override;
  CuResult cuDeviceGetCount(int* count) override;
  CuResult cuDeviceGet(CuDevice* device, int ordinal) override;
  CuResult cuDevicePrimaryCtxRetain(CuContext* context, CuDevice device) override;
  CuResult cuDevicePrimaryCtxRelease(CuDevice device) override;
  CuResult cuCtxSetCurrent(CuContext context) override;
  CuResult cuCtxGetCurrent(CuContext* context) override;
  CuResult cuStreamCreate(CuStream* stream, unsigned flags) override;
  CuResult cuStreamDestroy(CuStream stream) override;
  CuResult cuStreamSynchronize(CuStream stream) override;
  CuResult cuStreamWaitEvent(CuStream stream, CuEvent event, unsigned flags) override;
  CuResult cuEventCreate(CuEvent* event, unsigned flags) override;
  CuResult cuEventDestroy(CuEvent event) override;
  CuResult cuEventRecord(CuEvent event, CuStream stream) override;
  CuResult cuEventQuery(CuEvent event) override;
  CuResult cuEventSynchronize(CuEvent event) override;
  CuResult cuEventElapsedTime(float* milliseconds, CuEvent start, CuEvent end) override;
  CuResult cuMemcpyHtoDAsync(CuDevicePtr destination, const void* source, size_t bytes, CuStream stream) override;
  CuResult cuMemAlloc(CuDevicePtr* pointer, size_t bytes) override;
  CuResult cuMemFree(CuDevicePtr pointer) override;
  CuResult cuMemcpyDtoH(void* destination, CuDevicePtr source, size_t bytes) override;
  CuResult cuMemHostAlloc(void** pointer, size_t bytes, unsigned flags) override;
  CuResult cuMemFreeHost(void* pointer) override;
  CuResult cuLaunchHostFunc(CuStream stream, CuHostFn function, void* user_data) override;
  CuResult cuGetErrorName(CuResult error, const char** text) override;
  CuResult cuGetErrorString(CuResult error, const char** text) override;

  [[nodiscard]] bool cufile_loaded() const override;
  CuFileError cuFileDriverOpen() override;
  CuFileError cuFileDriverClose() override;
  CuFileError cuFileHandleRegister(CuFileHandle* handle, CuFileDescr* descr) override;
  void cuFileHandleDeregister(CuFileHandle handle) override;
  CuFileError cuFileBufRegister(const void* device_pointer, size_t bytes, int flags) override;
  CuFileError cuFileBufDeregister(const void* device_pointer) override;
  ssize_t cuFileRead(CuFileHandle handle, void* device_pointer, size_t bytes, off_t file_offset,
                     off_t device_offset) override;
  [[nodiscard]] uint64_t cufile_reads() const;             // cuFileRead calls
  [[nodiscard]] uint64_t cufile_unregistered_reads() const;  // ... into memory no cuFileBufRegister covered
  [[nodiscard]] uint64_t live_cufile_handles() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace tensorstream
