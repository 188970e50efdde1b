// The streaming engine. The arena is memory Python owns (a torch tensor) passed as (address, size); blocking calls
// (acquire, wait, engine construction and destruction, draining the trace) release the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/stl/function.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <optional>
#include <utility>

#include "bindings.hpp"
#include "tensorstream/config.hpp"
#include "bind_cuda.hpp"
#include "tensorstream/cuda/cuda_transfer.hpp"
#include "tensorstream/engine/engine.hpp"
#include "tensorstream/error.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace tensorstream::bindings {

namespace {
Config make_config(const std::string& backend, const std::string& direct_io, uint32_t num_io_threads,
                   uint32_t queue_depth, uint64_t budget_bytes, const std::string& prefetch,
                   const std::string& memory_pressure, bool verify_checksums) {
  Config config;
  config.backend = parse_backend(backend);
  config.direct_io = parse_direct_io(direct_io);
  config.num_io_threads = num_io_threads;
  config.queue_depth = queue_depth;
  config.budget_bytes = budget_bytes;
  config.prefetch = parse_prefetch(prefetch);
  config.memory_pressure = parse_memory_pressure(memory_pressure);
  config.verify_checksums = verify_checksums;
  config.validate();
  return config;
}

nb::dict config_dict(const Config& config) {
  nb::dict out;
  out["backend"] = std::string(backend_name(config.backend));
  out["direct_io"] = std::string(direct_io_name(config.direct_io));
  out["num_io_threads"] = config.num_io_threads;
  out["queue_depth"] = config.queue_depth;
  out["budget_bytes"] = config.budget_bytes;
  out["prefetch_strategy"] = std::string(prefetch_name(config.prefetch));
  out["memory_pressure_mode"] = std::string(pressure_name(config.memory_pressure));
  out["verify_checksums"] = config.verify_checksums;
  out["host_cache_bytes"] = config.host_cache_bytes;
  return out;
}

// A latency histogram as {"bounds_s": [...], "counts": [... one more, +Inf last], "count": n, "sum_s": x}.
nb::dict histogram_dict(const LatencyHistogramSnapshot& h) {
  nb::dict out;
  nb::list bounds;
  for (double bound : kLatencyBucketBoundsS) bounds.append(bound);
  nb::list counts;
  for (uint64_t count : h.counts) counts.append(count);
  out["bounds_s"] = bounds;
  out["counts"] = counts;
  out["count"] = h.count;
  out["sum_s"] = static_cast<double>(h.sum_ns) * 1e-9;
  return out;
}

nb::dict stats_dict(const StatsSnapshot& s) {
  nb::dict out;
  out["bytes_read"] = s.bytes_read;
  out["bytes_delivered"] = s.bytes_delivered;
  out["acquires"] = s.acquires;
  out["hits"] = s.hits;
  out["reuses"] = s.reuses;
  out["misses"] = s.misses;
  out["prefetch_hits"] = s.prefetch_hits;
  out["prefetches_issued"] = s.prefetches_issued;
  out["evictions"] = s.evictions;
  out["checksum_failures"] = s.checksum_failures;
  out["io_errors"] = s.io_errors;
  out["wait_ns"] = s.wait_ns;
  out["io_busy_ns"] = s.io_busy_ns;
  out["resident_bytes"] = s.resident_bytes;
  out["in_flight_bytes"] = s.in_flight_bytes;
  out["staging_bytes"] = s.staging_bytes;
  out["staging_peak_in_use_bytes"] = s.staging_peak_in_use_bytes;
  out["h2d_bytes"] = s.h2d_bytes;
  out["h2d_busy_ns"] = s.h2d_busy_ns;
  out["direct_bytes"] = s.direct_bytes;
  out["device_stall_ns"] = s.device_stall_ns;
  out["host_tier_hits"] = s.host_tier_hits;
  out["host_tier_bytes"] = s.host_tier_bytes;
  out["host_tier_held_bytes"] = s.host_tier_held_bytes;
  out["host_tier_evictions"] = s.host_tier_evictions;
  out["io_throughput_bytes_per_s"] = s.io_throughput_bytes_per_s();
  out["hit_rate"] = s.hit_rate();
  nb::list blocks;
  for (const BlockStatsSnapshot& b : s.blocks) {
    nb::dict entry;
    entry["loads"] = b.loads;
    entry["hits"] = b.hits;
    entry["reuses"] = b.reuses;
    entry["prefetch_hits"] = b.prefetch_hits;
    entry["evictions"] = b.evictions;
    entry["bytes_read"] = b.bytes_read;
    entry["wait_ns"] = b.wait_ns;
    entry["load_ns"] = b.load_ns;
    blocks.append(entry);
  }
  out["blocks"] = blocks;
  out["load_latency"] = histogram_dict(s.load_latency);
  out["wait_latency"] = histogram_dict(s.wait_latency);
  return out;
}

// Trace events as Python tuples (kind, block, tensor, chunk, bytes, start_ns, end_ns, lane_kind, lane_index); tuples,
// not dicts, because a long trace has millions of them. Needs the GIL.
nb::list trace_events_list(const std::vector<TraceEvent>& events) {
  nb::list out;
  for (const TraceEvent& e : events) {
    out.append(nb::make_tuple(std::string(trace_kind_name(e.kind)), e.block, e.tensor, e.chunk, e.bytes, e.start_ns,
                              e.end_ns, std::string(trace_lane_kind_name(e.lane.kind)), e.lane.index));
  }
  return out;
}

// Python handle: owns the engine and the reader it streams from.
struct PyEngine {
  std::unique_ptr<Engine> engine;
  // Trace events still buffered when the engine closed (accessed with the GIL held): kept so that whoever writes
  // the trace after close (the model's cleanup, or a finalizer that runs after the engine's) still gets the end of
  // the timeline.
  TraceBatch trace_at_close;

