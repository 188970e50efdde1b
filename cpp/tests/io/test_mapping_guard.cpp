#include "tensorstream/io/mapping_guard.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstring>
#include <string>
#include <vector>

#include "support/temp_dir.hpp"

namespace tensorstream {
namespace {

using testing::TempDir;

constexpr size_t kPage = 4096;

// A file of `pages` pages of 0xAB, mapped private read-write (as the mmap backend maps store files).
struct MappedFile {
  MappedFile(const std::string& path, size_t pages) : size(pages * kPage) {
    fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
    std::vector<unsigned char> bytes(size, 0xAB);
    EXPECT_EQ(::write(fd, bytes.data(), size), static_cast<ssize_t>(size));
    base = static_cast<unsigned char*>(::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0));
    EXPECT_NE(base, MAP_FAILED);
  }
  ~MappedFile() {
    ::munmap(base, size);
    ::close(fd);
  }
  int fd = -1;
  size_t size;
  unsigned char* base = nullptr;
};

// Sums every byte through a volatile pointer, so the compiler keeps each access.
unsigned sum(const unsigned char* begin, size_t length) {
  const volatile unsigned char* p = begin;
  unsigned total = 0;
  for (size_t i = 0; i < length; ++i) total += p[i];
  return total;
}

TEST(MappingGuard, APageThatVanishedWithTheFileReadsAsZerosAndIsReported) {
  TempDir dir;
  MappedFile file(dir.path().string() + "/data", 4);
  const uint32_t handle = guard_mapping(file.base, file.size);
  ASSERT_NE(handle, 0u);
  EXPECT_EQ(sum(file.base, file.size), 0xABu * file.size);
  EXPECT_FALSE(mapping_damaged(handle));
  ASSERT_EQ(::ftruncate(file.fd, static_cast<off_t>(2 * kPage)), 0);  // pages 2 and 3 leave the file
  EXPECT_EQ(sum(file.base, file.size), 0xABu * 2 * kPage);            // no SIGBUS: they read as zeros
  EXPECT_TRUE(mapping_damaged(handle));
  EXPECT_FALSE(mapping_damaged(file.base, 2 * kPage));  // what is still the file's is intact
  EXPECT_TRUE(mapping_damaged(file.base + 3 * kPage, 16));
  EXPECT_TRUE(mapping_damaged(file.base + kPage, 2 * kPage));
  unguard_mapping(handle);
}

TEST(MappingGuard, AFaultOutsideEveryGuardedRangeStillEndsTheProcess) {
  TempDir dir;
  MappedFile guarded(dir.path().string() + "/guarded", 1);
  const uint32_t handle = guard_mapping(guarded.base, guarded.size);
  ASSERT_NE(handle, 0u);
  MappedFile unguarded(dir.path().string() + "/unguarded", 2);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    if (::ftruncate(unguarded.fd, 0) != 0) ::_exit(2);
    (void)sum(unguarded.base, unguarded.size);  // SIGBUS, not ours: the default action
    ::_exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  // Killed by SIGBUS, or ended by the handler that was there before ours (AddressSanitizer's reports and exits 1).
  if (WIFSIGNALED(status)) {
    EXPECT_EQ(WTERMSIG(status), SIGBUS);
  } else {
    ASSERT_TRUE(WIFEXITED(status));
    EXPECT_NE(WEXITSTATUS(status), 0) << "the access went on as if nothing happened";
    EXPECT_NE(WEXITSTATUS(status), 2) << "ftruncate failed in the child";
  }
  unguard_mapping(handle);
}

TEST(MappingGuard, AnUnguardedRangeIsNeverReportedDamaged) {
  TempDir dir;
  MappedFile file(dir.path().string() + "/data", 1);
  EXPECT_FALSE(mapping_damaged(file.base, file.size));
  EXPECT_FALSE(mapping_damaged(0u));
  EXPECT_FALSE(mapping_damaged(999999u));
  unguard_mapping(0);  // ignored
}

}  // namespace
}  // namespace tensorstream
