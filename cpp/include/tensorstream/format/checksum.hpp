// Chunk checksums and content fingerprints, both from xxHash's XXH3.
//
// A chunk checksum is bound to where the chunk belongs: its seed mixes the store id, the tensor's index,
// the chunk's index and the chunk's file offset, so bytes copied from another chunk, tensor, offset or store
// fail verification even when they are themselves intact (docs/format.md, "Chunk checksums").
//
// Thread-safety: free functions are pure; a FingerprintBuilder is used by one thread at a time.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

namespace tensorstream {

using StoreId = std::array<uint8_t, 16>;

struct ChunkBinding {
  StoreId store_id{};
  uint64_t tensor_index = 0;  // position of the tensor in the manifest, counted across all blocks
  uint64_t chunk_index = 0;   // position of the chunk within its tensor
  uint64_t file_offset = 0;   // where the stored bytes start in the data file
};

// XXH3-64 of the stored bytes, seeded with chunk_seed(binding).
[[nodiscard]] uint64_t chunk_checksum(const ChunkBinding& binding, std::span<const std::byte> stored) noexcept;
[[nodiscard]] uint64_t chunk_seed(const ChunkBinding& binding) noexcept;
// XXH3-64 with seed 0, used for the STORE file and the manifest header.
[[nodiscard]] uint64_t plain_checksum(std::span<const std::byte> bytes) noexcept;

// 16 lowercase hex digits <-> value; parse returns false on anything else.
[[nodiscard]] std::string hex64(uint64_t value);
[[nodiscard]] bool parse_hex64(std::string_view text, uint64_t& value) noexcept;
[[nodiscard]] std::string hex_bytes(std::span<const uint8_t> bytes);
[[nodiscard]] bool parse_hex_bytes(std::string_view text, std::span<uint8_t> out) noexcept;

// Streaming XXH3-128 over a model's logical content (block and tensor names, dtypes, shapes, raw bytes),
// independent of chunk size, compression, store and block order: the same weights always give the same
// fingerprint (docs/format.md §6). Call add_block, then per tensor add_tensor and add_bytes (any number of
// times, in order, totalling the tensor's size).
class FingerprintBuilder {
 public:
  FingerprintBuilder();
  ~FingerprintBuilder();
  FingerprintBuilder(FingerprintBuilder&&) noexcept;
  FingerprintBuilder& operator=(FingerprintBuilder&&) noexcept;

  void add_block(std::string_view block_name);
  void add_tensor(std::string_view tensor_name, std::string_view dtype_name, std::span<const int64_t> shape);
  void add_bytes(std::span<const std::byte> raw);
  // 32 lowercase hex digits. The builder stays usable (more blocks may follow).
  [[nodiscard]] std::string finish() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace tensorstream
