#include "tensorstream/cuda/cuda_api.hpp"

#include <dlfcn.h>
#include <unistd.h>

#include <mutex>
#include <utility>

#include "tensorstream/error.hpp"

namespace tensorstream {

namespace {

// The real libraries. Each method forwards to the entry point dlsym found; load() fills them all or reports the
// first one missing. The libraries are never unloaded: CUDA keeps threads and state that outlive any handle.
class DriverCudaApi final : public CudaApi {
 public:
  [[nodiscard]] std::string name() const override { return "libcuda.so.1"; }

  // Loads libcuda and resolves every driver entry point. Empty string on success, else the reason.
  std::string load_driver() {
    driver_ = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (driver_ == nullptr) return std::string("libcuda.so.1 not loadable: ") + dlerror_text();
    // The _v2 names are the ones cuda.h maps the plain names to since CUDA 3.2 / 4.0; cuStreamDestroy and
    // cuEventDestroy likewise.
    const std::pair<const char*, void**> symbols[] = {
        {"cuInit", reinterpret_cast<void**>(&init_)},
        {"cuDriverGetVersion", reinterpret_cast<void**>(&driver_get_version_)},
        {"cuDeviceGetCount", reinterpret_cast<void**>(&device_get_count_)},
        {"cuDeviceGet", reinterpret_cast<void**>(&device_get_)},
        {"cuDevicePrimaryCtxRetain", reinterpret_cast<void**>(&primary_ctx_retain_)},
        {"cuDevicePrimaryCtxRelease_v2", reinterpret_cast<void**>(&primary_ctx_release_)},
        {"cuCtxSetCurrent", reinterpret_cast<void**>(&ctx_set_current_)},
        {"cuCtxGetCurrent", reinterpret_cast<void**>(&ctx_get_current_)},
        {"cuStreamCreate", reinterpret_cast<void**>(&stream_create_)},
        {"cuStreamDestroy_v2", reinterpret_cast<void**>(&stream_destroy_)},
        {"cuStreamSynchronize", reinterpret_cast<void**>(&stream_synchronize_)},
        {"cuStreamWaitEvent", reinterpret_cast<void**>(&stream_wait_event_)},
        {"cuEventCreate", reinterpret_cast<void**>(&event_create_)},
        {"cuEventDestroy_v2", reinterpret_cast<void**>(&event_destroy_)},
        {"cuEventRecord", reinterpret_cast<void**>(&event_record_)},
        {"cuEventQuery", reinterpret_cast<void**>(&event_query_)},
        {"cuEventSynchronize", reinterpret_cast<void**>(&event_synchronize_)},
        {"cuEventElapsedTime", reinterpret_cast<void**>(&event_elapsed_time_)},
        {"cuMemcpyHtoDAsync_v2", reinterpret_cast<void**>(&memcpy_htod_async_)},
        {"cuMemAlloc_v2", reinterpret_cast<void**>(&mem_alloc_)},
        {"cuMemFree_v2", reinterpret_cast<void**>(&mem_free_)},
        {"cuMemcpyDtoH_v2", reinterpret_cast<void**>(&memcpy_dtoh_)},
        {"cuMemHostAlloc", reinterpret_cast<void**>(&mem_host_alloc_)},
        {"cuMemFreeHost", reinterpret_cast<void**>(&mem_free_host_)},
        {"cuLaunchHostFunc", reinterpret_cast<void**>(&launch_host_func_)},
        {"cuGetErrorName", reinterpret_cast<void**>(&get_error_name_)},
        {"cuGetErrorString", reinterpret_cast<void**>(&get_error_string_)},
    };
    return resolve(driver_, "libcuda.so.1", symbols);
  }

