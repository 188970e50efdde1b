#include "io/mmap_backend.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <deque>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "tensorstream/io/completion_queue.hpp"
#include "tensorstream/io/mapping_guard.hpp"

namespace tensorstream::detail {
namespace {

struct Mapping {
  std::byte* base = nullptr;
  uint64_t size = 0;  // bytes of the file mapped (its size when mapped)
  dev_t dev = 0;      // identity of the file: a descriptor number may be closed and reused for another file
  ino_t ino = 0;
  uint32_t guard = 0;  // mapping_guard handle: a page that vanishes with the file reads zeros instead of SIGBUS
};

void unmap(const Mapping& mapping) {
  unguard_mapping(mapping.guard);
  ::munmap(mapping.base, mapping.size);
}

uint64_t page_size() {
  static const uint64_t size = [] {
    const long value = ::sysconf(_SC_PAGESIZE);
    return value > 0 ? static_cast<uint64_t>(value) : uint64_t{4096};
  }();
  return size;
}

// Thread-safety: see mmap_backend.hpp. maps_mutex_ guards the mappings; completions_ has its own lock (so a copy
// in submit() never holds a lock another submitter needs).
class MmapBackend final : public IoBackend {
 public:
  MmapBackend() = default;
  ~MmapBackend() override {
    for (const auto& [fd, mapping] : mappings_) unmap(mapping);
    for (const Mapping& mapping : retired_) unmap(mapping);
  }
  MmapBackend(const MmapBackend&) = delete;
  MmapBackend& operator=(const MmapBackend&) = delete;

  // The copy happens here, on the caller's thread: a page fault on the mapping is the only "I/O" there is.
  void submit(std::span<const ReadRequest> requests) override {
    std::vector<Completion> finished;
    finished.reserve(requests.size());
    for (const ReadRequest& request : requests) {
      int64_t result = static_cast<int64_t>(request.buffer.size());
      if (!request.buffer.empty()) {
        const std::byte* source = nullptr;
        const int error = locate(request.fd, request.offset, request.buffer.size(), &source);
        if (error != 0) {
          result = -error;
        } else {
          std::memcpy(request.buffer.data(), source, request.buffer.size());
          // The file shrank during the copy: the pages that vanished were copied as zeros (mapping_guard).
          if (mapping_damaged(source, request.buffer.size())) result = -ENODATA;
        }
      }
      finished.push_back(Completion{request.user_data, result});
    }
    completions_.add_submitted(finished.size());
    completions_.push(finished);
  }

  // Every completion is ready as soon as submit() returns, so waiting never blocks.
  size_t reap(std::span<Completion> out, bool wait) override { return completions_.reap(out, wait); }

  [[nodiscard]] size_t in_flight() const override { return completions_.in_flight(); }

  // max_in_flight 0: submit() completes every read itself, there is no concurrency to bound.
  [[nodiscard]] BackendCaps caps() const override { return BackendCaps{"mmap", true, 0}; }

  // Empty when the range lies beyond the file or the file cannot be mapped (length 0 is always empty).
  [[nodiscard]] std::span<const std::byte> view(int fd, uint64_t offset, uint64_t length) override {
    if (length == 0) return {};
    const std::byte* source = nullptr;
    if (locate(fd, offset, length, &source) != 0) return {};
    return {source, static_cast<size_t>(length)};
  }

  void will_need(int fd, uint64_t offset, uint64_t length) override {
    if (length == 0) return;
    const std::byte* source = nullptr;
    if (locate(fd, offset, length, &source) != 0) {
      IoBackend::will_need(fd, offset, length);  // not mappable: the page cache hint still helps a read
      return;
    }
    advise(source, length, MADV_WILLNEED);
  }

  // MADV_DONTNEED on a private mapping drops our page-table entries (and any copy-on-write pages a caller wrote
  // into a view: those revert to the file's bytes). The page cache itself is left to the kernel.
  void dont_need(int fd, uint64_t offset, uint64_t length) override {
    if (length == 0) return;
    const std::byte* source = nullptr;
    if (lookup_only(fd, offset, length, &source)) {
      advise(source, length, MADV_DONTNEED);
    } else {
      IoBackend::dont_need(fd, offset, length);  // never mapped: nothing of ours to drop, hint the page cache
    }
  }

 private:
  static void advise(const std::byte* address, uint64_t length, int advice) {
    const uint64_t page = page_size();
    const auto start = reinterpret_cast<uintptr_t>(address);
    const uintptr_t aligned_start = start & ~(page - 1);
    const uintptr_t aligned_end = (start + length + page - 1) & ~(page - 1);
    // The mapping is page-aligned and whole pages, so rounding outward stays inside it. The result is a hint:
    // a failure changes nothing a caller relies on.
    (void)::madvise(reinterpret_cast<void*>(aligned_start), aligned_end - aligned_start, advice);
  }

  // Points *source at the mapped bytes of [offset, offset+length) of fd's file, mapping it (again) if needed.
  // Returns 0 or an errno: ENODATA beyond the current end of the file, else what fstat/mmap said.
  int locate(int fd, uint64_t offset, uint64_t length, const std::byte** source) {
    struct stat st {};
    if (::fstat(fd, &st) != 0) return errno;
    const auto file_size = static_cast<uint64_t>(st.st_size);
    // Checked now, before touching the mapping: pages past the end of the file raise SIGBUS when read.
    if (offset > file_size || length > file_size - offset) return ENODATA;
    const std::lock_guard lock(maps_mutex_);
    auto it = mappings_.find(fd);
    if (it != mappings_.end()) {
      const Mapping& mapping = it->second;
      const bool same_file = mapping.dev == st.st_dev && mapping.ino == st.st_ino;
      // A mapping that lost pages to a truncation holds zeros there for good: after a repair, map afresh.
      if (same_file && offset + length <= mapping.size && !mapping_damaged(mapping.guard)) {
        *source = mapping.base + offset;
        return 0;
      }
      // Another file behind a reused descriptor, or the file grew: map again. Views of the old mapping may
      // still be in use, so it stays mapped until destruction.
      retired_.push_back(mapping);
      mappings_.erase(it);
    }
    if (file_size == 0) return ENODATA;  // mmap refuses empty files; only length 0 could have fit (handled)
    if (file_size > SIZE_MAX) return EFBIG;
    void* base = ::mmap(nullptr, static_cast<size_t>(file_size), PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (base == MAP_FAILED) return errno;
    const Mapping mapping{static_cast<std::byte*>(base), file_size, st.st_dev, st.st_ino,
                          guard_mapping(base, file_size)};
    mappings_.emplace(fd, mapping);
    *source = mapping.base + offset;
    return 0;
  }

  // Like locate() without creating a mapping; false when the range is not mapped for this file.
  bool lookup_only(int fd, uint64_t offset, uint64_t length, const std::byte** source) {
    struct stat st {};
    if (::fstat(fd, &st) != 0) return false;
    const std::lock_guard lock(maps_mutex_);
    const auto it = mappings_.find(fd);
    if (it == mappings_.end()) return false;
    const Mapping& mapping = it->second;
    if (mapping.dev != st.st_dev || mapping.ino != st.st_ino) return false;
    if (offset > mapping.size || length > mapping.size - offset) return false;
    *source = mapping.base + offset;
    return true;
  }

  std::mutex maps_mutex_;
  std::unordered_map<int, Mapping> mappings_;
  std::vector<Mapping> retired_;

  CompletionQueue completions_;
};

}  // namespace

std::unique_ptr<IoBackend> make_mmap_backend() { return std::make_unique<MmapBackend>(); }

}  // namespace tensorstream::detail
