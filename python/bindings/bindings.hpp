// Entry points of the per-area binding files, called from module.cpp.
#pragma once

#include <nanobind/nanobind.h>

namespace tensorstream::bindings {
void bind_store(nanobind::module_& m);
void bind_engine(nanobind::module_& m);
void bind_maintenance(nanobind::module_& m);
void bind_cuda(nanobind::module_& m);
}  // namespace tensorstream::bindings
