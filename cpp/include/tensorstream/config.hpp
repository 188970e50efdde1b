// Engine configuration: a plain value, validated in one place, with every TENSORSTREAM_* environment variable
// parsed strictly in Config::from_env (docs/configuration.md lists them).
//
// Thread-safety: value type.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

namespace tensorstream {

// The user-facing backend: a reader (how bytes reach memory) and a destination (where slots live), from one table
// (kBackends in config.cpp; backend_traits() reads it). Names: "auto", "pread", "io_uring", "mmap", "cuda",
// "gpudirect".
enum class BackendKind : uint8_t {
  kAuto,       // io_uring when the kernel allows it, else the pread pool; the reason is recorded. Host slots.
  kPread,      // thread pool of pread(2): always available. Host slots.
  kIoUring,    // liburing; falls back to kPread (reason logged) when io_uring is unavailable. Host slots.
  kMmap,       // mapped file: zero-copy views of raw blocks for CPU execution. Host slots.
  kCuda,       // reads as kAuto into pinned staging, copied to device slots (needs a CUDA Transfer)
  kGpuDirect,  // cuFile reads straight into device slots (needs a CUDA Transfer and cuFile)
};

struct BackendTraits {
  std::string_view name;
  BackendKind reader = BackendKind::kAuto;  // kAuto, kPread, kIoUring or kMmap for the host readers; kGpuDirect: cuFile
  bool device_slots = false;                // slots live in device memory, filled through a device Transfer
};
// Every backend, in declaration order.
[[nodiscard]] std::span<const BackendTraits> backend_table() noexcept;
[[nodiscard]] const BackendTraits& backend_traits(BackendKind kind) noexcept;

enum class DirectIoMode : uint8_t {
  kAuto,  // O_DIRECT for data not in the page cache, buffered for data that is (checked with mincore)
  kOn,
  kOff,
};

enum class PrefetchStrategy : uint8_t { kNone, kNextLayer, kAdaptive };

enum class MemoryPressureMode : uint8_t { kConservative, kBalanced, kAggressive };

struct Config {
  BackendKind backend = BackendKind::kAuto;
  DirectIoMode direct_io = DirectIoMode::kAuto;
  uint32_t num_io_threads = 4;   // workers that read, verify and decompress; 1..64
  uint32_t queue_depth = 32;     // chunk reads in flight at once; 1..4096
  uint64_t budget_bytes = 0;     // bytes of streamed weights held at once; 0 = the whole arena
  uint64_t host_cache_bytes = 0; // device slots: decoded blocks kept in pinned host memory (HostTier); 0 = off
  PrefetchStrategy prefetch = PrefetchStrategy::kAdaptive;
  MemoryPressureMode memory_pressure = MemoryPressureMode::kBalanced;
  bool verify_checksums = true;

  // Throws ConfigError naming the field and its allowed values.
  void validate() const;
  // `base` overridden by TENSORSTREAM_BACKEND, TENSORSTREAM_DIRECT_IO, TENSORSTREAM_IO_THREADS,
  // TENSORSTREAM_QUEUE_DEPTH, TENSORSTREAM_PREFETCH, TENSORSTREAM_MEMORY_PRESSURE, TENSORSTREAM_VERIFY_CHECKSUMS,
  // TENSORSTREAM_VRAM_BUDGET and TENSORSTREAM_HOST_CACHE_GB (GB, decimal). A malformed value is a ConfigError
  // naming the variable.
  [[nodiscard]] static Config from_env(const Config& base);
  [[nodiscard]] static Config from_env();
};

// Names <-> values, each from its one table in config.cpp: the environment parser and the bindings use these, so a
// new value is added in one place. parse_* throw ConfigError naming `field` and the allowed names.
[[nodiscard]] BackendKind parse_backend(std::string_view text, std::string_view field = "backend");
[[nodiscard]] DirectIoMode parse_direct_io(std::string_view text, std::string_view field = "direct_io");
[[nodiscard]] PrefetchStrategy parse_prefetch(std::string_view text, std::string_view field = "prefetch_strategy");
[[nodiscard]] MemoryPressureMode parse_memory_pressure(std::string_view text,
                                                       std::string_view field = "memory_pressure_mode");

[[nodiscard]] std::string_view backend_name(BackendKind kind) noexcept;  // "auto", "pread", "io_uring", "mmap", ...
[[nodiscard]] std::string_view prefetch_name(PrefetchStrategy strategy) noexcept;  // "none", "next_layer", "adaptive"
[[nodiscard]] std::string_view pressure_name(MemoryPressureMode mode) noexcept;  // "conservative", ...
[[nodiscard]] std::string_view direct_io_name(DirectIoMode mode) noexcept;       // "auto", "on", "off"

}  // namespace tensorstream
