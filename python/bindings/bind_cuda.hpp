// Shared between bind_cuda.cpp and bind_engine.cpp: the Python handle of a CUDA test double.
#pragma once

#include <memory>

#include "tensorstream/cuda/cuda_double.hpp"

namespace tensorstream::bindings {

struct PyCudaDouble {
  std::shared_ptr<CudaDouble> api;
};

}  // namespace tensorstream::bindings
