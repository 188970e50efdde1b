// The IoBackend contract (tensorstream/io/io_backend.hpp), run by every backend: the pread pool, io_uring (skipped
// where the kernel refuses it), mmap and the test FaultBackend. A new backend (cuFile) adds one line to kBackends.
// What is particular to one backend (short-read resumption, ring overflow, mappings) stays in its own test file.
#include <fcntl.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cerrno>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "io/mmap_backend.hpp"
#include "io/pread_backend.hpp"
#include "io/uring_backend.hpp"
#include "support/fault_backend.hpp"
#include "support/temp_dir.hpp"
#include "tensorstream/io/file.hpp"
#include "tensorstream/io/io_backend.hpp"

namespace tensorstream {
namespace {

using testing::TempDir;
using testing::Watchdog;

struct BackendFactory {
  std::string name;
  std::function<std::unique_ptr<IoBackend>()> make;
  std::function<std::string()> unavailable;  // empty string: available
};

const std::vector<BackendFactory>& backends() {
  static const std::vector<BackendFactory> all = {
      {"pread", [] { return detail::make_pread_backend(4); }, [] { return std::string(); }},
      {"io_uring", [] { return detail::make_uring_backend(32); },
       [] {
         std::string reason;
         return io_uring_available(&reason) ? std::string() : "io_uring unavailable: " + reason;
       }},
      {"mmap", [] { return detail::make_mmap_backend(); }, [] { return std::string(); }},
      {"fault",  // faults on, so the contract holds through short reads, EINTR, delays and reordering
       [] {
         testing::FaultPlan plan;
         plan.short_read_probability = 0.3;
         plan.eintr_probability = 0.2;
         plan.max_delay_us = 50;
         plan.reorder = true;
         return std::unique_ptr<IoBackend>(testing::make_fault_backend(plan, 3));
       },
       [] { return std::string(); }},
  };
  return all;
}

struct TestFile {
  TestFile(const TempDir& dir, uint64_t size) : path(dir.path() / "data"), bytes(testing::random_bytes(size, 17)) {
    testing::write_file_bytes(path, bytes);
    fd = open_file(path, O_RDONLY);
  }
  std::filesystem::path path;
  std::vector<std::byte> bytes;
  UniqueFd fd;
};

bool matches(const std::vector<std::byte>& buffer, const std::vector<std::byte>& file, uint64_t offset) {
  return std::equal(buffer.begin(), buffer.end(), file.begin() + static_cast<std::ptrdiff_t>(offset));
}

class IoBackendContract : public ::testing::TestWithParam<size_t> {
 protected:
  void SetUp() override {
    const BackendFactory& factory = backends()[GetParam()];
    if (const std::string why = factory.unavailable(); !why.empty()) GTEST_SKIP() << why;
    backend_ = factory.make();
  }

  // Reaps until `count` completions arrived (or reap says nothing is in flight); results by user_data, each seen
  // exactly once.
  std::vector<int64_t> reap_all(size_t count) {
    std::vector<int64_t> results(count, INT64_MIN);
    std::vector<Completion> batch(7);
    size_t got = 0;
    while (got < count) {
      const size_t n = backend_->reap(batch, true);
      if (n == 0) break;
      for (size_t i = 0; i < n; ++i) {
        EXPECT_LT(batch[i].user_data, count);
        if (batch[i].user_data >= count) continue;
        EXPECT_EQ(results[batch[i].user_data], INT64_MIN) << "completion " << batch[i].user_data << " twice";
        results[batch[i].user_data] = batch[i].result;
        ++got;
      }
    }
    return results;
  }

