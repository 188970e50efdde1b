#include "tensorstream/io/file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "tensorstream/error.hpp"

namespace tensorstream {

UniqueFd::~UniqueFd() { reset(); }

UniqueFd& UniqueFd::operator=(UniqueFd&& other) noexcept {
  if (this != &other) {
    reset();
    fd_ = std::exchange(other.fd_, -1);
  }
  return *this;
}

void UniqueFd::reset() noexcept {
  if (fd_ >= 0) ::close(fd_);  // close errors are not actionable here; data integrity relies on fsync
  fd_ = -1;
}

void pwrite_all(int fd, std::span<const std::byte> bytes, uint64_t offset, const std::string& path) {
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::pwrite(fd, bytes.data() + done, bytes.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno(path, "write at offset " + std::to_string(offset + done));
    }
    if (n == 0) throw IoError(path, EIO, "write at offset " + std::to_string(offset + done) + " (no progress)");
    done += static_cast<size_t>(n);
  }
}

void pread_all(int fd, std::span<std::byte> bytes, uint64_t offset, const std::string& path) {
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::pread(fd, bytes.data() + done, bytes.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno(path, "read");
    }
    if (n == 0) throw IoError(path, EIO, "read at offset " + std::to_string(offset + done) + " (unexpected end of file)");
    done += static_cast<size_t>(n);
  }
}

UniqueFd open_file(const std::filesystem::path& path, int flags, unsigned mode) {
  int fd;
  do {
    fd = ::open(path.c_str(), flags | O_CLOEXEC, mode);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) throw_errno(path.string(), "open");
  return UniqueFd(fd);
}

void write_file_durably(const std::filesystem::path& path, std::span<const std::byte> bytes, bool replace_existing) {
  const UniqueFd fd = open_file(path, O_WRONLY | O_CREAT | (replace_existing ? O_TRUNC : O_EXCL), 0644);
  pwrite_all(fd.get(), bytes, 0, path.string());
  if (::fsync(fd.get()) != 0) throw_errno(path.string(), "fsync");
}

void fsync_path(const std::filesystem::path& path) {
  const UniqueFd fd = open_file(path, O_RDONLY);
  // A failed fsync means the data may not be durable; it is reported, never retried into "success".
  if (::fsync(fd.get()) != 0) throw_errno(path.string(), "fsync");
}

uint64_t file_size(int fd, const std::string& path) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw_errno(path, "stat");
  return static_cast<uint64_t>(st.st_size);
}

std::vector<std::byte> read_whole_file(const std::filesystem::path& path, uint64_t max_bytes) {
  const UniqueFd fd = open_file(path, O_RDONLY);
  const uint64_t size = file_size(fd.get(), path.string());
  if (size > max_bytes) throw IoError(path.string(), EFBIG, "read (file larger than " + std::to_string(max_bytes) + " bytes)");
  std::vector<std::byte> bytes(size);
  pread_all(fd.get(), bytes, 0, path.string());
  return bytes;
}

}  // namespace tensorstream