  // Loads libcufile from the first candidate that opens and has every entry point. Empty string on success.
  std::string load_cufile(const std::vector<std::string>& candidates, std::string* loaded_path) {
    std::string reasons;
    for (const std::string& path : candidates) {
      void* handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (handle == nullptr) {
        reasons += (reasons.empty() ? "" : "; ") + path + ": " + dlerror_text();
        continue;
      }
      const std::pair<const char*, void**> symbols[] = {
          {"cuFileDriverOpen", reinterpret_cast<void**>(&file_driver_open_)},
          {"cuFileDriverClose", reinterpret_cast<void**>(&file_driver_close_)},
          {"cuFileHandleRegister", reinterpret_cast<void**>(&file_handle_register_)},
          {"cuFileHandleDeregister", reinterpret_cast<void**>(&file_handle_deregister_)},
          {"cuFileBufRegister", reinterpret_cast<void**>(&file_buf_register_)},
          {"cuFileBufDeregister", reinterpret_cast<void**>(&file_buf_deregister_)},
          {"cuFileRead", reinterpret_cast<void**>(&file_read_)},
      };
      const std::string missing = resolve(handle, path, symbols);
      if (missing.empty()) {
        cufile_ = handle;
        *loaded_path = path;
        return {};
      }
      reasons += (reasons.empty() ? "" : "; ") + missing;
    }
    return reasons.empty() ? "no candidate path" : reasons;
  }

  CuResult cuInit(unsigned flags) override { return init_(flags); }
  CuResult cuDriverGetVersion(int* version) override { return driver_get_version_(version); }
  CuResult cuDeviceGetCount(int* count) override { return device_get_count_(count); }
  CuResult cuDeviceGet(CuDevice* device, int ordinal) override { return device_get_(device, ordinal); }
  CuResult cuDevicePrimaryCtxRetain(CuContext* context, CuDevice device) override {
    return primary_ctx_retain_(context, device);
  }
  CuResult cuDevicePrimaryCtxRelease(CuDevice device) override { return primary_ctx_release_(device); }
  CuResult cuCtxSetCurrent(CuContext context) override { return ctx_set_current_(context); }
  CuResult cuCtxGetCurrent(CuContext* context) override { return ctx_get_current_(context); }
  CuResult cuStreamCreate(CuStream* stream, unsigned flags) override { return stream_create_(stream, flags); }
  CuResult cuStreamDestroy(CuStream stream) override { return stream_destroy_(stream); }
  CuResult cuStreamSynchronize(CuStream stream) override { return stream_synchronize_(stream); }
  CuResult cuStreamWaitEvent(CuStream stream, CuEvent event, unsigned flags) override {
    return stream_wait_event_(stream, event, flags);
  }
  CuResult cuEventCreate(CuEvent* event, unsigned flags) override { return event_create_(event, flags); }
  CuResult cuEventDestroy(CuEvent event) override { return event_destroy_(event); }
  CuResult cuEventRecord(CuEvent event, CuStream stream) override { return event_record_(event, stream); }
  CuResult cuEventQuery(CuEvent event) override { return event_query_(event); }
  CuResult cuEventSynchronize(CuEvent event) override { return event_synchronize_(event); }
  CuResult cuEventElapsedTime(float* milliseconds, CuEvent start, CuEvent end) override {
    return event_elapsed_time_(milliseconds, start, end);
  }
  CuResult cuMemcpyHtoDAsync(CuDevicePtr destination, const void* source, size_t bytes, CuStream stream) override {
    return memcpy_htod_async_(destination, source, bytes, stream);
  }
  CuResult cuMemAlloc(CuDevicePtr* pointer, size_t bytes) override { return mem_alloc_(pointer, bytes); }
  CuResult cuMemFree(CuDevicePtr pointer) override { return mem_free_(pointer); }
  CuResult cuMemcpyDtoH(void* destination, CuDevicePtr source, size_t bytes) override {
    return memcpy_dtoh_(destination, source, bytes);
  }
  CuResult cuMemHostAlloc(void** pointer, size_t bytes, unsigned flags) override {
    return mem_host_alloc_(pointer, bytes, flags);
  }
  CuResult cuMemFreeHost(void* pointer) override { return mem_free_host_(pointer); }
  CuResult cuLaunchHostFunc(CuStream stream, CuHostFn function, void* user_data) override {
    return launch_host_func_(stream, function, user_data);
  }
  CuResult cuGetErrorName(CuResult error, const char** text) override { return get_error_name_(error, text); }
  CuResult cuGetErrorString(CuResult error, const char** text) override { return get_error_string_(error, text); }

