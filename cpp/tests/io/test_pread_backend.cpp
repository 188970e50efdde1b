#include "io/pread_backend.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "support/fault_backend.hpp"
#include "support/temp_dir.hpp"
#include "tensorstream/error.hpp"
#include "tensorstream/io/file.hpp"

namespace tensorstream {
namespace {

using detail::make_pread_backend;
using testing::TempDir;
using testing::Watchdog;

struct TestFile {
  TestFile(const TempDir& dir, uint64_t size) : path(dir.path() / "data"), bytes(testing::random_bytes(size, 9)) {
    testing::write_file_bytes(path, bytes);
    fd = open_file(path, O_RDONLY);
  }
  std::filesystem::path path;
  std::vector<std::byte> bytes;
  UniqueFd fd;
};

// Reaps until `count` completions arrived; results indexed by user_data.
std::vector<int64_t> reap_all(IoBackend& backend, size_t count) {
  std::vector<int64_t> results(count, INT64_MIN);
  std::vector<Completion> batch(8);
  size_t got = 0;
  while (got < count) {
    const size_t n = backend.reap(batch, true);
    if (n == 0) break;
    for (size_t i = 0; i < n; ++i) {
      if (batch[i].user_data < count) results[batch[i].user_data] = batch[i].result;
      ++got;
    }
  }
  return results;
}

bool matches(const std::vector<std::byte>& buffer, const std::vector<std::byte>& file, uint64_t offset) {
  return std::equal(buffer.begin(), buffer.end(), file.begin() + static_cast<std::ptrdiff_t>(offset));
}

TEST(PreadBackend, ReadsRandomRanges) {
  const Watchdog dog("PreadBackend.ReadsRandomRanges");
  TempDir dir;
  TestFile file(dir, 3 << 20);
  const auto backend = make_pread_backend(4);
  std::mt19937_64 rng(1);
  std::vector<std::vector<std::byte>> buffers;
  std::vector<ReadRequest> requests;
  for (uint64_t i = 0; i < 300; ++i) {
    const uint64_t offset = rng() % file.bytes.size();
    buffers.emplace_back(1 + rng() % std::min<uint64_t>(100000, file.bytes.size() - offset));
    requests.push_back({file.fd.get(), offset, buffers.back(), i});
  }
  backend->submit(requests);
  const auto results = reap_all(*backend, requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    ASSERT_EQ(results[i], static_cast<int64_t>(buffers[i].size())) << i;
    ASSERT_TRUE(matches(buffers[i], file.bytes, requests[i].offset)) << i;
  }
  EXPECT_EQ(backend->in_flight(), 0u);
}

TEST(PreadBackend, ReapWithNothingInFlightReturnsZeroAtOnce) {
  const Watchdog dog("PreadBackend.ReapWithNothingInFlightReturnsZeroAtOnce");
  const auto backend = make_pread_backend(2);
  std::vector<Completion> out(4);
  EXPECT_EQ(backend->reap(out, true), 0u);
  EXPECT_EQ(backend->reap(out, false), 0u);
  EXPECT_EQ(backend->reap({}, true), 0u);
}

TEST(PreadBackend, EndOfFileIsEnodata) {
  const Watchdog dog("PreadBackend.EndOfFileIsEnodata");
  TempDir dir;
  TestFile file(dir, 5000);
  const auto backend = make_pread_backend(2);
  std::vector<std::byte> across(200);
  std::vector<std::byte> beyond(10);
  std::vector<std::byte> exact(5000);
  const std::vector<ReadRequest> requests = {
      {file.fd.get(), 4900, across, 0}, {file.fd.get(), 6000, beyond, 1}, {file.fd.get(), 0, exact, 2}};
  backend->submit(requests);
  const auto results = reap_all(*backend, 3);
  EXPECT_EQ(results[0], -ENODATA);
  EXPECT_EQ(results[1], -ENODATA);
  EXPECT_EQ(results[2], 5000);
  EXPECT_EQ(exact, file.bytes);
}

TEST(PreadBackend, ErrorsAreNegativeErrno) {
  const Watchdog dog("PreadBackend.ErrorsAreNegativeErrno");
  const auto backend = make_pread_backend(1);
  std::vector<std::byte> buffer(10);
  const ReadRequest request{-1, 0, buffer, 5};
  backend->submit({&request, 1});
  std::vector<Completion> out(1);
  ASSERT_EQ(backend->reap(out, true), 1u);
  EXPECT_EQ(out[0].user_data, 5u);
  EXPECT_EQ(out[0].result, -EBADF);
}

TEST(PreadBackend, ZeroLengthReadSucceeds) {
  const auto backend = make_pread_backend(1);
  const ReadRequest request{-1, 0, {}, 3};  // never reaches the syscall
  backend->submit({&request, 1});
  std::vector<Completion> out(2);
  ASSERT_EQ(backend->reap(out, true), 1u);
  EXPECT_EQ(out[0].result, 0);
}

TEST(PreadBackend, ResumesOneByteReadsAndRetriesEintr) {
  const Watchdog dog("PreadBackend.ResumesOneByteReadsAndRetriesEintr");
  TempDir dir;
  TestFile file(dir, 4000);
  std::atomic<int> calls{0};
  std::atomic<int> interrupted{0};
  const auto backend = make_pread_backend(2, [&](int fd, void* buf, size_t, off_t offset) -> ssize_t {
    if (calls.fetch_add(1) % 3 == 0) {
      interrupted.fetch_add(1);
      errno = EINTR;
      return -1;
    }
    return ::pread(fd, buf, 1, offset);  // always short
  });
  std::vector<std::byte> a(1000);
  std::vector<std::byte> b(3000);
  const std::vector<ReadRequest> requests = {{file.fd.get(), 0, a, 0}, {file.fd.get(), 1000, b, 1}};
  backend->submit(requests);
  const auto results = reap_all(*backend, 2);
  EXPECT_EQ(results[0], 1000);
  EXPECT_EQ(results[1], 3000);
  EXPECT_TRUE(matches(a, file.bytes, 0));
  EXPECT_TRUE(matches(b, file.bytes, 1000));
  EXPECT_GT(interrupted.load(), 1000);
}

TEST(PreadBackend, MisbehavingSyscallsBecomeEio) {
  const Watchdog dog("PreadBackend.MisbehavingSyscallsBecomeEio");
  std::atomic<int> mode{0};
  const auto backend = make_pread_backend(1, [&](int, void*, size_t count, off_t) -> ssize_t {
    switch (mode.load()) {
      case 0:
        errno = 0;
        return -1;  // failure without an errno
      case 1:
        return static_cast<ssize_t>(count + 1);  // more than asked
      case 2:
        throw std::runtime_error("test syscall threw");
      default:
        errno = ENOSPC;
        return -1;
    }
  });
  std::vector<std::byte> buffer(16);
  const ReadRequest request{3, 0, buffer, 0};
  std::vector<Completion> out(1);
  for (int m = 0; m < 4; ++m) {
    mode = m;
    backend->submit({&request, 1});
    ASSERT_EQ(backend->reap(out, true), 1u);
    EXPECT_EQ(out[0].result, m == 3 ? -ENOSPC : -EIO) << "mode " << m;
  }
}

TEST(PreadBackend, InFlightCountsUntilReaped) {
  const Watchdog dog("PreadBackend.InFlightCountsUntilReaped");
  std::mutex mutex;
  std::condition_variable cv;
  bool open_gate = false;
  const auto backend = make_pread_backend(2, [&](int, void*, size_t count, off_t) -> ssize_t {
    std::unique_lock lock(mutex);
    cv.wait(lock, [&] { return open_gate; });
    return static_cast<ssize_t>(count);
  });
  std::vector<std::byte> buffer(8);
  std::vector<ReadRequest> requests(10, ReadRequest{0, 0, buffer, 0});
  for (size_t i = 0; i < requests.size(); ++i) requests[i].user_data = i;
  backend->submit(requests);
  EXPECT_EQ(backend->in_flight(), 10u);
  std::vector<Completion> out(10);
  EXPECT_EQ(backend->reap(out, false), 0u);  // gate closed: nothing done, and no waiting
  {
    const std::lock_guard lock(mutex);
    open_gate = true;
  }
  cv.notify_all();
  size_t got = 0;
  while (got < 10) got += backend->reap(std::span(out).subspan(got), true);
  EXPECT_EQ(backend->in_flight(), 0u);
}

TEST(PreadBackend, DestructionCancelsQueuedReadsAndWaitsForRunningOnes) {
  const Watchdog dog("PreadBackend.DestructionCancelsQueuedReadsAndWaitsForRunningOnes");
  std::atomic<int> started{0};
  std::atomic<int> finished{0};
  std::vector<std::byte> buffer(8);
  const auto begin = std::chrono::steady_clock::now();
  {
    const auto backend = make_pread_backend(2, [&](int, void*, size_t count, off_t) -> ssize_t {
      started.fetch_add(1);
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      finished.fetch_add(1);
      return static_cast<ssize_t>(count);
    });
    std::vector<ReadRequest> requests(200, ReadRequest{0, 0, buffer, 0});
    backend->submit(requests);
    while (started.load() == 0) std::this_thread::yield();
  }
  const auto elapsed = std::chrono::steady_clock::now() - begin;
  EXPECT_EQ(started.load(), finished.load()) << "destructor returned while a read was still running";
  EXPECT_LE(started.load(), 6) << "queued reads should have been cancelled, not run";
  EXPECT_LT(elapsed, std::chrono::seconds(2));
}

TEST(PreadBackend, ManySubmittersOneReaper) {
  const Watchdog dog("PreadBackend.ManySubmittersOneReaper");
  TempDir dir;
  TestFile file(dir, 1 << 20);
  const auto backend = make_pread_backend(4);
  constexpr size_t kThreads = 4;
  constexpr size_t kPerThread = 250;
  std::vector<std::vector<std::byte>> buffers(kThreads * kPerThread, std::vector<std::byte>(512));
  std::vector<std::thread> submitters;
  for (size_t t = 0; t < kThreads; ++t) {
    submitters.emplace_back([&, t] {
      for (size_t i = 0; i < kPerThread; ++i) {
        const size_t id = t * kPerThread + i;
        const ReadRequest request{file.fd.get(), id * 1000, buffers[id], id};
        backend->submit({&request, 1});
      }
    });
  }
  std::set<uint64_t> seen;
  std::vector<Completion> out(16);
  while (seen.size() < kThreads * kPerThread) {
    const size_t n = backend->reap(out, true);  // 0 whenever the submitters are momentarily behind
    for (size_t i = 0; i < n; ++i) {
      ASSERT_EQ(out[i].result, 512);
      ASSERT_TRUE(seen.insert(out[i].user_data).second);
    }
    if (n == 0) std::this_thread::yield();
  }
  for (auto& thread : submitters) thread.join();
  for (size_t id = 0; id < buffers.size(); ++id) ASSERT_TRUE(matches(buffers[id], file.bytes, id * 1000)) << id;
}

TEST(PreadBackend, CapsAndLimits) {
  EXPECT_THROW((void)make_pread_backend(0), ConfigError);
  EXPECT_THROW((void)make_pread_backend(100000), ConfigError);
  const auto backend = make_pread_backend(3);
  EXPECT_EQ(backend->caps().name, "pread");
  EXPECT_EQ(backend->caps().max_in_flight, 3u);
  EXPECT_FALSE(backend->caps().zero_copy_views);
}

}  // namespace
}  // namespace tensorstream
