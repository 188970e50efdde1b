// The reader of BackendKind::kGpuDirect: reads whose buffer lies in the device range (the arena of device slots,
// registered once with cuFileBufRegister) go storage -> GPU with cuFileRead; every other read (host staging
// buffers for compressed chunks, or for chunks verified on the CPU) is a plain pread. One thread pool and one
// completion queue (the pread pool's), so the engine sees a single IoBackend whose caps name is "cufile".
//
// The cuFile driver is opened once per reader, each data file's descriptor registered on first use
// (cuFileHandleRegister), everything deregistered and closed on destruction. Without the nvidia-fs kernel module
// cuFile runs in compatibility mode (POSIX reads through its own bounce buffers): *mode says which.
//
// Thread-safety: as IoBackend (submit from any thread, reap from one).
#pragma once

#include <memory>
#include <span>
#include <string>

#include "tensorstream/cuda/cuda_api.hpp"
#include "tensorstream/io/io_backend.hpp"

namespace tensorstream {

// Throws CudaError naming the cuFile call that failed (driver open, buffer registration). `context` is made
// current on each reading thread. *mode (when given): "gds" or "compat (...why...)".
[[nodiscard]] std::unique_ptr<IoBackend> make_cufile_reader(std::shared_ptr<CudaApi> api, CuContext context,
                                                            std::span<std::byte> device_range, uint32_t threads,
                                                            bool gds, std::string* mode = nullptr);

}  // namespace tensorstream
