#include "tensorstream/cuda/cufile_reader.hpp"

#include <unistd.h>

#include <cerrno>
#include <map>
#include <mutex>

#include "io/pread_backend.hpp"
#include "tensorstream/error.hpp"

namespace tensorstream {

namespace {

std::string cufile_error_text(const CuFileError& error, const std::string& call) {
  return call + " failed: cuFile error " + std::to_string(error.err) +
         (error.cu_err != 0 ? ", CUresult " + std::to_string(error.cu_err) : "");
}

// The driver, the registered device range and the file handles of one reader.
class CuFileSession {
 public:
  CuFileSession(std::shared_ptr<CudaApi> api, CuContext context, std::span<std::byte> range)
      : api_(std::move(api)), context_(context), range_(range) {
    if (!api_->cufile_loaded()) throw ConfigError("backend", "'gpudirect' needs libcufile, which is not loaded");
    check_cuda(*api_, api_->cuCtxSetCurrent(context_), "cuCtxSetCurrent");
    const CuFileError opened = api_->cuFileDriverOpen();
    if (opened.err != 0) throw CudaError(opened.cu_err, cufile_error_text(opened, "cuFileDriverOpen"));
    const CuFileError registered = api_->cuFileBufRegister(range_.data(), range_.size(), 0);
    if (registered.err != 0) {
      (void)api_->cuFileDriverClose();
      throw CudaError(registered.cu_err, cufile_error_text(registered, "cuFileBufRegister"));
    }
  }
  ~CuFileSession() {
    for (const auto& [fd, handle] : handles_) api_->cuFileHandleDeregister(handle);
    (void)api_->cuFileBufDeregister(range_.data());
    (void)api_->cuFileDriverClose();
  }
  CuFileSession(const CuFileSession&) = delete;
  CuFileSession& operator=(const CuFileSession&) = delete;

  [[nodiscard]] bool in_range(const void* buffer, size_t count) const noexcept {
    const auto* start = static_cast<const std::byte*>(buffer);
    const std::byte* end = range_.data() + range_.size();
    return start >= range_.data() && start < end && count <= static_cast<size_t>(end - start);
  }

  // Behaves like pread(2) (bytes, or -1 with errno), reading into device memory through cuFile.
  ssize_t read(int fd, void* buffer, size_t count, off_t offset) {
    CuContext current = nullptr;  // asked each time, never cached (see CudaTransfer::make_current)
    if ((api_->cuCtxGetCurrent(&current) != kCudaSuccess || current != context_) &&
        api_->cuCtxSetCurrent(context_) != kCudaSuccess) {
      errno = EIO;
      return -1;
    }
    CuFileHandle handle = handle_for(fd);
    if (handle == nullptr) {
      errno = EIO;
      return -1;
    }
    const auto device_offset = static_cast<off_t>(static_cast<std::byte*>(buffer) - range_.data());
    const ssize_t n = api_->cuFileRead(handle, range_.data(), count, offset, device_offset);
    if (n >= 0) return n;
    // A negative errno for system errors; cuFile's own errors (5000 and up) have no errno: EIO.
    errno = n >= -4095 ? static_cast<int>(-n) : EIO;
    return -1;
  }

 private:
  CuFileHandle handle_for(int fd) {
    const std::lock_guard lock(mutex_);
    const auto it = handles_.find(fd);
    if (it != handles_.end()) return it->second;
    CuFileDescr descr;
    descr.handle.fd = fd;
    CuFileHandle handle = nullptr;
    if (api_->cuFileHandleRegister(&handle, &descr).err != 0) return nullptr;
    handles_.emplace(fd, handle);
    return handle;
  }

  const std::shared_ptr<CudaApi> api_;
  const CuContext context_;
  const std::span<std::byte> range_;
  std::mutex mutex_;
  std::map<int, CuFileHandle> handles_;
};

// The pread pool with a syscall that sends device-range reads to cuFile; only its caps differ.
class CuFileReader final : public IoBackend {
 public:
  CuFileReader(std::shared_ptr<CuFileSession> session, uint32_t threads)
      : session_(session), pool_(detail::make_pread_backend(threads, [session](int fd, void* buffer, size_t count,
                                                                                off_t offset) -> ssize_t {
          if (!session->in_range(buffer, count)) return ::pread(fd, buffer, count, offset);
          return session->read(fd, buffer, count, offset);
        })) {}
  void submit(std::span<const ReadRequest> requests) override { pool_->submit(requests); }
  size_t reap(std::span<Completion> out, bool wait) override { return pool_->reap(out, wait); }
  [[nodiscard]] size_t in_flight() const override { return pool_->in_flight(); }
  [[nodiscard]] BackendCaps caps() const override {
    BackendCaps caps = pool_->caps();
    caps.name = "cufile";
    return caps;
  }

 private:
  std::shared_ptr<CuFileSession> session_;
  std::unique_ptr<IoBackend> pool_;  // destroyed first: its threads stop before the session closes
};

}  // namespace

std::unique_ptr<IoBackend> make_cufile_reader(std::shared_ptr<CudaApi> api, CuContext context,
                                              std::span<std::byte> device_range, uint32_t threads, bool gds,
                                              std::string* mode) {
  auto session = std::make_shared<CuFileSession>(std::move(api), context, device_range);
  if (mode != nullptr) {
    *mode = gds ? "gds" : "compat (no nvidia-fs kernel module: cuFile reads through its own bounce buffers)";
  }
  return std::make_unique<CuFileReader>(std::move(session), threads);
}

}  // namespace tensorstream
