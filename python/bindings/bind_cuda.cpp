// The GPU path's Python surface: cuda_available() and, for tests, a handle on the CPU double of the CUDA driver
// (cuda/cuda_double.hpp) that an engine can be built over (`_core.Engine(..., cuda_double=...)`).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "bind_cuda.hpp"
#include "bindings.hpp"
#include "tensorstream/cuda/cuda_api.hpp"
#include "tensorstream/cuda/cuda_double.hpp"
#include "tensorstream/error.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace tensorstream::bindings {

namespace {
// Makes device `ordinal`'s primary context current on the calling thread, as torch does before CUDA calls.
void use_primary_context(CudaApi& api, int ordinal) {
  check_cuda(api, api.cuInit(0), "cuInit");
  CuDevice device = 0;
  check_cuda(api, api.cuDeviceGet(&device, ordinal), "cuDeviceGet");
  CuContext context = nullptr;
  check_cuda(api, api.cuDevicePrimaryCtxRetain(&context, device), "cuDevicePrimaryCtxRetain");
  check_cuda(api, api.cuCtxSetCurrent(context), "cuCtxSetCurrent");
  (void)api.cuDevicePrimaryCtxRelease(device);  // the engine's transfer keeps its own reference
}
}  // namespace

void bind_cuda(nb::module_& m) {
  m.def(
      "cuda_available",
      [](const std::vector<std::string>& cufile_candidates) {
        CudaAvailability found;
        {
          nb::gil_scoped_release release;
          (void)load_cuda(&found, cufile_candidates);
        }
        nb::dict out;
        out["available"] = found.available;
        out["reason"] = found.reason;
        out["driver_version"] = found.driver_version;
        out["device_count"] = found.device_count;
        out["cufile"] = found.cufile;
        out["cufile_reason"] = found.cufile_reason;
        out["cufile_path"] = found.cufile_path;
        return out;
      },
      "cufile_candidates"_a = std::vector<std::string>{},
      "Loads the CUDA driver and cuFile with dlopen (once per process) and says what was found; never raises.");

  nb::class_<PyCudaDouble>(m, "CudaDouble",
                           "The CPU double of the CUDA driver: device memory is host memory, streams are threads.")
      .def(
          "__init__",
          [](PyCudaDouble* self, int64_t copy_latency_us, bool jitter) {
            CudaDoubleOptions options;
            options.copy_latency = std::chrono::microseconds(copy_latency_us);
            options.jitter = jitter;
            new (self) PyCudaDouble{std::make_shared<CudaDouble>(options)};
          },
          "copy_latency_us"_a = 0, "jitter"_a = false)
      .def(
          "create_stream",
          [](PyCudaDouble& d, int ordinal) {
            use_primary_context(*d.api, ordinal);
            CuStream stream = nullptr;
            check_cuda(*d.api, d.api->cuStreamCreate(&stream, kCuStreamNonBlocking), "cuStreamCreate");
            return reinterpret_cast<uintptr_t>(stream);
          },
          "device"_a = 0, "A new stream (native handle) on the device, as torch.cuda.Stream().cuda_stream would be.")
      .def(
          "synchronize_stream",
          [](PyCudaDouble& d, uintptr_t stream) {
            nb::gil_scoped_release release;
            check_cuda(*d.api, d.api->cuStreamSynchronize(reinterpret_cast<CuStream>(stream)), "cuStreamSynchronize");
          },
          "stream"_a)
      .def(
          "destroy_stream",
          [](PyCudaDouble& d, uintptr_t stream) {
            nb::gil_scoped_release release;
            check_cuda(*d.api, d.api->cuStreamDestroy(reinterpret_cast<CuStream>(stream)), "cuStreamDestroy");
          },
          "stream"_a)
      .def("fail_next", [](PyCudaDouble& d, const std::string& call, int result) { d.api->fail_next(call, result); },
           "call"_a, "result"_a)
      .def_prop_ro("pinned_bytes", [](PyCudaDouble& d) { return d.api->pinned_bytes(); })
      .def_prop_ro("live_events", [](PyCudaDouble& d) { return d.api->live_events(); })
      .def_prop_ro("live_streams", [](PyCudaDouble& d) { return d.api->live_streams(); })
      .def("operation_counts", [](PyCudaDouble& d) {
        nb::dict out;
        for (const CudaDoubleOp& op : d.api->log()) {
          const nb::str key(op.kind.c_str());
          out[key] = (out.contains(key) ? nb::cast<uint64_t>(out[key]) : 0) + 1;
        }
        return out;
      });
}

}  // namespace tensorstream::bindings
