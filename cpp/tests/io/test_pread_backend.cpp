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
