// CudaApi: the CUDA driver and cuFile entry points the GPU path uses, as one interface with two implementations:
// the real libraries, loaded at run time with dlopen (libcuda.so.1, libcufile.so.0), and a CPU test double
// (cuda/cuda_double.hpp). Nothing links against CUDA: the package builds, imports and runs its CPU path on a
// machine without it, and load_cuda() then answers with the reason instead of throwing.
//
// Methods carry the C names and arguments of cuda.h / cufile.h, so a reader who knows CUDA reads the calls as
// they are, and the types below are declared here, ABI-compatible with those headers (which the build never
// needs). Results are the driver's CUresult (0 = success) or cuFile's error struct, never exceptions; a caller
// turns a failure into a CudaError naming the call with check_cuda().
//
// Thread-safety: every method may be called from any thread (the driver's own guarantee; the double keeps it).
// The calling thread must have the context current (cuCtxSetCurrent) for context-bound calls, as with CUDA.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace tensorstream {

using CuResult = int;            // CUresult
using CuDevice = int;            // CUdevice
using CuContext = void*;         // CUcontext
using CuStream = void*;          // CUstream (nullptr: the legacy default stream)
using CuEvent = void*;           // CUevent
using CuDevicePtr = uint64_t;    // CUdeviceptr
using CuHostFn = void (*)(void* user_data);  // CUhostFn

inline constexpr CuResult kCudaSuccess = 0;
inline constexpr CuResult kCudaErrorInvalidValue = 1;
inline constexpr CuResult kCudaErrorOutOfMemory = 2;
inline constexpr CuResult kCudaErrorNotReady = 600;      // cuEventQuery: not yet complete
inline constexpr unsigned kCuStreamNonBlocking = 0x1;    // CU_STREAM_NON_BLOCKING
inline constexpr unsigned kCuEventDisableTiming = 0x2;   // CU_EVENT_DISABLE_TIMING
inline constexpr unsigned kCuMemHostAllocPortable = 0x1; // CU_MEMHOSTALLOC_PORTABLE

// cufile.h's CUfileError_t and CUfileDescr_t (Linux: an opaque fd).
struct CuFileError {
  int err = 0;              // CUfileOpError: 0 = CU_FILE_SUCCESS
  CuResult cu_err = 0;
};
struct CuFileDescr {
  int type = 1;             // CU_FILE_HANDLE_TYPE_OPAQUE_FD
  union {
    int fd;
    void* handle;
  } handle{};
  const void* fs_ops = nullptr;
};
using CuFileHandle = void*;

class CudaApi {
 public:
  virtual ~CudaApi() = default;
  [[nodiscard]] virtual std::string name() const = 0;  // "libcuda.so.1", "double", ...

  // Driver API.
  virtual CuResult cuInit(unsigned flags) = 0;
  virtual CuResult cuDriverGetVersion(int* version) = 0;
  virtual CuResult cuDeviceGetCount(int* count) = 0;
  virtual CuResult cuDeviceGet(CuDevice* device, int ordinal) = 0;
  virtual CuResult cuDevicePrimaryCtxRetain(CuContext* context, CuDevice device) = 0;
  virtual CuResult cuDevicePrimaryCtxRelease(CuDevice device) = 0;
  virtual CuResult cuCtxSetCurrent(CuContext context) = 0;
  virtual CuResult cuCtxGetCurrent(CuContext* context) = 0;
  virtual CuResult cuStreamCreate(CuStream* stream, unsigned flags) = 0;
  virtual CuResult cuStreamDestroy(CuStream stream) = 0;
  virtual CuResult cuStreamSynchronize(CuStream stream) = 0;
  virtual CuResult cuStreamWaitEvent(CuStream stream, CuEvent event, unsigned flags) = 0;
  virtual CuResult cuEventCreate(CuEvent* event, unsigned flags) = 0;
  virtual CuResult cuEventDestroy(CuEvent event) = 0;
  virtual CuResult cuEventRecord(CuEvent event, CuStream stream) = 0;
  virtual CuResult cuEventQuery(CuEvent event) = 0;
  virtual CuResult cuEventSynchronize(CuEvent event) = 0;
  virtual CuResult cuEventElapsedTime(float* milliseconds, CuEvent start, CuEvent end) = 0;
  virtual CuResult cuMemcpyHtoDAsync(CuDevicePtr destination, const void* source, size_t bytes, CuStream stream) = 0;
  virtual CuResult cuMemAlloc(CuDevicePtr* pointer, size_t bytes) = 0;   // for C++ users and tests; torch allocates
  virtual CuResult cuMemFree(CuDevicePtr pointer) = 0;                    // the arena in Python
  virtual CuResult cuMemcpyDtoH(void* destination, CuDevicePtr source, size_t bytes) = 0;  // synchronous
  virtual CuResult cuMemHostAlloc(void** pointer, size_t bytes, unsigned flags) = 0;
  virtual CuResult cuMemFreeHost(void* pointer) = 0;
  virtual CuResult cuLaunchHostFunc(CuStream stream, CuHostFn function, void* user_data) = 0;
  virtual CuResult cuGetErrorName(CuResult error, const char** text) = 0;
  virtual CuResult cuGetErrorString(CuResult error, const char** text) = 0;

  // cuFile (GPUDirect Storage). cufile_loaded() is false when libcufile could not be loaded; the calls then fail.
  [[nodiscard]] virtual bool cufile_loaded() const = 0;
  virtual CuFileError cuFileDriverOpen() = 0;
  virtual CuFileError cuFileDriverClose() = 0;
  virtual CuFileError cuFileHandleRegister(CuFileHandle* handle, CuFileDescr* descr) = 0;
  virtual void cuFileHandleDeregister(CuFileHandle handle) = 0;
  virtual CuFileError cuFileBufRegister(const void* device_pointer, size_t bytes, int flags) = 0;
  virtual CuFileError cuFileBufDeregister(const void* device_pointer) = 0;
  virtual ssize_t cuFileRead(CuFileHandle handle, void* device_pointer, size_t bytes, off_t file_offset,
                             off_t device_offset) = 0;
};

// What load_cuda() found. Never throws; `reason` says why something is missing.
struct CudaAvailability {
  bool available = false;        // libcuda loaded, every entry point found, cuInit succeeded, at least one device
  std::string reason;            // why not (empty when available)
  int driver_version = 0;        // e.g. 12080
  int device_count = 0;
  bool cufile = false;           // libcufile loaded with every entry point (GPUDirect may still run in compat mode)
  bool gds = false;              // ... and the nvidia-fs kernel module is loaded: reads go storage -> GPU by DMA
  std::string cufile_reason;     // why not
  std::string cufile_path;       // the library that was loaded
};

// Loads the driver (libcuda.so.1) and, when found, cuFile (libcufile.so.0 on the loader's path, then each of
// `cufile_candidates`, e.g. the nvidia-cufile wheel's lib/ directory). Never throws: *availability says what was
// found and why not; returns null unless the driver is available. The libraries stay loaded for the process.
// Thread-safety: any thread; the first call loads, later calls return the same API.
[[nodiscard]] std::shared_ptr<CudaApi> load_cuda(CudaAvailability* availability,
                                                 const std::vector<std::string>& cufile_candidates = {});

// "cuMemcpyHtoDAsync: CUDA_ERROR_INVALID_VALUE (invalid argument)": the call, the driver's error name and text.
[[nodiscard]] std::string cuda_error_text(CudaApi& api, CuResult result, const std::string& call);
// Throws CudaError(result, cuda_error_text(...)) unless result is success.
void check_cuda(CudaApi& api, CuResult result, const std::string& call);

}  // namespace tensorstream
