// Test support: 4 KiB-aligned memory standing in for the arena PyTorch owns (host slots, or "device" memory for the
// CUDA double), filled with 0xEE so that a byte nobody wrote is visible.
//
// Thread-safety: the memory is the tests'; the object is owned by one thread.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <span>

namespace tensorstream::testing {

class TestArena {
 public:
  explicit TestArena(size_t bytes) : bytes_(bytes), data_(static_cast<std::byte*>(std::aligned_alloc(4096, bytes))) {
    std::memset(data_, 0xEE, bytes);
  }
  ~TestArena() { std::free(data_); }
  TestArena(const TestArena&) = delete;
  TestArena& operator=(const TestArena&) = delete;
  [[nodiscard]] std::span<std::byte> span() const { return {data_, bytes_}; }

 private:
  size_t bytes_;
  std::byte* data_;
};

}  // namespace tensorstream::testing
