// A fresh directory for one test, removed with everything in it when the test ends.
#pragma once

#include <cstddef>
#include <filesystem>
#include <span>
#include <vector>

namespace tensorstream::testing {

class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }

 private:
  std::filesystem::path path_;
};

// Deterministic pseudo-random bytes (splitmix64), so failures reproduce.
[[nodiscard]] std::vector<std::byte> random_bytes(size_t count, uint64_t seed);

// Reads or overwrites bytes of a file in place (for corrupting stores in tests).
[[nodiscard]] std::vector<std::byte> read_file_bytes(const std::filesystem::path& path);
void write_file_bytes(const std::filesystem::path& path, std::span<const std::byte> bytes);
void flip_bit(const std::filesystem::path& path, uint64_t offset, int bit = 0);

}  // namespace tensorstream::testing
