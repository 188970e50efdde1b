#include "tensorstream/config.hpp"

#include <gtest/gtest.h>

#include <cstdlib>
#include <functional>

#include "tensorstream/error.hpp"

namespace tensorstream {
namespace {

// Sets an environment variable for the lifetime of the object.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) { ::setenv(name, value, 1); }
  ~ScopedEnv() { ::unsetenv(name_); }

 private:
  const char* name_;
};

void expect_field(const std::function<void()>& action, const std::string& field) {
  try {
    action();
    ADD_FAILURE() << "no ConfigError for " << field;
  } catch (const ConfigError& error) {
    EXPECT_EQ(error.field(), field) << error.what();
  }
}

TEST(Config, DefaultsAreValid) {
  EXPECT_NO_THROW(Config{}.validate());
  EXPECT_EQ(Config::from_env().num_io_threads, Config{}.num_io_threads);
}

TEST(Config, ValidateNamesTheField) {
  Config c;
  c.num_io_threads = 0;
  expect_field([&] { c.validate(); }, "num_io_threads");
  c = Config{};
  c.num_io_threads = 65;
  expect_field([&] { c.validate(); }, "num_io_threads");
  c = Config{};
  c.queue_depth = 0;
  expect_field([&] { c.validate(); }, "queue_depth");
  c = Config{};
  c.backend = static_cast<BackendKind>(42);
  expect_field([&] { c.validate(); }, "backend");
}

TEST(Config, EnvironmentOverridesEachField) {
  ScopedEnv backend("TENSORSTREAM_BACKEND", "io_uring");
  ScopedEnv direct("TENSORSTREAM_DIRECT_IO", "off");
  ScopedEnv threads("TENSORSTREAM_IO_THREADS", "7");
  ScopedEnv depth("TENSORSTREAM_QUEUE_DEPTH", "128");
  ScopedEnv prefetch("TENSORSTREAM_PREFETCH", "next_layer");
  ScopedEnv pressure("TENSORSTREAM_MEMORY_PRESSURE", "aggressive");
  ScopedEnv verify("TENSORSTREAM_VERIFY_CHECKSUMS", "0");
  ScopedEnv budget("TENSORSTREAM_VRAM_BUDGET", "1.5");
  const Config c = Config::from_env();
  EXPECT_EQ(c.backend, BackendKind::kIoUring);
  EXPECT_EQ(c.direct_io, DirectIoMode::kOff);
  EXPECT_EQ(c.num_io_threads, 7u);
  EXPECT_EQ(c.queue_depth, 128u);
  EXPECT_EQ(c.prefetch, PrefetchStrategy::kNextLayer);
  EXPECT_EQ(c.memory_pressure, MemoryPressureMode::kAggressive);
  EXPECT_FALSE(c.verify_checksums);
  EXPECT_EQ(c.budget_bytes, 1500000000u);
}

TEST(Config, MalformedEnvironmentIsAConfigErrorNamingTheVariable) {
  const std::pair<const char*, const char*> cases[] = {
      {"TENSORSTREAM_BACKEND", "gpudirect2"}, {"TENSORSTREAM_IO_THREADS", "-1"}, {"TENSORSTREAM_IO_THREADS", "4x"},
      {"TENSORSTREAM_IO_THREADS", "0"},       {"TENSORSTREAM_VRAM_BUDGET", "lots"}, {"TENSORSTREAM_VRAM_BUDGET", "-2"},
      {"TENSORSTREAM_VRAM_BUDGET", "nan"},    {"TENSORSTREAM_PREFETCH", "Adaptive"}, {"TENSORSTREAM_VERIFY_CHECKSUMS", "yes"},
  };
  for (const auto& [name, value] : cases) {
    ScopedEnv env(name, value);
    try {
      (void)Config::from_env();
      ADD_FAILURE() << name << "=" << value << " accepted";
    } catch (const ConfigError& error) {
      // Range errors found by validate() name the setting; parse errors name the variable.
      const std::string field = error.field();
      EXPECT_TRUE(field == name || field == "num_io_threads") << name << "=" << value << ": " << error.what();
    }
  }
}

TEST(Config, NamesRoundTrip) {
  EXPECT_EQ(backend_name(BackendKind::kMmap), "mmap");
  EXPECT_EQ(prefetch_name(PrefetchStrategy::kAdaptive), "adaptive");
  EXPECT_EQ(pressure_name(MemoryPressureMode::kConservative), "conservative");
  EXPECT_EQ(direct_io_name(DirectIoMode::kAuto), "auto");
}

TEST(Config, EveryBackendOfTheTableParsesBackToItself) {
  const auto table = backend_table();
  ASSERT_EQ(table.size(), 6u);
  for (size_t i = 0; i < table.size(); ++i) {
    const auto kind = static_cast<BackendKind>(i);
    EXPECT_EQ(&backend_traits(kind), &table[i]) << "the table is in declaration order";
    EXPECT_EQ(backend_name(kind), table[i].name);
    EXPECT_EQ(parse_backend(table[i].name), kind);
    // A reader is a host reader (auto, pread, io_uring, mmap) or cuFile (gpudirect); "cuda" is only a destination.
    EXPECT_NE(table[i].reader, BackendKind::kCuda) << table[i].name;
    EXPECT_EQ(table[i].reader == BackendKind::kGpuDirect || !backend_traits(table[i].reader).device_slots, true);
  }
  EXPECT_TRUE(backend_traits(BackendKind::kCuda).device_slots);
  EXPECT_EQ(backend_traits(BackendKind::kCuda).reader, BackendKind::kAuto);
  EXPECT_TRUE(backend_traits(BackendKind::kGpuDirect).device_slots);
  EXPECT_FALSE(backend_traits(BackendKind::kMmap).device_slots);
}

TEST(Config, ParsersNameTheFieldAndTheAllowedValues) {
  EXPECT_EQ(parse_direct_io("off"), DirectIoMode::kOff);
  EXPECT_EQ(parse_prefetch("next_layer"), PrefetchStrategy::kNextLayer);
  EXPECT_EQ(parse_memory_pressure("aggressive"), MemoryPressureMode::kAggressive);
  expect_field([] { (void)parse_backend("nvme"); }, "backend");
  expect_field([] { (void)parse_backend("MMAP", "TENSORSTREAM_BACKEND"); }, "TENSORSTREAM_BACKEND");
  expect_field([] { (void)parse_direct_io("yes"); }, "direct_io");
  expect_field([] { (void)parse_prefetch("all"); }, "prefetch_strategy");
  expect_field([] { (void)parse_memory_pressure("low"); }, "memory_pressure_mode");
  try {
    (void)parse_backend("nvme");
  } catch (const ConfigError& error) {
    const std::string what = error.what();
    for (const BackendTraits& traits : backend_table()) {
      EXPECT_NE(what.find(std::string(traits.name)), std::string::npos) << what;  // every allowed name listed
    }
  }
}

TEST(Config, EnvironmentTakesTheGpuBackendNames) {
  const ScopedEnv backend("TENSORSTREAM_BACKEND", "gpudirect");
  EXPECT_EQ(Config::from_env().backend, BackendKind::kGpuDirect);
}

}  // namespace
}  // namespace tensorstream
