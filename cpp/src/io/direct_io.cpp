#include "tensorstream/io/direct_io.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <vector>

namespace tensorstream {
namespace {

// Ranges up to this many pages are checked page by page. Larger ones are sampled: kSampleWindows windows of
// kWindowPages consecutive pages, spread evenly over the range (4096 pages in all, so the check costs a
// bounded ~200 syscalls and 4 KiB of residency vector however large the range). Windows rather than single
// pages because a page cache fills by readahead runs, and one mincore per window keeps the syscall count low.
constexpr uint64_t kMaxSampledPages = 4096;
constexpr uint64_t kSampleWindows = 64;
constexpr uint64_t kWindowPages = kMaxSampledPages / kSampleWindows;

uint64_t page_size() {
  const long value = ::sysconf(_SC_PAGESIZE);
  return value > 0 ? static_cast<uint64_t>(value) : uint64_t{4096};
}

// Counts resident pages among `pages` pages of `fd` starting at page-aligned `offset`; -1 if it cannot tell.
int64_t resident_pages(int fd, uint64_t offset, uint64_t pages, uint64_t page) {
  const size_t bytes = static_cast<size_t>(pages * page);
  // A read-only shared mapping touches no page: mincore only looks at the page cache behind it.
  void* base = ::mmap(nullptr, bytes, PROT_READ, MAP_SHARED, fd, static_cast<off_t>(offset));
  if (base == MAP_FAILED) return -1;
  std::vector<unsigned char> vec(static_cast<size_t>(pages));
  const int rc = ::mincore(base, bytes, vec.data());
  ::munmap(base, bytes);
  if (rc != 0) return -1;
  return std::count_if(vec.begin(), vec.end(), [](unsigned char v) { return (v & 1u) != 0; });
}

}  // namespace

// Pages past the end of the file cannot be cached and count as not resident; an empty range (or one wholly past
// the end) answers 1.0 or 0.0 respectively. When residency cannot be determined (the file cannot be mapped)
// the answer is 1.0, which makes kAuto pick buffered reads: they work on every file system.
double page_cache_fraction(int fd, uint64_t offset, uint64_t length) {
  if (length == 0) return 1.0;
  struct stat st {};
  if (::fstat(fd, &st) != 0) return 1.0;
  const auto file_size = static_cast<uint64_t>(st.st_size);
  const uint64_t page = page_size();
  const uint64_t end = offset + std::min(length, UINT64_MAX - offset);
  const uint64_t first_page = offset / page;
  const uint64_t total_pages = (end - 1) / page - first_page + 1;
  const uint64_t file_pages = (file_size + page - 1) / page;
  if (first_page >= file_pages) return 0.0;
  // Only the pages that exist can be mapped; the others stay in the denominator as "not cached".
  const uint64_t mappable = std::min(total_pages, file_pages - first_page);

  if (mappable <= kMaxSampledPages) {
    const int64_t resident = resident_pages(fd, first_page * page, mappable, page);
    if (resident < 0) return 1.0;
    return static_cast<double>(resident) / static_cast<double>(total_pages);
  }
  uint64_t resident = 0;
  uint64_t sampled = 0;
  for (uint64_t w = 0; w < kSampleWindows; ++w) {
    // Window w starts at w/kSampleWindows of the way through the mappable pages (the last ends at its end).
    const uint64_t start = w * (mappable - kWindowPages) / (kSampleWindows - 1);
    const int64_t count = resident_pages(fd, (first_page + start) * page, kWindowPages, page);
    if (count < 0) return 1.0;
    resident += static_cast<uint64_t>(count);
    sampled += kWindowPages;
  }
  const double mappable_fraction = static_cast<double>(resident) / static_cast<double>(sampled);
  return mappable_fraction * static_cast<double>(mappable) / static_cast<double>(total_pages);
}

bool should_read_direct(DirectIoMode mode, int fd, uint64_t offset, uint64_t length) {
  switch (mode) {
    case DirectIoMode::kOn:
      return true;
    case DirectIoMode::kOff:
      return false;
    case DirectIoMode::kAuto:
      break;
  }
  // Mostly cached: a buffered read is a memcpy from RAM. Mostly not: O_DIRECT avoids filling (and evicting)
  // the page cache for data we keep in our own buffers anyway. Half is the break-even guess.
  return page_cache_fraction(fd, offset, length) < 0.5;
}

// Opening with O_DIRECT is refused with EINVAL by file systems without direct I/O (tmpfs before Linux 6.6,
// some FUSE mounts). Some accept the open and refuse the read instead, so one aligned block is read too.
// Any other failure (missing file, no permission) also answers false: O_DIRECT cannot be used there either.
bool direct_io_supported(const char* path) {
  int fd;
  do {
    fd = ::open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return false;
  struct stat st {};
  bool supported = ::fstat(fd, &st) == 0;
  if (supported && S_ISREG(st.st_mode)) {
    void* block = std::aligned_alloc(kDirectIoAlignment, kDirectIoAlignment);
    if (block != nullptr) {
      ssize_t n;
      do {
        n = ::pread(fd, block, kDirectIoAlignment, 0);
      } while (n < 0 && errno == EINTR);
      supported = n >= 0;
      std::free(block);
    }
  }
  ::close(fd);
  return supported;
}

}  // namespace tensorstream