  ~PyEngine() {
    // Joining engine threads may wait for one that needs the GIL (an eviction callback): never hold it here.
    if (engine) {
      nb::gil_scoped_release release;
      engine.reset();
    }
  }
  Engine& get() {
    if (!engine) throw ConfigError("engine", "the engine was closed");
    return *engine;
  }
};
}  // namespace

void bind_engine(nb::module_& m) {
  m.def("config_from_env", [] { return config_dict(Config::from_env()); },
        "The engine defaults overridden by the TENSORSTREAM_* environment variables (strictly parsed).");
  m.def("validate_config", [](const std::string& backend, const std::string& direct_io, uint32_t num_io_threads,
                              uint32_t queue_depth, uint64_t budget_bytes, const std::string& prefetch,
                              const std::string& memory_pressure, bool verify_checksums) {
    return config_dict(make_config(backend, direct_io, num_io_threads, queue_depth, budget_bytes, prefetch,
                                   memory_pressure, verify_checksums));
  });
  m.def("backend_table", [] {
    nb::list out;
    for (const BackendTraits& traits : backend_table()) {
      nb::dict entry;
      entry["name"] = std::string(traits.name);
      entry["reader"] = std::string(backend_name(traits.reader));
      entry["device_slots"] = traits.device_slots;
      out.append(entry);
    }
    return out;
  }, "Every backend name with its reader and whether its slots live in device memory (one table, config.cpp).");
  m.def("io_uring_available", [] {
    std::string reason;
    const bool available = io_uring_available(&reason);
    return nb::make_tuple(available, reason);
  });

  nb::class_<Ticket>(m, "Ticket")
      .def_prop_ro("block", &Ticket::block)
      .def_prop_ro("ready", &Ticket::ready)
      .def_prop_ro("address", [](const Ticket& t) { return reinterpret_cast<uintptr_t>(t.data().data()); })
      .def_prop_ro("nbytes", [](const Ticket& t) { return t.data().size(); })
      .def_prop_ro("ready_event", &Ticket::ready_event)
      .def("wait", &Ticket::wait, nb::call_guard<nb::gil_scoped_release>())
      .def("wait_on_stream", &Ticket::wait_on_stream, "stream"_a, nb::call_guard<nb::gil_scoped_release>());

  nb::class_<PyEngine>(m, "Engine")
      .def(
          "__init__",
          [](PyEngine* self, const StorageDirectory& storage, const std::string& model_id, uintptr_t arena_address,
             size_t arena_bytes, const std::string& backend, const std::string& direct_io, uint32_t num_io_threads,
             uint32_t queue_depth, uint64_t budget_bytes, const std::string& prefetch,
             const std::string& memory_pressure, bool verify_checksums, std::optional<std::vector<size_t>> blocks,
             int device, const PyCudaDouble* cuda_double, uint64_t host_cache_bytes) {
            Config config = make_config(backend, direct_io, num_io_threads, queue_depth, budget_bytes, prefetch,
                                        memory_pressure, verify_checksums);
            config.host_cache_bytes = host_cache_bytes;
            if (arena_address == 0) throw ConfigError("arena", "null arena address");
            if (cuda_double != nullptr && !backend_traits(config.backend).device_slots) {
              throw ConfigError("backend", "a CUDA double drives device slots: use backend 'cuda'");
            }
            nb::gil_scoped_release release;
            auto reader = std::make_shared<const StoreReader>(StoreReader::open(storage, model_id));
            // The destination half of the backend table: host slots, CUDA on `device`, or CUDA on the test double.
            const SlotAccess access = backend_traits(config.backend).reader == BackendKind::kGpuDirect
                                          ? SlotAccess::kDeviceDirect
                                          : SlotAccess::kDeviceByCopy;
            std::unique_ptr<Transfer> transfer = cuda_double != nullptr
                                                     ? std::make_unique<CudaTransfer>(cuda_double->api, device, access)
                                                     : make_transfer(config.backend, device);
            new (self) PyEngine{std::make_unique<Engine>(
                std::move(reader), std::span(reinterpret_cast<std::byte*>(arena_address), arena_bytes), config,
                nullptr, std::move(transfer), std::move(blocks))};
          },
          "storage"_a, "model_id"_a, "arena_address"_a, "arena_bytes"_a, "backend"_a = "auto",
          "direct_io"_a = "auto", "num_io_threads"_a = 4, "queue_depth"_a = 32, "budget_bytes"_a = 0,
          "prefetch_strategy"_a = "adaptive", "memory_pressure_mode"_a = "balanced", "verify_checksums"_a = true,
          "blocks"_a = nb::none(), "device"_a = 0, "cuda_double"_a = nb::none(), "host_cache_bytes"_a = 0)
      .def("close",
           [](PyEngine& e) {
             std::unique_ptr<Engine> engine = std::move(e.engine);
             TraceBatch last;
             if (engine) {
               nb::gil_scoped_release release;
               engine->disable_tracing();
               last = engine->drain_trace();
               engine.reset();
             }
             e.trace_at_close.events.insert(e.trace_at_close.events.end(), last.events.begin(), last.events.end());
             e.trace_at_close.dropped += last.dropped;
           })
      .def("acquire",
           [](PyEngine& e, size_t block) {
             Engine& engine = e.get();
             nb::gil_scoped_release release;
             return engine.acquire(block);
           })
      .def(
          "release",
          [](PyEngine& e, size_t block, std::optional<uintptr_t> stream) {
            Engine& engine = e.get();
            nb::gil_scoped_release release;
            engine.release(block, stream);
          },
          "block"_a, "stream"_a = nb::none(),
          "Unpins the block; with device slots and a consumer stream (a native handle, 0 being CUDA's legacy "
          "default stream), records the fence later copies into its slot wait for.")
      .def("prefetch",
           [](PyEngine& e, size_t block) {
             Engine& engine = e.get();
             nb::gil_scoped_release release;
             engine.prefetch(block);
           })
      .def("set_budget",
           [](PyEngine& e, uint64_t bytes) {
             Engine& engine = e.get();
             nb::gil_scoped_release release;
             engine.set_budget(bytes);
           })
      .def_prop_ro("closed", [](const PyEngine& e) { return !e.engine; })
      .def_prop_ro("budget_bytes", [](PyEngine& e) { return e.get().budget_bytes(); })
      .def_prop_ro("static_bytes", [](PyEngine& e) { return e.get().static_bytes(); })
      .def("stats", [](PyEngine& e) { return stats_dict(e.get().stats()); })
      .def("reset_stats", [](PyEngine& e) { e.get().reset_stats(); })
      .def("config", [](PyEngine& e) { return config_dict(e.get().config()); })
      .def_prop_ro("backend_name", [](PyEngine& e) { return e.get().backend_name(); })
      .def_prop_ro("backend_fallback_reason", [](PyEngine& e) { return e.get().backend_fallback_reason(); })
      .def_prop_ro("page_cache_policy", [](PyEngine& e) { return std::string(e.get().page_cache_policy()); })
      .def_prop_ro("slot_access", [](PyEngine& e) { return std::string(slot_access_name(e.get().slot_access())); })
      .def_prop_ro("transfer_name", [](PyEngine& e) { return e.get().transfer_name(); })
      .def("learned_order", [](PyEngine& e) { return e.get().learned_order(); })
      .def_prop_ro("lookahead", [](PyEngine& e) { return e.get().lookahead(); })
      .def_prop_ro("prefetch_off", [](PyEngine& e) { return e.get().prefetch_off(); })
      .def_prop_ro("prefetch_checks", [](PyEngine& e) { return e.get().prefetch_checks(); })
      .def("set_eviction_callback", [](PyEngine& e, std::function<void(size_t)> callback) {
        // Called on engine threads without engine locks; nanobind's function caster takes the GIL for the call.
        e.get().set_eviction_callback(std::move(callback));
      })
      .def(
          "enable_tracing", [](PyEngine& e, size_t max_events) { e.get().enable_tracing(max_events); },
          "max_events"_a = TraceRecorder::kDefaultMaxEvents,
          "Records reads, checksums, decodes, transfers and caller waits until disable_tracing(); at most max_events "
          "are buffered between drains, the rest are counted as dropped.")
      .def("disable_tracing", [](PyEngine& e) { e.get().disable_tracing(); })
      .def_prop_ro("tracing", [](const PyEngine& e) { return e.engine != nullptr && e.engine->tracing(); })
      .def(
          "drain_trace",
          [](PyEngine& e) {
            TraceBatch batch = std::exchange(e.trace_at_close, TraceBatch{});  // with the GIL, like close()
            Engine* engine = e.engine.get();
            if (engine != nullptr) {
              // Collecting takes the recorder's lock, which engine threads take for every event: without the GIL.
              nb::gil_scoped_release release;
              TraceBatch more = engine->drain_trace();
              batch.events.insert(batch.events.end(), more.events.begin(), more.events.end());
              batch.dropped += more.dropped;
            }
            return nb::make_tuple(trace_events_list(batch.events), batch.dropped);
          },
          "(events, dropped): the events buffered since the last drain, as tuples (kind, block, tensor, chunk, "
          "bytes, start_ns, end_ns, lane_kind, lane_index), and how many were dropped. Times are CLOCK_MONOTONIC "
          "nanoseconds (time.monotonic_ns()). Works after close() too: it then returns what was left at close.");
}

}  // namespace tensorstream::bindings
