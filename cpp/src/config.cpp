#include "tensorstream/config.hpp"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <iterator>
#include <optional>

#include "tensorstream/error.hpp"

namespace tensorstream {

namespace {
// Hard limits. 64 workers saturate any NVMe array we know of; more threads only add contention.
constexpr uint32_t kMaxIoThreads = 64;
constexpr uint32_t kMaxQueueDepth = 4096;

template <typename Enum, size_t N>
std::optional<Enum> lookup(std::string_view text, const std::pair<std::string_view, Enum> (&table)[N]) {
  for (const auto& [name, value] : table) {
    if (name == text) return value;
  }
  return std::nullopt;
}

template <typename Enum, size_t N>
std::string_view name_of(Enum value, const std::pair<std::string_view, Enum> (&table)[N]) {
  for (const auto& [name, entry] : table) {
    if (entry == value) return name;
  }
  return "?";
}

template <size_t N, typename Enum>
std::string allowed(const std::pair<std::string_view, Enum> (&table)[N]) {
  std::string text;
  for (const auto& [name, value] : table) text += (text.empty() ? "" : ", ") + std::string(name);
  return text;
}

// The one table of backends: name, reader, destination. Order = BackendKind's declaration order.
constexpr BackendTraits kBackendTraits[] = {
    {"auto", BackendKind::kAuto, false},    {"pread", BackendKind::kPread, false},
    {"io_uring", BackendKind::kIoUring, false}, {"mmap", BackendKind::kMmap, false},
    {"cuda", BackendKind::kAuto, true},     {"gpudirect", BackendKind::kGpuDirect, true}};
constexpr std::pair<std::string_view, BackendKind> kBackends[] = {
    {kBackendTraits[0].name, BackendKind::kAuto},    {kBackendTraits[1].name, BackendKind::kPread},
    {kBackendTraits[2].name, BackendKind::kIoUring}, {kBackendTraits[3].name, BackendKind::kMmap},
    {kBackendTraits[4].name, BackendKind::kCuda},    {kBackendTraits[5].name, BackendKind::kGpuDirect}};
static_assert(std::size(kBackendTraits) == std::size(kBackends));
constexpr std::pair<std::string_view, DirectIoMode> kDirectModes[] = {
    {"auto", DirectIoMode::kAuto}, {"on", DirectIoMode::kOn}, {"off", DirectIoMode::kOff}};
constexpr std::pair<std::string_view, PrefetchStrategy> kPrefetch[] = {
    {"none", PrefetchStrategy::kNone}, {"next_layer", PrefetchStrategy::kNextLayer},
    {"adaptive", PrefetchStrategy::kAdaptive}};
constexpr std::pair<std::string_view, MemoryPressureMode> kPressure[] = {
    {"conservative", MemoryPressureMode::kConservative}, {"balanced", MemoryPressureMode::kBalanced},
    {"aggressive", MemoryPressureMode::kAggressive}};
constexpr std::pair<std::string_view, bool> kBooleans[] = {
    {"1", true}, {"0", false}, {"true", true}, {"false", false}, {"on", true}, {"off", false}};

std::optional<std::string> env(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return std::nullopt;
  return std::string(value);
}

template <typename Enum, size_t N>
Enum parse_or_throw(std::string_view text, std::string_view field, const std::pair<std::string_view, Enum> (&table)[N]) {
  const auto value = lookup(text, table);
  if (!value) throw ConfigError(std::string(field), "'" + std::string(text) + "' is not one of: " + allowed(table));
  return *value;
}

template <typename Enum, size_t N>
void parse_enum_env(const char* variable, const std::pair<std::string_view, Enum> (&table)[N], Enum& out) {
  const auto text = env(variable);
  if (!text) return;
  out = parse_or_throw(*text, variable, table);
}

uint64_t parse_unsigned(const char* variable, const std::string& text, uint64_t max) {
  errno = 0;
  char* end = nullptr;
  const unsigned long long value = std::strtoull(text.c_str(), &end, 10);
  if (errno != 0 || end == text.c_str() || *end != '\0' || text[0] == '-' || value > max) {
    throw ConfigError(variable, "'" + text + "' is not an integer in 0.." + std::to_string(max));
  }
  return value;
}
}  // namespace

std::span<const BackendTraits> backend_table() noexcept { return kBackendTraits; }
const BackendTraits& backend_traits(BackendKind kind) noexcept {
  const auto index = static_cast<size_t>(kind);
  return kBackendTraits[index < std::size(kBackendTraits) ? index : 0];
}

BackendKind parse_backend(std::string_view text, std::string_view field) { return parse_or_throw(text, field, kBackends); }
DirectIoMode parse_direct_io(std::string_view text, std::string_view field) {
  return parse_or_throw(text, field, kDirectModes);
}
PrefetchStrategy parse_prefetch(std::string_view text, std::string_view field) {
  return parse_or_throw(text, field, kPrefetch);
}
MemoryPressureMode parse_memory_pressure(std::string_view text, std::string_view field) {
  return parse_or_throw(text, field, kPressure);
}

std::string_view backend_name(BackendKind kind) noexcept { return name_of(kind, kBackends); }
std::string_view prefetch_name(PrefetchStrategy strategy) noexcept { return name_of(strategy, kPrefetch); }
std::string_view pressure_name(MemoryPressureMode mode) noexcept { return name_of(mode, kPressure); }
std::string_view direct_io_name(DirectIoMode mode) noexcept { return name_of(mode, kDirectModes); }

void Config::validate() const {
  if (num_io_threads < 1 || num_io_threads > kMaxIoThreads) {
    throw ConfigError("num_io_threads", std::to_string(num_io_threads) + " is outside 1.." + std::to_string(kMaxIoThreads));
  }
  if (queue_depth < 1 || queue_depth > kMaxQueueDepth) {
    throw ConfigError("queue_depth", std::to_string(queue_depth) + " is outside 1.." + std::to_string(kMaxQueueDepth));
  }
  if (!lookup(backend_name(backend), kBackends)) throw ConfigError("backend", "unknown value; allowed: " + allowed(kBackends));
  if (!lookup(prefetch_name(prefetch), kPrefetch)) throw ConfigError("prefetch_strategy", "unknown value; allowed: " + allowed(kPrefetch));
  if (!lookup(pressure_name(memory_pressure), kPressure)) {
    throw ConfigError("memory_pressure_mode", "unknown value; allowed: " + allowed(kPressure));
  }
  if (!lookup(direct_io_name(direct_io), kDirectModes)) throw ConfigError("direct_io", "unknown value; allowed: " + allowed(kDirectModes));
}

Config Config::from_env() { return from_env(Config{}); }

Config Config::from_env(const Config& base) {
  Config config = base;
  parse_enum_env("TENSORSTREAM_BACKEND", kBackends, config.backend);
  parse_enum_env("TENSORSTREAM_DIRECT_IO", kDirectModes, config.direct_io);
  parse_enum_env("TENSORSTREAM_PREFETCH", kPrefetch, config.prefetch);
  parse_enum_env("TENSORSTREAM_MEMORY_PRESSURE", kPressure, config.memory_pressure);
  parse_enum_env("TENSORSTREAM_VERIFY_CHECKSUMS", kBooleans, config.verify_checksums);
  if (const auto text = env("TENSORSTREAM_IO_THREADS")) {
    config.num_io_threads = static_cast<uint32_t>(parse_unsigned("TENSORSTREAM_IO_THREADS", *text, kMaxIoThreads));
  }
  if (const auto text = env("TENSORSTREAM_QUEUE_DEPTH")) {
    config.queue_depth = static_cast<uint32_t>(parse_unsigned("TENSORSTREAM_QUEUE_DEPTH", *text, kMaxQueueDepth));
  }
  if (const auto text = env("TENSORSTREAM_VRAM_BUDGET")) {
    errno = 0;
    char* end = nullptr;
    const double gigabytes = std::strtod(text->c_str(), &end);
    if (errno != 0 || end == text->c_str() || *end != '\0' || !std::isfinite(gigabytes) || gigabytes <= 0 ||
        gigabytes > 1e6) {
      throw ConfigError("TENSORSTREAM_VRAM_BUDGET", "'" + *text + "' is not a positive number of gigabytes");
    }
    config.budget_bytes = static_cast<uint64_t>(gigabytes * 1e9);
  }
  if (const auto text = env("TENSORSTREAM_HOST_CACHE_GB")) {
    errno = 0;
    char* end = nullptr;
    const double gigabytes = std::strtod(text->c_str(), &end);
    if (errno != 0 || end == text->c_str() || *end != '\0' || !std::isfinite(gigabytes) || gigabytes < 0 ||
        gigabytes > 1e6) {
      throw ConfigError("TENSORSTREAM_HOST_CACHE_GB", "'" + *text + "' is not a number of gigabytes >= 0");
    }
    config.host_cache_bytes = static_cast<uint64_t>(gigabytes * 1e9);
  }
  config.validate();
  return config;
}

}  // namespace tensorstream
