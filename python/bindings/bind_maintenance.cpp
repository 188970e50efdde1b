// verify / cleanup / defragment, returning plain dicts that tensorstream.maintenance wraps in report classes.
#include <nanobind/nanobind.h>
#include <nanobind/stl/filesystem.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "bindings.hpp"
#include "tensorstream/store/maintenance.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace tensorstream::bindings {

void bind_maintenance(nb::module_& m) {
  m.def(
      "verify_storage",
      [](const std::string& root, const std::optional<std::string>& model) {
        VerifyReport report;
        {
          nb::gil_scoped_release release;
          report = verify_storage(root, model);
        }
        nb::list models;
        for (const ModelVerification& v : report.models) {
          nb::list bad;
          for (const ChunkProblem& p : v.bad_chunks) {
            nb::dict problem;
            problem["model"] = p.model;
            problem["tensor"] = p.tensor;
            problem["chunk"] = p.chunk;
            problem["offset"] = p.offset;
            problem["error"] = p.error;
            bad.append(problem);
          }
          nb::dict entry;
          entry["model"] = v.model;
          entry["ok"] = v.ok;
          entry["tensors"] = v.tensors;
          entry["chunks_checked"] = v.chunks_checked;
          entry["bytes_checked"] = v.bytes_checked;
          entry["error"] = v.error;
          entry["bad_chunks"] = bad;
          models.append(entry);
        }
        nb::dict out;
        out["ok"] = report.ok;
        out["models"] = models;
        out["orphans"] = report.orphans;
        return out;
      },
      "root"_a, "model"_a = nb::none());

  m.def(
      "cleanup_orphans",
      [](const std::string& root, bool dry_run) {
        CleanupReport report;
        {
          nb::gil_scoped_release release;
          report = cleanup_orphans(root, dry_run);
        }
        nb::dict out;
        out["removed"] = report.removed;
        out["kept_in_use"] = report.kept_in_use;
        out["bytes_freed"] = report.bytes_freed;
        out["dry_run"] = report.dry_run;
        return out;
      },
      "root"_a, "dry_run"_a = false);

  m.def(
      "defragment",
      [](const std::string& root, const std::optional<std::string>& model) {
        DefragReport report;
        {
          nb::gil_scoped_release release;
          report = defragment(root, model);
        }
        nb::list models;
        for (const ModelDefrag& d : report.models) {
          nb::dict entry;
          entry["model"] = d.model;
          entry["rewritten"] = d.rewritten;
          entry["reason"] = d.reason;
          entry["bytes_before"] = d.bytes_before;
          entry["bytes_after"] = d.bytes_after;
          models.append(entry);
        }
        nb::dict out;
        out["models"] = models;
        return out;
      },
      "root"_a, "model"_a = nb::none());

  m.def("write_execution_order", &write_execution_order, "root"_a, "model"_a, "block_names"_a,
        nb::call_guard<nb::gil_scoped_release>());
  m.def("read_execution_order", &read_execution_order, "root"_a, "model"_a);
}

}  // namespace tensorstream::bindings
