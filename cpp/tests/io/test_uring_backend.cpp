#include "io/uring_backend.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/magic.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "support/fault_backend.hpp"
#include "support/temp_dir.hpp"
#include "tensorstream/error.hpp"
#include "tensorstream/io/direct_io.hpp"
#include "tensorstream/io/file.hpp"

namespace tensorstream {
namespace {

using detail::make_uring_backend;
using testing::TempDir;
using testing::Watchdog;

class UringBackend : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string reason;
    if (!io_uring_available(&reason)) GTEST_SKIP() << "io_uring unavailable: " << reason;
  }
};

struct TestFile {
  TestFile(const std::filesystem::path& dir, uint64_t size, uint64_t seed = 5)
      : path(dir / "data"), bytes(testing::random_bytes(size, seed)) {
    testing::write_file_bytes(path, bytes);
    fd = open_file(path, O_RDONLY);
  }
  std::filesystem::path path;
  std::vector<std::byte> bytes;
  UniqueFd fd;
};

bool matches(std::span<const std::byte> buffer, const std::vector<std::byte>& file, uint64_t offset) {
  return std::equal(buffer.begin(), buffer.end(), file.begin() + static_cast<std::ptrdiff_t>(offset));
}

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

// A directory on a real disk (O_DIRECT and page-cache tests): /tmp may be tmpfs, /var/tmp normally is not.
class DiskDir {
 public:
  DiskDir() {
    std::string pattern = "/var/tmp/tensorstream-test-XXXXXX";
    if (::mkdtemp(pattern.data()) != nullptr) path_ = pattern;
  }
  ~DiskDir() {
    std::error_code ec;
    if (!path_.empty()) std::filesystem::remove_all(path_, ec);
  }
  [[nodiscard]] const std::filesystem::path& path() const { return path_; }
  // Empty when this is not a usable disk directory, else why not.
  [[nodiscard]] std::string unusable() const {
    if (path_.empty()) return "cannot create a directory under /var/tmp";
    struct statfs fs {};
    if (::statfs(path_.c_str(), &fs) != 0) return "statfs failed";
    if (fs.f_type == TMPFS_MAGIC) return "/var/tmp is tmpfs";
    return {};
  }

 private:
  std::filesystem::path path_;
};

struct AlignedBuffer {
  explicit AlignedBuffer(size_t size)
      : data(static_cast<std::byte*>(std::aligned_alloc(kDirectIoAlignment, size)), &std::free), size_(size) {}
  std::span<std::byte> span() { return {data.get(), size_}; }
  std::unique_ptr<std::byte, decltype(&std::free)> data;
  size_t size_;
};

TEST_F(UringBackend, DirectReadsWithAlignedBuffers) {
  const Watchdog dog("UringBackend.DirectReadsWithAlignedBuffers");
  DiskDir dir;
  if (const std::string why = dir.unusable(); !why.empty()) GTEST_SKIP() << why;
  constexpr uint64_t kSize = (4 << 20) + 100;  // the last block is partial
  TestFile file(dir.path(), kSize);
  if (!direct_io_supported(file.path.c_str())) GTEST_SKIP() << "no O_DIRECT on " << dir.path();
  const UniqueFd direct = open_file(file.path, O_RDONLY | O_DIRECT);
  const auto backend = make_uring_backend(8);
  std::mt19937_64 rng(3);
  constexpr uint64_t kBlocks = (4 << 20) / kDirectIoAlignment;
  std::vector<AlignedBuffer> buffers;
  std::vector<ReadRequest> requests;
  for (uint64_t i = 0; i < 100; ++i) {
    const uint64_t first = rng() % kBlocks;
    const uint64_t blocks = 1 + rng() % std::min<uint64_t>(64, kBlocks - first);
    buffers.emplace_back(blocks * kDirectIoAlignment);
    requests.push_back({direct.get(), first * kDirectIoAlignment, buffers.back().span(), i});
  }
  backend->submit(requests);
  const auto results = reap_all(*backend, requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    ASSERT_EQ(results[i], static_cast<int64_t>(requests[i].buffer.size())) << i;
    ASSERT_TRUE(matches(requests[i].buffer, file.bytes, requests[i].offset)) << i;
  }
  // An aligned read that runs past the end of the file: short, then nothing => -ENODATA, like buffered reads.
  AlignedBuffer tail(kDirectIoAlignment);
  const ReadRequest tail_request{direct.get(), 4 << 20, tail.span(), 0};
  backend->submit({&tail_request, 1});
  const auto tail_result = reap_all(*backend, 1);
  EXPECT_EQ(tail_result[0], -ENODATA);
  EXPECT_TRUE(matches(tail.span().first(100), file.bytes, 4 << 20));  // the bytes that existed did arrive
}

TEST_F(UringBackend, MisalignedDirectReadIsEinval) {
  const Watchdog dog("UringBackend.MisalignedDirectReadIsEinval");
  DiskDir dir;
  if (const std::string why = dir.unusable(); !why.empty()) GTEST_SKIP() << why;
  TestFile file(dir.path(), 1 << 20);
  if (!direct_io_supported(file.path.c_str())) GTEST_SKIP() << "no O_DIRECT on " << dir.path();
  const UniqueFd direct = open_file(file.path, O_RDONLY | O_DIRECT);
  const auto backend = make_uring_backend(4);
  AlignedBuffer buffer(2 * kDirectIoAlignment);
  const ReadRequest request{direct.get(), 100, buffer.span().first(kDirectIoAlignment), 0};
  backend->submit({&request, 1});
  EXPECT_EQ(reap_all(*backend, 1)[0], -EINVAL);
}

