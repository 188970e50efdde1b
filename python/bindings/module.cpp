// The _core extension: the only place that includes nanobind. Each bind_<area>.cpp exposes one area; this file
// wires them together and translates C++ errors into the Python classes of tensorstream.errors.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "bindings.hpp"
#include "tensorstream/error.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {
nb::object error_class(const char* name) { return nb::module_::import_("tensorstream.errors").attr(name); }

void raise(nb::handle cls, nb::handle instance) { PyErr_SetObject(cls.ptr(), instance.ptr()); }

void translate_error(const std::exception_ptr& error, void*) {
  try {
    std::rethrow_exception(error);
  } catch (const tensorstream::IoError& e) {
    const nb::object error = error_class("make_io_error")(e.errno_value(), e.what(), e.path());
    raise(error.type(), error);
  } catch (const tensorstream::FormatError& e) {
    const nb::object cls = error_class("FormatError");
    raise(cls, cls(e.what(), "rule"_a = e.rule(), "path"_a = e.path()));
  } catch (const tensorstream::CorruptionError& e) {
    const nb::object cls = error_class("CorruptionError");
    const auto& site = e.site();
    raise(cls, cls(e.what(), "path"_a = site.path, "model"_a = site.model, "tensor"_a = site.tensor,
                   "chunk"_a = site.chunk, "offset"_a = site.offset));
  } catch (const tensorstream::ConfigError& e) {
    const nb::object cls = error_class("ConfigError");
    raise(cls, cls(e.what(), "field"_a = e.field()));
  } catch (const tensorstream::CudaError& e) {
    const nb::object cls = error_class("CudaError");
    raise(cls, cls(e.what(), "code"_a = e.code()));
  } catch (const tensorstream::Error& e) {
    const nb::object cls = error_class("TensorStreamError");
    raise(cls, cls(e.what()));
  }
}
}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "TensorStream engine (C++). Use the tensorstream package, not this module directly.";
  nb::register_exception_translator(translate_error);
  tensorstream::bindings::bind_store(m);
  tensorstream::bindings::bind_maintenance(m);
  tensorstream::bindings::bind_cuda(m);
  tensorstream::bindings::bind_engine(m);
}