  [[nodiscard]] bool cufile_loaded() const override { return cufile_ != nullptr; }
  CuFileError cuFileDriverOpen() override { return cufile_ ? file_driver_open_() : not_loaded(); }
  CuFileError cuFileDriverClose() override { return cufile_ ? file_driver_close_() : not_loaded(); }
  CuFileError cuFileHandleRegister(CuFileHandle* handle, CuFileDescr* descr) override {
    return cufile_ ? file_handle_register_(handle, descr) : not_loaded();
  }
  void cuFileHandleDeregister(CuFileHandle handle) override {
    if (cufile_) file_handle_deregister_(handle);
  }
  CuFileError cuFileBufRegister(const void* device_pointer, size_t bytes, int flags) override {
    return cufile_ ? file_buf_register_(device_pointer, bytes, flags) : not_loaded();
  }
  CuFileError cuFileBufDeregister(const void* device_pointer) override {
    return cufile_ ? file_buf_deregister_(device_pointer) : not_loaded();
  }
  ssize_t cuFileRead(CuFileHandle handle, void* device_pointer, size_t bytes, off_t file_offset,
                     off_t device_offset) override {
    return cufile_ ? file_read_(handle, device_pointer, bytes, file_offset, device_offset) : -1;
  }

 private:
  static std::string dlerror_text() {
    const char* text = ::dlerror();
    return text != nullptr ? text : "unknown dlopen error";
  }
  template <size_t N>
  static std::string resolve(void* handle, const std::string& library, const std::pair<const char*, void**> (&symbols)[N]) {
    for (const auto& [symbol, slot] : symbols) {
      *slot = ::dlsym(handle, symbol);
      if (*slot == nullptr) return library + " lacks " + symbol + " (a driver older than this code needs)";
    }
    return {};
  }
  static CuFileError not_loaded() { return CuFileError{5030, 0}; }  // CU_FILE_DRIVER_NOT_INITIALIZED-like

