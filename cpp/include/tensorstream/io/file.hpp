// Plain POSIX file helpers: an owning descriptor, and full-length pread/pwrite that retry EINTR and resume
// short transfers (a short read or write is normal for files on some file systems and under signals).
//
// Thread-safety: UniqueFd is move-only and owned by one thread; the functions are safe from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace tensorstream {

// RAII file descriptor.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd();
  UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  [[nodiscard]] int get() const noexcept { return fd_; }
  [[nodiscard]] explicit operator bool() const noexcept { return fd_ >= 0; }
  void reset() noexcept;

 private:
  int fd_ = -1;
};

// Writes all of `bytes` at `offset`, resuming short writes and retrying EINTR. Throws IoError naming `path` and the
// file offset where the write failed.
void pwrite_all(int fd, std::span<const std::byte> bytes, uint64_t offset, const std::string& path);
// Reads exactly bytes.size() at `offset`; EOF before that is IoError(EIO, "unexpected end of file").
void pread_all(int fd, std::span<std::byte> bytes, uint64_t offset, const std::string& path);
void fsync_path(const std::filesystem::path& path);  // opens read-only and fsyncs (files and directories)

// Creates `path` (which must not exist; with replace_existing it is truncated instead), writes all of `bytes` and
// fsyncs it. The caller makes it visible (rename / link) and fsyncs the directory. Throws IoError naming the path.
void write_file_durably(const std::filesystem::path& path, std::span<const std::byte> bytes,
                        bool replace_existing = false);

// Opens `path` with `flags` (O_CLOEXEC added); throws IoError naming the path.
[[nodiscard]] UniqueFd open_file(const std::filesystem::path& path, int flags, unsigned mode = 0644);
// Size of an open file; throws IoError.
[[nodiscard]] uint64_t file_size(int fd, const std::string& path);
// Whole file into memory, refusing files larger than max_bytes (FormatError is the caller's business:
// this throws IoError(EFBIG)).
[[nodiscard]] std::vector<std::byte> read_whole_file(const std::filesystem::path& path, uint64_t max_bytes);

}  // namespace tensorstream
