// Test support: builds small, valid models (manifest + matching data file) and re-encodes manifest files after
// a test has broken exactly one thing in them, so that each test reaches exactly the rule it is about.
#pragma once

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "tensorstream/format/codec.hpp"
#include "tensorstream/format/manifest.hpp"

namespace tensorstream::test_support {

struct TensorSpec {
  std::string name;
  Dtype dtype = Dtype::kUint8;
  std::vector<int64_t> shape;
  std::vector<std::byte> raw;             // nbytes of content; left empty, a deterministic pattern is generated
  CompressionChoice compression{};        // kRaw: every chunk stored raw
  uint32_t shuffle = 0;                   // used only for chunks that end up compressed
  uint64_t chunk_size = 0;                // the tensor's own chunk size; 0 = the model's
};

struct BlockSpec {
  std::string name;
  std::vector<TensorSpec> tensors;
};

struct ModelSpec {
  StoreId store_id{};
  std::string model_id = "test-model";
  uint64_t chunk_size = kMinChunkSize;
  std::map<std::string, std::string> metadata;
  std::vector<BlockSpec> blocks;
};

struct BuiltModel {
  Manifest manifest;                            // derived fields filled in
  ManifestExpectations expect;                  // matches the manifest, including data_file_size
  std::vector<std::byte> data;                  // the data file: chunks at their offsets, zero padding
  std::vector<std::vector<std::byte>> raw;      // raw bytes of each tensor, by global tensor index
};

// The store id every helper uses unless told otherwise: bytes 0x10, 0x11, ..., 0x1f.
[[nodiscard]] StoreId test_store_id();

// Deterministic bytes: `compressible` ones repeat a short pattern, the others look random.
[[nodiscard]] std::vector<std::byte> pattern_bytes(size_t size, uint64_t seed, bool compressible);

// Lays the model out as docs/format.md §4-§6 require: offsets, chunking, compression (a chunk that does not
// shrink is stored raw with shuffle 0), bound checksums and the fingerprint. The fingerprint feeds each tensor's
// raw bytes to FingerprintBuilder::add_bytes in one call.
[[nodiscard]] BuiltModel build_model(const ModelSpec& spec);

// The standard valid test model (chunk size 4096):
//   block "embed":    embed.weight  float16  [48, 64]  2 chunks: chunk 0 lz4 + shuffle 2, chunk 1 raw
//                     embed.scale   float32  []        scalar
//   block "layers.0": layers.0.w     bfloat16 [40, 100] 2 raw chunks
//                     layers.0.b     int64    [3]
//                     layers.0.empty float32  [0, 5]    no chunks
//                     layers.0.mask  bool     [10]
//                     layers.0.freqs complex64 [2, 3]
//   block "head":     head.w         uint8    [9000]    3 raw chunks
//                     head.ids       int32    [5]
[[nodiscard]] ModelSpec standard_model_spec();
// A model with chunk size 16384 whose first tensor has its own chunk size (docs/format.md, tensor.chunk_size):
//   block "embed": embed.weight bfloat16 [200, 64]  chunk_size 4096: 7 chunks, compressed at level 1 where they shrink
//   block "layer": layer.w      float32  [100, 100] 3 raw chunks of the model's 16384
[[nodiscard]] ModelSpec small_chunk_model_spec();
[[nodiscard]] BuiltModel build_standard_model();

// ---- re-encoding manifest files ---------------------------------------------------------------------------------

using ManifestJson = nlohmann::ordered_json;

// The JSON document / text inside serialize_manifest(manifest).
[[nodiscard]] ManifestJson manifest_json(const Manifest& manifest);
[[nodiscard]] std::string manifest_text(const Manifest& manifest);

// A manifest file around the given JSON, with a correct header (json_length and checksum).
[[nodiscard]] std::vector<std::byte> encode_manifest_json(const ManifestJson& doc);
[[nodiscard]] std::vector<std::byte> encode_manifest_text(std::string_view json_text);

// serialize_manifest(manifest), its JSON edited by `edit`, re-encoded with a correct header.
[[nodiscard]] std::vector<std::byte> mutate_manifest_json(const Manifest& manifest,
                                                          const std::function<void(ManifestJson&)>& edit);
[[nodiscard]] std::vector<std::byte> mutate_manifest_text(const Manifest& manifest,
                                                          const std::function<void(std::string&)>& edit);
// serialize_manifest(manifest) with its bytes (header and JSON) edited by `edit`; nothing is recomputed.
[[nodiscard]] std::vector<std::byte> mutate_manifest_bytes(const Manifest& manifest,
                                                           const std::function<void(std::vector<std::byte>&)>& edit);

// Little-endian field access for header edits.
void put_le32(std::vector<std::byte>& bytes, size_t offset, uint32_t value);
void put_le64(std::vector<std::byte>& bytes, size_t offset, uint64_t value);
[[nodiscard]] uint64_t get_le64(const std::vector<std::byte>& bytes, size_t offset);

// GoogleTest checks that two manifests agree on every field, derived ones included.
void expect_manifests_equal(const Manifest& actual, const Manifest& expected);

}  // namespace tensorstream::test_support
