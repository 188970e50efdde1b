// StoreReader: opens one published model, validates its STORE identity, manifest and data-file size before
// allocating anything from them, and reads tensors or whole blocks into caller memory, verifying checksums
// and decompressing.
//
// Thread-safety: immutable after open; every read method may be called from many threads at once (pread only).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tensorstream/error.hpp"
#include "tensorstream/format/manifest.hpp"
#include "tensorstream/io/file.hpp"
#include "tensorstream/store/storage_directory.hpp"

namespace tensorstream {

class StoreReader {
 public:
  // Throws IoError (missing or unreadable files), FormatError (any rule of docs/format.md).
  [[nodiscard]] static StoreReader open(const StorageDirectory& storage, std::string_view model_id);

  [[nodiscard]] const Manifest& manifest() const noexcept { return manifest_; }
  [[nodiscard]] const std::string& data_path() const noexcept { return data_path_; }
  [[nodiscard]] int data_fd() const noexcept { return data_fd_.get(); }

  [[nodiscard]] std::optional<size_t> find_block(std::string_view name) const;
  [[nodiscard]] std::optional<size_t> find_tensor(std::string_view name) const;

  // Reads tensor `index` into `out` (exactly its nbytes). Throws IoError, CorruptionError.
  void read_tensor(size_t index, std::span<std::byte> out, bool verify_checksums = true) const;
  // Reads every tensor of block `index` into `slot` at their slot offsets (slot.size() >= block.slot_size).
  // An all-raw block is one read straight into the slot.
  void read_block(size_t index, std::span<std::byte> slot, bool verify_checksums = true) const;
  // Reads rows `rows` (sorted, unique indices along the first dimension, each `row_bytes` bytes) of tensor
  // `tensor_index` into `out` (rows.size() * row_bytes bytes), in order. Each stored chunk that covers a requested row
  // is read exactly once (rows may straddle chunks), verified when asked and decoded when compressed; chunks no
  // requested row touches are never read. Without verification, raw chunks are read row range by row range rather
  // than whole. Returns the stored bytes read from the data file. Throws ConfigError (bad index, row_bytes that does
  // not divide the tensor, out of range / unsorted / repeated rows, wrong `out` size), IoError, CorruptionError.
  uint64_t read_rows(size_t tensor_index, uint64_t row_bytes, std::span<const int64_t> rows, std::span<std::byte> out,
                     bool verify_checksums = true) const;
  // Reads one chunk's stored bytes (no decoding) and checks its checksum when asked.
  void read_stored_chunk(size_t tensor_index, size_t chunk_in_tensor, std::span<std::byte> out,
                         bool verify_checksum) const;
  // Decodes stored chunk bytes (already read) into `out`; throws CorruptionError on failure.
  void decode_chunk(size_t tensor_index, size_t chunk_in_tensor, std::span<const std::byte> stored,
                    std::span<std::byte> out, std::vector<std::byte>& scratch) const;
  // Throws CorruptionError if `stored` does not match the chunk's checksum.
  void check_chunk(size_t tensor_index, size_t chunk_in_tensor, std::span<const std::byte> stored) const;

 private:
  StoreReader() = default;
  [[nodiscard]] CorruptionSite site(size_t tensor_index, size_t chunk_in_tensor) const;
  void read_tensor_chunks(size_t index, std::span<std::byte> out, bool verify) const;

  Manifest manifest_;
  std::string data_path_;
  UniqueFd data_fd_;
  std::unordered_map<std::string_view, size_t> block_index_;
  std::unordered_map<std::string_view, size_t> tensor_index_;
};

}  // namespace tensorstream
