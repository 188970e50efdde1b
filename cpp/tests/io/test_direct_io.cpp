#include "tensorstream/io/direct_io.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/magic.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <vector>

#include "support/temp_dir.hpp"
#include "tensorstream/io/file.hpp"

namespace tensorstream {
namespace {

using testing::TempDir;

// A directory on a real disk: the page cache of tmpfs files cannot be dropped (it is their storage).
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

bool is_tmpfs(const char* path) {
  struct statfs fs {};
  return ::statfs(path, &fs) == 0 && fs.f_type == TMPFS_MAGIC;
}

// Writes `size` bytes, makes them durable (dirty pages cannot be dropped) and drops them from the page cache.
// Returns the open descriptor; the caller skips when the kernel kept the pages anyway.
UniqueFd write_and_evict(const std::filesystem::path& path, uint64_t size) {
  testing::write_file_bytes(path, testing::random_bytes(size, 17));
  UniqueFd fd = open_file(path, O_RDONLY);
  EXPECT_EQ(::fdatasync(fd.get()), 0);
  EXPECT_EQ(::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_DONTNEED), 0);
  return fd;
}

void read_range(int fd, uint64_t offset, uint64_t length) {
  std::vector<std::byte> buffer(length);
  pread_all(fd, buffer, offset, "test");
}

TEST(PageCacheFraction, NearOneAfterReading) {
  TempDir dir;
  testing::write_file_bytes(dir.path() / "f", testing::random_bytes(1 << 20, 1));
  const UniqueFd fd = open_file(dir.path() / "f", O_RDONLY);
  read_range(fd.get(), 0, 1 << 20);
  EXPECT_GT(page_cache_fraction(fd.get(), 0, 1 << 20), 0.95);
  EXPECT_GT(page_cache_fraction(fd.get(), 12345, 100000), 0.95);  // unaligned ranges round out to pages
  EXPECT_FALSE(should_read_direct(DirectIoMode::kAuto, fd.get(), 0, 1 << 20));
}

TEST(PageCacheFraction, NearZeroAfterDontneedOnADisk) {
  DiskDir dir;
  if (const std::string why = dir.unusable(); !why.empty()) GTEST_SKIP() << why;
  const UniqueFd fd = write_and_evict(dir.path() / "f", 1 << 20);
  const double fraction = page_cache_fraction(fd.get(), 0, 1 << 20);
  if (fraction > 0.1) GTEST_SKIP() << "the kernel kept " << fraction << " of the pages after DONTNEED";
  EXPECT_LT(fraction, 0.1);
  EXPECT_TRUE(should_read_direct(DirectIoMode::kAuto, fd.get(), 0, 1 << 20));
  // Reading a quarter brings (about) that quarter back; readahead may add a little.
  read_range(fd.get(), 0, 256 << 10);
  const double quarter = page_cache_fraction(fd.get(), 0, 1 << 20);
  EXPECT_GE(quarter, 0.24);
  EXPECT_GT(page_cache_fraction(fd.get(), 0, 256 << 10), 0.95);
}

TEST(PageCacheFraction, LargeRangesAreSampled) {
  DiskDir dir;
  if (const std::string why = dir.unusable(); !why.empty()) GTEST_SKIP() << why;
  constexpr uint64_t kSize = 64ull << 20;  // 16384 pages: more than the 4096 checked one by one
  const UniqueFd fd = write_and_evict(dir.path() / "big", kSize);
  const double before = page_cache_fraction(fd.get(), 0, kSize);
  if (before > 0.1) GTEST_SKIP() << "the kernel kept " << before << " of the pages after DONTNEED";
  read_range(fd.get(), 0, kSize / 2);
  // Evenly spread samples see the cached first half as about half the range.
  const double half = page_cache_fraction(fd.get(), 0, kSize);
  EXPECT_GT(half, 0.4);
  EXPECT_LT(half, 0.65);
  read_range(fd.get(), kSize / 2, kSize / 2);
  EXPECT_GT(page_cache_fraction(fd.get(), 0, kSize), 0.95);
}

TEST(PageCacheFraction, EdgesOfTheFile) {
  TempDir dir;
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  testing::write_file_bytes(dir.path() / "f", testing::random_bytes(4 * page, 2));
  const UniqueFd fd = open_file(dir.path() / "f", O_RDONLY);
  read_range(fd.get(), 0, 4 * page);
  EXPECT_EQ(page_cache_fraction(fd.get(), 0, 0), 1.0);  // nothing to read
  EXPECT_EQ(page_cache_fraction(fd.get(), 10 * page, page), 0.0);  // past the end: nothing can be cached
  // Half the range lies past the end: those pages count as not cached.
  EXPECT_NEAR(page_cache_fraction(fd.get(), 0, 8 * page), 0.5, 0.01);
  EXPECT_EQ(page_cache_fraction(-1, 0, page), 1.0);  // unknown: answers "cached", i.e. buffered reads
}

TEST(ShouldReadDirect, ModesOnAndOffIgnoreTheCache) {
  TempDir dir;
  testing::write_file_bytes(dir.path() / "f", testing::random_bytes(8192, 3));
  const UniqueFd fd = open_file(dir.path() / "f", O_RDONLY);
  read_range(fd.get(), 0, 8192);
  EXPECT_TRUE(should_read_direct(DirectIoMode::kOn, fd.get(), 0, 8192));
  EXPECT_FALSE(should_read_direct(DirectIoMode::kOff, fd.get(), 0, 8192));
  EXPECT_TRUE(should_read_direct(DirectIoMode::kOn, -1, 0, 8192));
  EXPECT_FALSE(should_read_direct(DirectIoMode::kOff, -1, 0, 8192));
}

TEST(DirectIoSupported, TrueOnADiskFalseForMissingFiles) {
  DiskDir dir;
  if (const std::string why = dir.unusable(); !why.empty()) GTEST_SKIP() << why;
  const auto path = dir.path() / "f";
  testing::write_file_bytes(path, testing::random_bytes(10000, 4));
  EXPECT_TRUE(direct_io_supported(path.c_str()));
  EXPECT_FALSE(direct_io_supported((dir.path() / "missing").c_str()));
}

TEST(DirectIoSupported, AgreesWithTheKernelOnTmpfs) {
  if (!is_tmpfs("/dev/shm")) GTEST_SKIP() << "/dev/shm is not tmpfs";
  std::string pattern = "/dev/shm/tensorstream-test-XXXXXX";
  const int raw = ::mkstemp(pattern.data());
  if (raw < 0) GTEST_SKIP() << "cannot create a file in /dev/shm";
  const UniqueFd owner(raw);
  const auto bytes = testing::random_bytes(8192, 5);
  pwrite_all(owner.get(), bytes, 0, pattern);
  // tmpfs refused O_DIRECT until Linux 6.6 and accepts it since: the answer must match what this kernel does.
  const int probe = ::open(pattern.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
  const int open_errno = errno;
  const bool supported = direct_io_supported(pattern.c_str());
  if (probe < 0) {
    EXPECT_EQ(open_errno, EINVAL);
    EXPECT_FALSE(supported);
  } else {
    EXPECT_TRUE(supported);
    void* block = std::aligned_alloc(kDirectIoAlignment, kDirectIoAlignment);
    EXPECT_EQ(::pread(probe, block, kDirectIoAlignment, 0), static_cast<ssize_t>(kDirectIoAlignment));
    std::free(block);
    ::close(probe);
  }
  ::unlink(pattern.c_str());
}

}  // namespace
}  // namespace tensorstream