TEST_F(UringBackend, OverflowBeyondTheRingIsQueuedNotLost) {
  const Watchdog dog("UringBackend.OverflowBeyondTheRingIsQueuedNotLost");
  TempDir dir;
  TestFile file(dir.path(), 4 << 20);
  const auto backend = make_uring_backend(8);
  std::vector<std::vector<std::byte>> buffers(1000, std::vector<std::byte>(4096));
  std::vector<ReadRequest> requests;
  std::mt19937_64 rng(4);
  for (uint64_t i = 0; i < buffers.size(); ++i) {
    requests.push_back({file.fd.get(), rng() % (file.bytes.size() - 4096), buffers[i], i});
  }
  backend->submit(requests);  // returns at once although only 8 fit in the ring
  EXPECT_EQ(backend->in_flight(), 1000u);
  const auto results = reap_all(*backend, requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    ASSERT_EQ(results[i], 4096) << i;
    ASSERT_TRUE(matches(buffers[i], file.bytes, requests[i].offset)) << i;
  }
  EXPECT_EQ(backend->in_flight(), 0u);
}

TEST_F(UringBackend, SubmittingThreadMayExitBeforeTheReadsFinish) {
  const Watchdog dog("UringBackend.SubmittingThreadMayExitBeforeTheReadsFinish");
  TempDir dir;
  TestFile file(dir.path(), 2 << 20);
  const auto backend = make_uring_backend(16);
  std::vector<std::vector<std::byte>> buffers(200, std::vector<std::byte>(8192));
  std::thread([&] {
    std::vector<ReadRequest> requests;
    for (uint64_t i = 0; i < buffers.size(); ++i) requests.push_back({file.fd.get(), i * 8192, buffers[i], i});
    backend->submit(requests);
  }).join();
  const auto results = reap_all(*backend, buffers.size());
  for (size_t i = 0; i < buffers.size(); ++i) {
    ASSERT_EQ(results[i], 8192) << i;
    ASSERT_TRUE(matches(buffers[i], file.bytes, i * 8192)) << i;
  }
}

// The kernel finishes a buffered read that missed the page cache on behalf of the task that submitted it; when
// that thread has exited, the read fails with -EFAULT (seen on Linux 6.18). Cold data makes the reads slow
// enough for the submitting thread to be gone before they finish.
TEST_F(UringBackend, ColdReadsSurviveTheExitOfTheSubmittingThread) {
  const Watchdog dog("UringBackend.ColdReadsSurviveTheExitOfTheSubmittingThread");
  DiskDir dir;
  if (const std::string why = dir.unusable(); !why.empty()) GTEST_SKIP() << why;
  constexpr uint64_t kSize = 32ull << 20;
  TestFile file(dir.path(), kSize);
  ASSERT_EQ(::fdatasync(file.fd.get()), 0);
  ASSERT_EQ(::posix_fadvise(file.fd.get(), 0, 0, POSIX_FADV_DONTNEED), 0);
  if (const double cached = page_cache_fraction(file.fd.get(), 0, kSize); cached > 0.1) {
    GTEST_SKIP() << "the kernel kept " << cached << " of the file cached; cannot make the reads cold";
  }
  const auto backend = make_uring_backend(32);
  constexpr uint64_t kChunk = 256 << 10;
  std::vector<std::vector<std::byte>> buffers(kSize / kChunk, std::vector<std::byte>(kChunk));
  std::thread([&] {
    std::vector<ReadRequest> requests;
    for (uint64_t i = 0; i < buffers.size(); ++i) requests.push_back({file.fd.get(), i * kChunk, buffers[i], i});
    backend->submit(requests);
  }).join();
  const auto results = reap_all(*backend, buffers.size());
  for (size_t i = 0; i < buffers.size(); ++i) {
    ASSERT_EQ(results[i], static_cast<int64_t>(kChunk)) << i;
    ASSERT_TRUE(matches(buffers[i], file.bytes, i * kChunk)) << i;
  }
}

TEST_F(UringBackend, DestroyedWithReadsInFlight) {
  const Watchdog dog("UringBackend.DestroyedWithReadsInFlight");
  // Cold data on a disk when there is one, so that the kernel really is busy with the reads at destruction.
  DiskDir disk;
  TempDir temp;
  const std::filesystem::path& where = disk.unusable().empty() ? disk.path() : temp.path();
  constexpr uint64_t kSize = 8 << 20;
  TestFile file(where, kSize);
  (void)::fdatasync(file.fd.get());
  (void)::posix_fadvise(file.fd.get(), 0, 0, POSIX_FADV_DONTNEED);
  // The destructor must wait for the kernel before the buffers go away.
  auto buffers = std::make_unique<std::vector<std::vector<std::byte>>>(500, std::vector<std::byte>(16384));
  {
    const auto backend = make_uring_backend(8);
    std::vector<ReadRequest> requests;
    for (uint64_t i = 0; i < buffers->size(); ++i) {
      requests.push_back({file.fd.get(), (i * 16384) % kSize, (*buffers)[i], i});
    }
    backend->submit(requests);
    std::vector<Completion> out(4);
    (void)backend->reap(out, true);
  }
  buffers.reset();
  SUCCEED();
}

TEST(UringBackendLimits, RejectsBadDepths) {
  EXPECT_THROW((void)make_uring_backend(0), ConfigError);
  EXPECT_THROW((void)make_uring_backend(1u << 20), ConfigError);
}

}  // namespace
}  // namespace tensorstream
