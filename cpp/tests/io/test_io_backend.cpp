#include "tensorstream/io/io_backend.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "io/uring_backend.hpp"
#include "support/fault_backend.hpp"
#include "support/temp_dir.hpp"
#include "tensorstream/error.hpp"
#include "tensorstream/io/file.hpp"

namespace tensorstream {
namespace {

using testing::FaultPlan;
using testing::TempDir;
using testing::Watchdog;

constexpr uint64_t kFileSize = 8ull << 20;

struct Range {
  uint64_t offset = 0;
  uint64_t length = 0;
};

// `count` random ranges inside [0, file_size): lengths from 1 byte to 256 KiB, offsets anywhere.
std::vector<Range> random_ranges(size_t count, uint64_t file_size, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Range> ranges;
  for (size_t i = 0; i < count; ++i) {
    const uint64_t offset = rng() % file_size;
    const uint64_t max_length = std::min<uint64_t>(256 * 1024, file_size - offset);
    ranges.push_back({offset, 1 + rng() % max_length});
  }
  return ranges;
}

// One file of random bytes, kept open for reading.
struct TestFile {
  explicit TestFile(const TempDir& dir, uint64_t size = kFileSize, uint64_t seed = 42)
      : path(dir.path() / "data"), bytes(testing::random_bytes(size, seed)) {
    testing::write_file_bytes(path, bytes);
    fd = open_file(path, O_RDONLY);
  }
  std::filesystem::path path;
  std::vector<std::byte> bytes;
  UniqueFd fd;
};

// Restores the real io_uring probe however the test ends.
struct ProbeOverride {
  explicit ProbeOverride(std::string reason) { detail::override_io_uring_probe_for_testing(std::move(reason)); }
  ~ProbeOverride() { detail::override_io_uring_probe_for_testing(std::nullopt); }
};

// ---- make_backend / io_uring_available ---------------------------------------------------------------------------

TEST(MakeBackend, PreadKindIsThePool) {
  std::string reason = "stale";
  const auto backend = make_backend({BackendKind::kPread, 3, 16}, &reason);
  EXPECT_EQ(backend->caps().name, "pread");
  EXPECT_FALSE(backend->caps().zero_copy_views);
  EXPECT_EQ(backend->caps().max_in_flight, 3u);
  EXPECT_EQ(reason, "");  // no fallback happened
}

TEST(MakeBackend, MmapKindHasZeroCopyViews) {
  const auto backend = make_backend({BackendKind::kMmap, 4, 32});
  EXPECT_EQ(backend->caps().name, "mmap");
  EXPECT_TRUE(backend->caps().zero_copy_views);
}

TEST(MakeBackend, AutoAndIoUringResolveByTheProbe) {
  std::string probe_reason;
  const bool available = io_uring_available(&probe_reason);
  for (const BackendKind kind : {BackendKind::kAuto, BackendKind::kIoUring}) {
    std::string reason;
    const auto backend = make_backend({kind, 4, 8}, &reason);
    if (available) {
      EXPECT_EQ(backend->caps().name, "io_uring");
      EXPECT_EQ(backend->caps().max_in_flight, 8u);
      EXPECT_EQ(reason, "");
    } else {
      EXPECT_EQ(backend->caps().name, "pread");
      EXPECT_NE(reason.find(probe_reason), std::string::npos) << reason;
      EXPECT_NE(reason.find("using the pread pool"), std::string::npos) << reason;
    }
  }
}

TEST(MakeBackend, FallsBackToThePoolWithTheProbesReason) {
  const ProbeOverride unavailable("io_uring_queue_init failed with EPERM: Operation not permitted");
  std::string why;
  EXPECT_FALSE(io_uring_available(&why));
  EXPECT_EQ(why, "io_uring_queue_init failed with EPERM: Operation not permitted");
  for (const BackendKind kind : {BackendKind::kAuto, BackendKind::kIoUring}) {
    std::string reason;
    const auto backend = make_backend({kind, 2, 32}, &reason);
    EXPECT_EQ(backend->caps().name, "pread");
    EXPECT_EQ(reason,
              "io_uring unavailable (io_uring_queue_init failed with EPERM: Operation not permitted); using the "
              "pread pool");
  }
  // The fallback backend works.
  TempDir dir;
  TestFile file(dir, 4096);
  const auto backend = make_backend({BackendKind::kAuto, 2, 32});
  std::vector<std::byte> out(100);
  const ReadRequest request{file.fd.get(), 10, out, 0};
  read_all_blocking(*backend, {&request, 1}, file.path.string());
  EXPECT_TRUE(std::equal(out.begin(), out.end(), file.bytes.begin() + 10));
}

TEST(MakeBackend, ProbeIsCachedAndExplainsItself) {
  std::string first;
  std::string second;
  const bool a = io_uring_available(&first);
  const bool b = io_uring_available(&second);
  EXPECT_EQ(a, b);
  EXPECT_EQ(first, second);
  EXPECT_EQ(a, first.empty()) << "a reason exactly when unavailable: " << first;
  EXPECT_TRUE(io_uring_available() == a);  // reason is optional
}

TEST(MakeBackend, CudaReadsWithTheHostReaderAndGpuDirectNeedsCuFile) {
  BackendOptions options;
  options.kind = BackendKind::kCuda;
  const auto backend = make_backend(options);
  EXPECT_TRUE(backend->caps().name == "io_uring" || backend->caps().name == "pread") << backend->caps().name;
  options.kind = BackendKind::kGpuDirect;
  try {
    (void)make_backend(options);
    ADD_FAILURE() << "gpudirect made a reader without cuFile";
  } catch (const ConfigError& error) {
    EXPECT_EQ(error.field(), "backend");
    EXPECT_NE(std::string(error.what()).find("cuFile"), std::string::npos) << error.what();
  }
}

TEST(MakeBackend, RejectsZeroSizes) {
  EXPECT_THROW((void)make_backend({BackendKind::kPread, 0, 32}), ConfigError);
  if (io_uring_available()) {
    EXPECT_THROW((void)make_backend({BackendKind::kIoUring, 4, 0}), ConfigError);
  }
}

TEST(IoBackendDefaults, ViewIsEmptyAndHintsAreHarmless) {
  TempDir dir;
  TestFile file(dir, 1 << 20);
  const auto backend = make_backend({BackendKind::kPread, 2, 32});
  EXPECT_TRUE(backend->view(file.fd.get(), 0, 4096).empty());
  backend->will_need(file.fd.get(), 0, 1 << 20);
  backend->dont_need(file.fd.get(), 4096, 8192);
  backend->will_need(file.fd.get(), 0, 0);
  backend->dont_need(-1, 0, 100);  // a bad descriptor is only a failed hint
  std::vector<std::byte> out(1 << 20);
  const ReadRequest request{file.fd.get(), 0, out, 0};
  read_all_blocking(*backend, {&request, 1}, file.path.string());
  EXPECT_EQ(out, file.bytes);
}

// ---- read_all_blocking -----------------------------------------------------------------------------------------

TEST(ReadAllBlocking, EveryBackendReadsEveryRange) {
  const Watchdog dog("ReadAllBlocking.EveryBackendReadsEveryRange");
  TempDir dir;
  TestFile file(dir);
  std::vector<BackendKind> kinds = {BackendKind::kPread, BackendKind::kMmap};
  if (io_uring_available()) kinds.push_back(BackendKind::kIoUring);
  for (const BackendKind kind : kinds) {
    SCOPED_TRACE(static_cast<int>(kind));
    const auto backend = make_backend({kind, 4, 8});
    const auto ranges = random_ranges(100, kFileSize, 3);
    std::vector<std::vector<std::byte>> buffers;
    std::vector<ReadRequest> requests;
    for (const Range& range : ranges) buffers.emplace_back(range.length);
    for (size_t i = 0; i < ranges.size(); ++i) requests.push_back({file.fd.get(), ranges[i].offset, buffers[i], 7});
    read_all_blocking(*backend, requests, file.path.string());
    for (size_t i = 0; i < ranges.size(); ++i) {
      ASSERT_TRUE(std::equal(buffers[i].begin(), buffers[i].end(),
                             file.bytes.begin() + static_cast<std::ptrdiff_t>(ranges[i].offset)))
          << "range " << i;
    }
    EXPECT_EQ(backend->in_flight(), 0u);
  }
}

TEST(ReadAllBlocking, EndOfFileNamesPathOffsetAndCause) {
  const Watchdog dog("ReadAllBlocking.EndOfFileNamesPathOffsetAndCause");
  TempDir dir;
  TestFile file(dir, 10000);
  std::vector<BackendKind> kinds = {BackendKind::kPread, BackendKind::kMmap};
  if (io_uring_available()) kinds.push_back(BackendKind::kIoUring);
  for (const BackendKind kind : kinds) {
    SCOPED_TRACE(static_cast<int>(kind));
    const auto backend = make_backend({kind, 2, 4});
    std::vector<std::byte> good(100);
    std::vector<std::byte> bad(200);
    const std::vector<ReadRequest> requests = {{file.fd.get(), 0, good, 0}, {file.fd.get(), 9900, bad, 0}};
    try {
      read_all_blocking(*backend, requests, file.path.string());
      FAIL() << "expected IoError";
    } catch (const IoError& error) {
      EXPECT_EQ(error.errno_value(), ENODATA);
      EXPECT_EQ(error.path(), file.path.string());
      const std::string what = error.what();
      EXPECT_NE(what.find("read at offset 9900"), std::string::npos) << what;
      EXPECT_NE(what.find("unexpected end of file"), std::string::npos) << what;
    }
    EXPECT_EQ(backend->in_flight(), 0u);  // everything reaped before the throw
    EXPECT_TRUE(std::equal(good.begin(), good.end(), file.bytes.begin()));
  }
}

TEST(ReadAllBlocking, ReportsTheFirstFailingRequestInRequestOrder) {
  const Watchdog dog("ReadAllBlocking.ReportsTheFirstFailingRequestInRequestOrder");
  TempDir dir;
  TestFile file(dir, 1 << 20);
  FaultPlan plan;
  plan.eio_offset = 500000;
  plan.reorder = true;
  const auto backend = testing::make_fault_backend(plan, 4);
  std::vector<std::vector<std::byte>> buffers(8, std::vector<std::byte>(65536));
  std::vector<ReadRequest> requests;
  for (size_t i = 0; i < buffers.size(); ++i) requests.push_back({file.fd.get(), i * 65536, buffers[i], 0});
  // Requests 7 (458752..524287) covers the EIO offset; add a later-listed one that also covers it.
  std::vector<std::byte> extra(1000);
  requests.push_back({file.fd.get(), 499999, extra, 0});
  try {
    read_all_blocking(*backend, requests, "the-file");
    FAIL() << "expected IoError";
  } catch (const IoError& error) {
    EXPECT_EQ(error.errno_value(), EIO);
    EXPECT_EQ(error.path(), "the-file");
    EXPECT_NE(std::string(error.what()).find("read at offset 458752"), std::string::npos) << error.what();
  }
  for (size_t i = 0; i < 7; ++i) {
    EXPECT_TRUE(std::equal(buffers[i].begin(), buffers[i].end(),
                           file.bytes.begin() + static_cast<std::ptrdiff_t>(i * 65536)));
  }
}

TEST(ReadAllBlocking, NoRequestsIsANoOp) {
  const auto backend = make_backend({BackendKind::kPread, 1, 1});
  read_all_blocking(*backend, {}, "unused");
  EXPECT_EQ(backend->in_flight(), 0u);
}

// ---- FaultBackend ----------------------------------------------------------------------------------------------

TEST(FaultBackend, ShortReadsEintrDelaysAndReorderStillGiveTheRightBytes) {
  const Watchdog dog("FaultBackend.ShortReadsEintrDelaysAndReorderStillGiveTheRightBytes");
  TempDir dir;
  TestFile file(dir);
  FaultPlan plan;
  plan.short_read_probability = 0.3;
  plan.eintr_probability = 0.2;
  plan.max_delay_us = 200;
  plan.reorder = true;
  plan.seed = 7;
  const auto backend = testing::make_fault_backend(plan, 4);
  EXPECT_EQ(backend->caps().name, "fault");

  const auto ranges = random_ranges(200, kFileSize, 11);
  std::vector<std::vector<std::byte>> buffers;
  std::vector<ReadRequest> requests;
  for (const Range& range : ranges) buffers.emplace_back(range.length);
  for (size_t i = 0; i < ranges.size(); ++i) requests.push_back({file.fd.get(), ranges[i].offset, buffers[i], i});
  backend->submit(requests);

  std::vector<uint64_t> order;
  std::vector<Completion> batch(16);
  while (order.size() < requests.size()) {
    const size_t n = backend->reap(batch, true);
    ASSERT_GT(n, 0u) << "reap(wait) returned nothing with reads outstanding";
    for (size_t i = 0; i < n; ++i) {
      const uint64_t index = batch[i].user_data;
      ASSERT_LT(index, ranges.size());
      ASSERT_EQ(batch[i].result, static_cast<int64_t>(ranges[index].length)) << "request " << index;
      order.push_back(index);
    }
  }
  EXPECT_EQ(backend->in_flight(), 0u);
  EXPECT_EQ(backend->reap(batch, true), 0u);  // nothing in flight: returns at once
  std::vector<uint64_t> sorted = order;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(std::adjacent_find(sorted.begin(), sorted.end()), sorted.end()) << "a request completed twice";
  EXPECT_FALSE(std::is_sorted(order.begin(), order.end())) << "completions came back in submission order";
  for (size_t i = 0; i < ranges.size(); ++i) {
    ASSERT_TRUE(std::equal(buffers[i].begin(), buffers[i].end(),
                           file.bytes.begin() + static_cast<std::ptrdiff_t>(ranges[i].offset)))
        << "request " << i;
  }
  const auto& counters = testing::fault_counters(*backend);
  EXPECT_GT(counters.short_reads.load(), 20u);
  EXPECT_GT(counters.eintrs.load(), 20u);
  EXPECT_EQ(counters.eios.load(), 0u);
}

TEST(FaultBackend, EioHitsExactlyTheRequestsCoveringTheBadOffset) {
  const Watchdog dog("FaultBackend.EioHitsExactlyTheRequestsCoveringTheBadOffset");
  TempDir dir;
  TestFile file(dir);
  FaultPlan plan;
  plan.short_read_probability = 0.2;
  plan.eintr_probability = 0.1;
  plan.max_delay_us = 50;
  plan.reorder = true;
  plan.eio_offset = (3ull << 20) + 12345;
  const auto backend = testing::make_fault_backend(plan, 3);

  // 64 KiB chunks tiling the file, plus random ranges (some of which cover the bad offset too).
  std::vector<Range> ranges;
  for (uint64_t offset = 0; offset < kFileSize; offset += 65536) ranges.push_back({offset, 65536});
  for (const Range& range : random_ranges(100, kFileSize, 5)) ranges.push_back(range);
  ranges.push_back({*plan.eio_offset, 1});
  ranges.push_back({*plan.eio_offset + 1, 1000});  // starts just after it: fine
  ranges.push_back({*plan.eio_offset - 1000, 1000});  // ends just before it: fine

  std::vector<std::vector<std::byte>> buffers;
  std::vector<ReadRequest> requests;
  for (const Range& range : ranges) buffers.emplace_back(range.length);
  for (size_t i = 0; i < ranges.size(); ++i) requests.push_back({file.fd.get(), ranges[i].offset, buffers[i], i});
  backend->submit(requests);

  std::vector<int64_t> results(ranges.size(), 1);
  size_t remaining = ranges.size();
  std::vector<Completion> batch(32);
  while (remaining > 0) {
    const size_t n = backend->reap(batch, true);
    ASSERT_GT(n, 0u);
    for (size_t i = 0; i < n; ++i) {
      ASSERT_EQ(results[batch[i].user_data], 1) << "completed twice";
      results[batch[i].user_data] = batch[i].result;
      --remaining;
    }
  }
  size_t failed = 0;
  for (size_t i = 0; i < ranges.size(); ++i) {
    const bool covers = ranges[i].offset <= *plan.eio_offset && *plan.eio_offset < ranges[i].offset + ranges[i].length;
    if (covers) {
      ++failed;
      EXPECT_EQ(results[i], -EIO) << "request " << i;
    } else {
      ASSERT_EQ(results[i], static_cast<int64_t>(ranges[i].length)) << "request " << i;
      ASSERT_TRUE(std::equal(buffers[i].begin(), buffers[i].end(),
                             file.bytes.begin() + static_cast<std::ptrdiff_t>(ranges[i].offset)))
          << "request " << i;
    }
  }
  EXPECT_GE(failed, 2u);  // the tiling chunk and the 1-byte read at least
  const auto& counters = testing::fault_counters(*backend);
  EXPECT_GE(counters.eios.load(), failed);
  EXPECT_GT(counters.short_reads.load(), 0u);
  EXPECT_GT(counters.eintrs.load(), 0u);
}

TEST(FaultBackend, DestroyedWithReadsQueuedDoesNotHang) {
  const Watchdog dog("FaultBackend.DestroyedWithReadsQueuedDoesNotHang");
  TempDir dir;
  TestFile file(dir, 1 << 20);
  FaultPlan plan;
  plan.max_delay_us = 2000;
  plan.reorder = true;
  std::vector<std::vector<std::byte>> buffers(300, std::vector<std::byte>(4096));
  {
    const auto backend = testing::make_fault_backend(plan, 2);
    std::vector<ReadRequest> requests;
    for (size_t i = 0; i < buffers.size(); ++i) requests.push_back({file.fd.get(), i * 4096, buffers[i], i});
    backend->submit(requests);
    std::vector<Completion> batch(4);
    (void)backend->reap(batch, true);
  }
  SUCCEED();
}

TEST(FaultBackend, CountersOnlyForFaultBackends) {
  const auto backend = make_backend({BackendKind::kPread, 1, 1});
  EXPECT_THROW((void)testing::fault_counters(*backend), std::invalid_argument);
}

}  // namespace
}  // namespace tensorstream