  void* driver_ = nullptr;
  void* cufile_ = nullptr;
  CuResult (*init_)(unsigned) = nullptr;
  CuResult (*driver_get_version_)(int*) = nullptr;
  CuResult (*device_get_count_)(int*) = nullptr;
  CuResult (*device_get_)(CuDevice*, int) = nullptr;
  CuResult (*primary_ctx_retain_)(CuContext*, CuDevice) = nullptr;
  CuResult (*primary_ctx_release_)(CuDevice) = nullptr;
  CuResult (*ctx_set_current_)(CuContext) = nullptr;
  CuResult (*ctx_get_current_)(CuContext*) = nullptr;
  CuResult (*stream_create_)(CuStream*, unsigned) = nullptr;
  CuResult (*stream_destroy_)(CuStream) = nullptr;
  CuResult (*stream_synchronize_)(CuStream) = nullptr;
  CuResult (*stream_wait_event_)(CuStream, CuEvent, unsigned) = nullptr;
  CuResult (*event_create_)(CuEvent*, unsigned) = nullptr;
  CuResult (*event_destroy_)(CuEvent) = nullptr;
  CuResult (*event_record_)(CuEvent, CuStream) = nullptr;
  CuResult (*event_query_)(CuEvent) = nullptr;
  CuResult (*event_synchronize_)(CuEvent) = nullptr;
  CuResult (*event_elapsed_time_)(float*, CuEvent, CuEvent) = nullptr;
  CuResult (*memcpy_htod_async_)(CuDevicePtr, const void*, size_t, CuStream) = nullptr;
  CuResult (*mem_alloc_)(CuDevicePtr*, size_t) = nullptr;
  CuResult (*mem_free_)(CuDevicePtr) = nullptr;
  CuResult (*memcpy_dtoh_)(void*, CuDevicePtr, size_t) = nullptr;
  CuResult (*mem_host_alloc_)(void**, size_t, unsigned) = nullptr;
  CuResult (*mem_free_host_)(void*) = nullptr;
  CuResult (*launch_host_func_)(CuStream, CuHostFn, void*) = nullptr;
  CuResult (*get_error_name_)(CuResult, const char**) = nullptr;
  CuResult (*get_error_string_)(CuResult, const char**) = nullptr;
  CuFileError (*file_driver_open_)() = nullptr;
  CuFileError (*file_driver_close_)() = nullptr;
  CuFileError (*file_handle_register_)(CuFileHandle*, CuFileDescr*) = nullptr;
  void (*file_handle_deregister_)(CuFileHandle) = nullptr;
  CuFileError (*file_buf_register_)(const void*, size_t, int) = nullptr;
  CuFileError (*file_buf_deregister_)(const void*) = nullptr;
  ssize_t (*file_read_)(CuFileHandle, void*, size_t, off_t, off_t) = nullptr;
};

std::string result_text(CudaApi& api, CuResult result) {
  const char* name = nullptr;
  const char* text = nullptr;
  (void)api.cuGetErrorName(result, &name);
  (void)api.cuGetErrorString(result, &text);
  std::string out = name != nullptr ? name : "CUresult " + std::to_string(result);
  if (text != nullptr) out += std::string(" (") + text + ")";
  return out;
}

}  // namespace

std::shared_ptr<CudaApi> load_cuda(CudaAvailability* availability, const std::vector<std::string>& cufile_candidates) {
  static std::mutex mutex;
  static std::shared_ptr<DriverCudaApi> loaded;
  static CudaAvailability found;
  static bool tried = false;
  const std::lock_guard lock(mutex);
  if (!tried) {
    tried = true;
    try {
      auto api = std::make_shared<DriverCudaApi>();
      found.reason = api->load_driver();
      if (found.reason.empty()) {
        const CuResult init = api->cuInit(0);
        if (init != kCudaSuccess) {
          found.reason = "cuInit failed: " + result_text(*api, init);
        } else {
          (void)api->cuDriverGetVersion(&found.driver_version);
          const CuResult count = api->cuDeviceGetCount(&found.device_count);
          if (count != kCudaSuccess) {
            found.reason = "cuDeviceGetCount failed: " + result_text(*api, count);
          } else if (found.device_count == 0) {
            found.reason = "the CUDA driver sees no device";
          }
        }
      }
      if (found.reason.empty()) {
        std::vector<std::string> candidates = {"libcufile.so.0"};
        candidates.insert(candidates.end(), cufile_candidates.begin(), cufile_candidates.end());
        found.cufile_reason = api->load_cufile(candidates, &found.cufile_path);
        found.cufile = found.cufile_reason.empty();
        // Without nvidia-fs, cuFile runs in compatibility mode: POSIX reads through its own bounce buffers.
        found.gds = found.cufile && ::access("/proc/driver/nvidia-fs", F_OK) == 0;
        found.available = true;
        loaded = std::move(api);
      } else {
        found.cufile_reason = "no CUDA driver";
      }
    } catch (const std::exception& error) {
      found = CudaAvailability{};
      found.reason = std::string("loading CUDA failed: ") + error.what();
    }
  }
  if (availability != nullptr) *availability = found;
  return loaded;
}

std::string cuda_error_text(CudaApi& api, CuResult result, const std::string& call) {
  return call + ": " + result_text(api, result);
}

void check_cuda(CudaApi& api, CuResult result, const std::string& call) {
  if (result != kCudaSuccess) throw CudaError(result, cuda_error_text(api, result, call));
}

}  // namespace tensorstream