  std::unique_ptr<IoBackend> backend_;
};

TEST_P(IoBackendContract, ReadsRandomRangesExactly) {
  const Watchdog dog("IoBackendContract.ReadsRandomRangesExactly");
  TempDir dir;
  TestFile file(dir, 3 << 20);
  std::mt19937_64 rng(GetParam() + 1);
  std::vector<std::vector<std::byte>> buffers;
  std::vector<ReadRequest> requests;
  for (uint64_t i = 0; i < 300; ++i) {
    const uint64_t offset = rng() % file.bytes.size();
    buffers.emplace_back(1 + rng() % std::min<uint64_t>(100000, file.bytes.size() - offset));
    requests.push_back({file.fd.get(), offset, buffers.back(), i});
  }
  backend_->submit(requests);
  const auto results = reap_all(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    ASSERT_EQ(results[i], static_cast<int64_t>(buffers[i].size())) << i;
    ASSERT_TRUE(matches(buffers[i], file.bytes, requests[i].offset)) << i;
  }
  EXPECT_EQ(backend_->in_flight(), 0u);
}

TEST_P(IoBackendContract, ReapWithNothingInFlightReturnsZeroAtOnce) {
  const Watchdog dog("IoBackendContract.ReapWithNothingInFlightReturnsZeroAtOnce");
  std::vector<Completion> out(4);
  EXPECT_EQ(backend_->reap(out, true), 0u);
  EXPECT_EQ(backend_->reap(out, false), 0u);
  EXPECT_EQ(backend_->reap({}, true), 0u);
  EXPECT_EQ(backend_->in_flight(), 0u);
}

TEST_P(IoBackendContract, EndOfFileBeforeTheFullLengthIsEnodata) {
  const Watchdog dog("IoBackendContract.EndOfFileBeforeTheFullLengthIsEnodata");
  TempDir dir;
  TestFile file(dir, 5000);
  std::vector<std::byte> across(200);
  std::vector<std::byte> beyond(10);
  std::vector<std::byte> exact(5000);
  const std::vector<ReadRequest> requests = {
      {file.fd.get(), 4900, across, 0}, {file.fd.get(), 6000, beyond, 1}, {file.fd.get(), 0, exact, 2}};
  backend_->submit(requests);
  const auto results = reap_all(3);
  EXPECT_EQ(results[0], -ENODATA);
  EXPECT_EQ(results[1], -ENODATA);
  EXPECT_EQ(results[2], 5000);
  EXPECT_EQ(exact, file.bytes);
}

TEST_P(IoBackendContract, FailuresAreNegativeErrnoWithTheirUserData) {
  const Watchdog dog("IoBackendContract.FailuresAreNegativeErrnoWithTheirUserData");
  std::vector<std::byte> buffer(10);
  const ReadRequest request{-1, 0, buffer, 0};
  backend_->submit({&request, 1});
  const auto results = reap_all(1);
  EXPECT_EQ(results[0], -EBADF);
}

TEST_P(IoBackendContract, ZeroLengthReadsSucceedWithoutTouchingTheFile) {
  const Watchdog dog("IoBackendContract.ZeroLengthReadsSucceedWithoutTouchingTheFile");
  const std::vector<ReadRequest> requests = {{-1, 0, {}, 0}, {-1, 123, {}, 1}};
  backend_->submit(requests);
  const auto results = reap_all(2);
  EXPECT_EQ(results[0], 0);
  EXPECT_EQ(results[1], 0);
}

TEST_P(IoBackendContract, InFlightCountsSubmittedReadsUntilReaped) {
  const Watchdog dog("IoBackendContract.InFlightCountsSubmittedReadsUntilReaped");
  TempDir dir;
  TestFile file(dir, 1 << 16);
  std::vector<std::vector<std::byte>> buffers(10, std::vector<std::byte>(4096));
  std::vector<ReadRequest> requests;
  for (uint64_t i = 0; i < buffers.size(); ++i) requests.push_back({file.fd.get(), i * 4096, buffers[i], i});
  backend_->submit(requests);
  EXPECT_EQ(backend_->in_flight(), 10u);  // finished or not, nothing is reaped yet
  std::vector<Completion> out(3);
  size_t reaped = backend_->reap(out, true);
  ASSERT_GE(reaped, 1u);
  EXPECT_EQ(backend_->in_flight(), 10u - reaped);
  std::vector<Completion> all(10);
  while (reaped < 10) reaped += backend_->reap(std::span(all).subspan(reaped), true);
  EXPECT_EQ(backend_->in_flight(), 0u);
}

TEST_P(IoBackendContract, ManySubmittersOneReaperSeeEveryReadOnce) {
  const Watchdog dog("IoBackendContract.ManySubmittersOneReaperSeeEveryReadOnce");
  TempDir dir;
  TestFile file(dir, 1 << 20);
  constexpr size_t kThreads = 4;
  constexpr size_t kPerThread = 200;
  std::vector<std::vector<std::byte>> buffers(kThreads * kPerThread, std::vector<std::byte>(512));
  std::vector<std::thread> submitters;
  for (size_t t = 0; t < kThreads; ++t) {
    submitters.emplace_back([&, t] {
      for (size_t i = 0; i < kPerThread; ++i) {
        const size_t id = t * kPerThread + i;
        const ReadRequest request{file.fd.get(), id * 1000, buffers[id], id};
        backend_->submit({&request, 1});
      }
    });
  }
  std::set<uint64_t> seen;
  std::vector<Completion> out(16);
  while (seen.size() < kThreads * kPerThread) {
    const size_t n = backend_->reap(out, true);  // 0 whenever the submitters are momentarily behind
    for (size_t i = 0; i < n; ++i) {
      ASSERT_EQ(out[i].result, 512);
      ASSERT_TRUE(seen.insert(out[i].user_data).second);
    }
    if (n == 0) std::this_thread::yield();
  }
  for (auto& thread : submitters) thread.join();
  for (size_t id = 0; id < buffers.size(); ++id) ASSERT_TRUE(matches(buffers[id], file.bytes, id * 1000)) << id;
}

TEST_P(IoBackendContract, DestroyedWithReadsInFlightReturns) {
  TempDir dir;
  TestFile file(dir, 4 << 20);
  std::vector<std::vector<std::byte>> buffers(64, std::vector<std::byte>(64 << 10));
  {
    const Watchdog dog("IoBackendContract.DestroyedWithReadsInFlightReturns");
    std::vector<ReadRequest> requests;
    for (uint64_t i = 0; i < buffers.size(); ++i) requests.push_back({file.fd.get(), i * (64 << 10), buffers[i], i});
    backend_->submit(requests);
    backend_.reset();  // must wait for (or cancel) every read, and never hang
  }
}

TEST_P(IoBackendContract, CapsNameTheBackend) {
  EXPECT_FALSE(backend_->caps().name.empty());
  if (backend_->caps().zero_copy_views) {
    TempDir dir;
    TestFile file(dir, 8192);
    const auto view = backend_->view(file.fd.get(), 100, 1000);
    ASSERT_EQ(view.size(), 1000u);
    EXPECT_TRUE(std::equal(view.begin(), view.end(), file.bytes.begin() + 100));
  } else {
    EXPECT_TRUE(backend_->view(0, 0, 10).empty());
  }
}

INSTANTIATE_TEST_SUITE_P(EveryBackend, IoBackendContract, ::testing::Range<size_t>(0, backends().size()),
                         [](const ::testing::TestParamInfo<size_t>& info) {
                           std::string name = backends()[info.param].name;
                           std::replace(name.begin(), name.end(), '_', 'X');  // gtest names: alphanumerics only
                           return name;
                         });

}  // namespace
}  // namespace tensorstream
