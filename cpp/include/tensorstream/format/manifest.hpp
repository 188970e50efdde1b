// The manifest: the index of one published model (blocks -> tensors -> chunks), its binary header, and
// the strict parser that enforces every rule of docs/format.md before anything is allocated from it.
//
// Records are stored flat (all tensors of all blocks in one vector, all chunks in one vector) with index
// ranges, so lookups are plain array indexing.
//
// Thread-safety: Manifest is an immutable value after parsing; the free functions are pure.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tensorstream/format/checksum.hpp"
#include "tensorstream/format/codec.hpp"
#include "tensorstream/format/dtype.hpp"

namespace tensorstream {

inline constexpr uint32_t kFormatVersion = 1;
inline constexpr uint64_t kBlockAlignment = 4096;   // every block's region starts here (O_DIRECT, cuFile)
inline constexpr uint64_t kTensorAlignment = 256;   // PyTorch's CUDA allocator alignment; also covers CPU's 64
inline constexpr size_t kManifestHeaderSize = 32;
inline constexpr uint64_t kMaxManifestJsonBytes = 64ull << 20;  // ~600k chunks of metadata; far above real models
inline constexpr uint64_t kMinChunkSize = 4096;
inline constexpr uint64_t kMaxChunkSize = 64ull << 20;
inline constexpr uint64_t kDefaultChunkSize = 4ull << 20;  // large enough for full disk bandwidth, small enough to pipeline
inline constexpr size_t kMaxBlocks = 1u << 20;
inline constexpr size_t kMaxTensors = 1u << 22;
inline constexpr size_t kMaxChunks = 1u << 24;
inline constexpr size_t kMaxRank = 16;
inline constexpr size_t kMaxNameBytes = 1024;
inline constexpr size_t kMaxMetadataEntries = 1024;
inline constexpr size_t kMaxMetadataValueBytes = 65536;
inline constexpr uint64_t kMaxTensorBytes = 1ull << 48;  // 256 TiB: any bigger value is corruption, not a model

struct ChunkRecord {
  uint64_t offset = 0;       // absolute offset of the stored bytes in the data file
  uint64_t stored_size = 0;  // bytes in the data file
  uint64_t raw_size = 0;     // bytes after decoding (derived: min(tensor's chunk_size, rest of the tensor))
  Codec codec = Codec::kRaw;
  uint32_t shuffle = 0;      // byte-grouping element size, 0 = none
  uint64_t checksum = 0;     // chunk_checksum(binding, stored bytes)
};

struct TensorRecord {
  std::string name;
  Dtype dtype = Dtype::kUint8;
  std::vector<int64_t> shape;
  uint64_t nbytes = 0;       // derived: product(shape) * dtype_size
  uint64_t slot_offset = 0;  // derived: where the tensor lives in its block's slot (256-aligned)
  uint32_t block = 0;
  size_t first_chunk = 0;
  size_t chunk_count = 0;
  // Raw bytes per chunk of this tensor: the manifest's chunk_size unless the tensor says otherwise (smaller, e.g.
  // a few rows of an embedding that is read by rows, so a read of one row does not verify a 4 MiB chunk). A writer
  // may leave 0 for "the manifest's"; compute_derived_fields and the parser resolve it, so readers see the value.
  uint64_t chunk_size = 0;
};

struct BlockRecord {
  std::string name;
  uint64_t offset = 0;       // start of the block's region in the data file (4 KiB aligned)
  uint64_t end = 0;          // one past the last stored byte of the block
  uint64_t slot_size = 0;    // derived: memory needed to hold every tensor raw, rounded up to 4 KiB
  size_t first_tensor = 0;
  size_t tensor_count = 0;
  bool all_raw = true;       // derived: file region == slot layout, so one read fills the slot
};

struct Manifest {
  StoreId store_id{};
  std::string model_id;
  std::string fingerprint;  // 32 hex digits
  uint64_t chunk_size = kDefaultChunkSize;
  uint64_t data_size = 0;
  std::map<std::string, std::string> metadata;
  std::vector<BlockRecord> blocks;
  std::vector<TensorRecord> tensors;
  std::vector<ChunkRecord> chunks;

  [[nodiscard]] std::span<const TensorRecord> tensors_of(const BlockRecord& block) const {
    return std::span(tensors).subspan(block.first_tensor, block.tensor_count);
  }
  [[nodiscard]] std::span<const ChunkRecord> chunks_of(const TensorRecord& tensor) const {
    return std::span(chunks).subspan(tensor.first_chunk, tensor.chunk_count);
  }
};

struct ManifestHeader {
  uint64_t json_length = 0;
  uint64_t json_checksum = 0;
};

// What the caller knows independently of the manifest; every field is cross-checked.
struct ManifestExpectations {
  std::string path;                 // used in error messages only
  StoreId store_id{};               // from the STORE file
  std::string model_id;             // the directory name
  std::optional<uint64_t> data_file_size;  // nullopt: skip the data.size rule (fuzzing, tools)
  std::string data_path;                   // names the data file in a data.size error (default: path)
};

// Validates the 32-byte header against the file size. Throws FormatError.
[[nodiscard]] ManifestHeader parse_manifest_header(std::span<const std::byte> header, uint64_t file_size,
                                                   const std::string& path);
// Validates the JSON body (exactly header.json_length bytes) and every layout rule. Throws FormatError.
[[nodiscard]] Manifest parse_manifest_body(std::span<const std::byte> json, const ManifestHeader& header,
                                           const ManifestExpectations& expect);
// Both of the above over a whole manifest file image.
[[nodiscard]] Manifest parse_manifest(std::span<const std::byte> file, const ManifestExpectations& expect);

// Serializes a manifest (derived fields are not written) into a complete file image: header + JSON.
[[nodiscard]] std::vector<std::byte> serialize_manifest(const Manifest& manifest);

// Fills the derived fields (nbytes, slot_offset, chunk_size 0 -> the manifest's, raw_size, slot_size, all_raw) of
// a manifest built by a writer.
void compute_derived_fields(Manifest& manifest);

// Model ids are directory names: 1-128 bytes of [A-Za-z0-9._-], not starting with '.' or '-'.
[[nodiscard]] bool is_valid_model_id(std::string_view model_id) noexcept;

[[nodiscard]] constexpr uint64_t align_up(uint64_t value, uint64_t alignment) noexcept {
  return (value + alignment - 1) / alignment * alignment;
}

}  // namespace tensorstream
