#include "support/manifest_builder.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "tensorstream/format/checksum.hpp"

namespace tensorstream::test_support {

namespace {

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t element_count(const std::vector<int64_t>& shape) {
  uint64_t count = 1;
  for (const int64_t dim : shape) {
    if (dim < 0 || __builtin_mul_overflow(count, static_cast<uint64_t>(dim), &count)) {
      throw std::invalid_argument("test shape too large");
    }
  }
  return count;
}

std::vector<std::byte> concat(std::vector<std::byte> head, const std::vector<std::byte>& tail) {
  head.insert(head.end(), tail.begin(), tail.end());
  return head;
}

}  // namespace

StoreId test_store_id() {
  StoreId id{};
  for (size_t i = 0; i < id.size(); ++i) id[i] = static_cast<uint8_t>(0x10 + i);
  return id;
}

std::vector<std::byte> pattern_bytes(size_t size, uint64_t seed, bool compressible) {
  std::vector<std::byte> bytes(size);
  uint64_t state = seed * 0x2545f4914f6cdd1dull + 1;
  if (compressible) {
    // A 16-byte motif that repeats: LZ4 and zstd both shrink it to almost nothing.
    std::byte motif[16];
    for (auto& b : motif) b = static_cast<std::byte>(splitmix64(state));
    for (size_t i = 0; i < size; ++i) bytes[i] = motif[i % sizeof(motif)];
  } else {
    for (size_t i = 0; i < size; ++i) bytes[i] = static_cast<std::byte>(splitmix64(state));
  }
  return bytes;
}

BuiltModel build_model(const ModelSpec& spec) {
  BuiltModel out;
  Manifest& manifest = out.manifest;
  manifest.store_id = spec.store_id;
  manifest.model_id = spec.model_id;
  manifest.chunk_size = spec.chunk_size;
  manifest.metadata = spec.metadata;

  FingerprintBuilder fingerprint;
  std::vector<std::byte> compressed;
  std::vector<std::byte> scratch;
  uint64_t cursor = 0;
  for (const BlockSpec& block_spec : spec.blocks) {
    cursor = align_up(cursor, kBlockAlignment);
    BlockRecord block;
    block.name = block_spec.name;
    block.offset = cursor;
    block.first_tensor = manifest.tensors.size();
    block.tensor_count = block_spec.tensors.size();
    fingerprint.add_block(block.name);
    for (const TensorSpec& tensor_spec : block_spec.tensors) {
      const size_t tensor_index = manifest.tensors.size();
      TensorRecord tensor;
      tensor.name = tensor_spec.name;
      tensor.dtype = tensor_spec.dtype;
      tensor.shape = tensor_spec.shape;
      const uint64_t nbytes = element_count(tensor.shape) * dtype_size(tensor.dtype);
      std::vector<std::byte> raw = tensor_spec.raw;
      if (raw.empty()) raw = pattern_bytes(nbytes, tensor_index, tensor_spec.compression.codec != Codec::kRaw);
      if (raw.size() != nbytes) throw std::invalid_argument("raw bytes of " + tensor.name + " do not match shape");
      fingerprint.add_tensor(tensor.name, dtype_name(tensor.dtype), tensor.shape);
      fingerprint.add_bytes(raw);

      cursor = align_up(cursor, kTensorAlignment);
      tensor.first_chunk = manifest.chunks.size();
      tensor.chunk_size = tensor_spec.chunk_size;
      const uint64_t chunk_size = tensor_spec.chunk_size != 0 ? tensor_spec.chunk_size : spec.chunk_size;
      for (uint64_t start = 0, index = 0; start < nbytes; start += chunk_size, ++index) {
        const auto piece =
            std::span<const std::byte>(raw).subspan(start, std::min<uint64_t>(chunk_size, nbytes - start));
        ChunkRecord chunk;
        chunk.offset = cursor;
        std::span<const std::byte> stored = piece;
        const Codec codec = compress_chunk(piece, tensor_spec.compression, tensor_spec.shuffle, compressed, scratch);
        if (codec != Codec::kRaw) {
          stored = compressed;
          chunk.codec = codec;
          chunk.shuffle = tensor_spec.shuffle;
        }
        chunk.stored_size = stored.size();
        chunk.checksum = chunk_checksum(ChunkBinding{spec.store_id, tensor_index, index, chunk.offset}, stored);
        out.data.resize(cursor + stored.size());
        std::memcpy(out.data.data() + cursor, stored.data(), stored.size());
        cursor += stored.size();
        manifest.chunks.push_back(chunk);
      }
      tensor.chunk_count = manifest.chunks.size() - tensor.first_chunk;
      manifest.tensors.push_back(std::move(tensor));
      out.raw.push_back(std::move(raw));
    }
    manifest.blocks.push_back(std::move(block));
  }
  manifest.data_size = align_up(cursor, kBlockAlignment);
  out.data.resize(manifest.data_size);
  manifest.fingerprint = fingerprint.finish();
  compute_derived_fields(manifest);

  out.expect.path = "store/models/" + spec.model_id + "/manifest";
  out.expect.store_id = spec.store_id;
  out.expect.model_id = spec.model_id;
  out.expect.data_file_size = manifest.data_size;
  return out;
}

ModelSpec small_chunk_model_spec() {
  ModelSpec spec;
  spec.store_id = test_store_id();
  spec.model_id = "small-chunks";
  spec.chunk_size = 4 * kMinChunkSize;
  TensorSpec table;
  table.name = "embed.weight";
  table.dtype = Dtype::kBfloat16;
  table.shape = {200, 64};  // 25600 bytes: six 4096-byte chunks and one of 1024
  table.compression = compression_for_level(1);
  table.shuffle = 2;
  table.chunk_size = kMinChunkSize;
  TensorSpec weight;
  weight.name = "layer.w";
  weight.dtype = Dtype::kFloat32;
  weight.shape = {100, 100};  // 40000 bytes: two 16384-byte chunks and one of 7232
  spec.blocks = {{"embed", {table}}, {"layer", {weight}}};
  return spec;
}

ModelSpec standard_model_spec() {
  ModelSpec spec;
  spec.store_id = test_store_id();
  spec.model_id = "test-model";
  spec.chunk_size = kMinChunkSize;
  spec.metadata = {{"architecture", "TinyNet"}, {"config", R"({"hidden_size": 64, "layers": 1})"}};

  TensorSpec embed;
  embed.name = "embed.weight";
  embed.dtype = Dtype::kFloat16;
  embed.shape = {48, 64};  // 6144 bytes: a compressible first chunk, an incompressible second one
  embed.raw = concat(pattern_bytes(4096, 1, true), pattern_bytes(2048, 2, false));
  embed.compression = {Codec::kLz4, 0};
  embed.shuffle = 2;

  spec.blocks = {
      {"embed", {embed, {"embed.scale", Dtype::kFloat32, {}, {}, {}, 0}}},
      {"layers.0",
       {{"layers.0.w", Dtype::kBfloat16, {40, 100}, {}, {}, 0},
        {"layers.0.b", Dtype::kInt64, {3}, {}, {}, 0},
        {"layers.0.empty", Dtype::kFloat32, {0, 5}, {}, {}, 0},
        {"layers.0.mask", Dtype::kBool, {10}, {}, {}, 0},
        {"layers.0.freqs", Dtype::kComplex64, {2, 3}, {}, {}, 0}}},
      {"head", {{"head.w", Dtype::kUint8, {9000}, {}, {}, 0}, {"head.ids", Dtype::kInt32, {5}, {}, {}, 0}}},
  };
  return spec;
}

BuiltModel build_standard_model() { return build_model(standard_model_spec()); }

ManifestJson manifest_json(const Manifest& manifest) { return ManifestJson::parse(manifest_text(manifest)); }

std::string manifest_text(const Manifest& manifest) {
  const std::vector<std::byte> file = serialize_manifest(manifest);
  return std::string(reinterpret_cast<const char*>(file.data()) + kManifestHeaderSize,
                     file.size() - kManifestHeaderSize);
}

std::vector<std::byte> encode_manifest_json(const ManifestJson& doc) { return encode_manifest_text(doc.dump()); }

std::vector<std::byte> encode_manifest_text(std::string_view json_text) {
  std::vector<std::byte> file(kManifestHeaderSize + json_text.size());
  std::memcpy(file.data(), "TSMANIF", 8);  // includes the terminating zero byte
  put_le32(file, 8, kFormatVersion);
  put_le32(file, 12, 0);
  put_le64(file, 16, json_text.size());
  std::memcpy(file.data() + kManifestHeaderSize, json_text.data(), json_text.size());
  put_le64(file, 24, plain_checksum(std::span<const std::byte>(file).subspan(kManifestHeaderSize)));
  return file;
}

std::vector<std::byte> mutate_manifest_json(const Manifest& manifest,
                                            const std::function<void(ManifestJson&)>& edit) {
  ManifestJson doc = manifest_json(manifest);
  edit(doc);
  return encode_manifest_json(doc);
}

std::vector<std::byte> mutate_manifest_text(const Manifest& manifest, const std::function<void(std::string&)>& edit) {
  std::string text = manifest_text(manifest);
  edit(text);
  return encode_manifest_text(text);
}

std::vector<std::byte> mutate_manifest_bytes(const Manifest& manifest,
                                             const std::function<void(std::vector<std::byte>&)>& edit) {
  std::vector<std::byte> file = serialize_manifest(manifest);
  edit(file);
  return file;
}

void put_le32(std::vector<std::byte>& bytes, size_t offset, uint32_t value) {
  for (size_t i = 0; i < 4; ++i) bytes.at(offset + i) = static_cast<std::byte>(value >> (8 * i));
}

void put_le64(std::vector<std::byte>& bytes, size_t offset, uint64_t value) {
  for (size_t i = 0; i < 8; ++i) bytes.at(offset + i) = static_cast<std::byte>(value >> (8 * i));
}

uint64_t get_le64(const std::vector<std::byte>& bytes, size_t offset) {
  uint64_t value = 0;
  for (size_t i = 0; i < 8; ++i) value |= static_cast<uint64_t>(bytes.at(offset + i)) << (8 * i);
  return value;
}

void expect_manifests_equal(const Manifest& actual, const Manifest& expected) {
  EXPECT_EQ(actual.store_id, expected.store_id);
  EXPECT_EQ(actual.model_id, expected.model_id);
  EXPECT_EQ(actual.fingerprint, expected.fingerprint);
  EXPECT_EQ(actual.chunk_size, expected.chunk_size);
  EXPECT_EQ(actual.data_size, expected.data_size);
  EXPECT_EQ(actual.metadata, expected.metadata);
  ASSERT_EQ(actual.blocks.size(), expected.blocks.size());
  for (size_t i = 0; i < actual.blocks.size(); ++i) {
    SCOPED_TRACE("block " + std::to_string(i));
    const BlockRecord& a = actual.blocks[i];
    const BlockRecord& e = expected.blocks[i];
    EXPECT_EQ(a.name, e.name);
    EXPECT_EQ(a.offset, e.offset);
    EXPECT_EQ(a.end, e.end);
    EXPECT_EQ(a.slot_size, e.slot_size);
    EXPECT_EQ(a.first_tensor, e.first_tensor);
    EXPECT_EQ(a.tensor_count, e.tensor_count);
    EXPECT_EQ(a.all_raw, e.all_raw);
  }
  ASSERT_EQ(actual.tensors.size(), expected.tensors.size());
  for (size_t i = 0; i < actual.tensors.size(); ++i) {
    SCOPED_TRACE("tensor " + std::to_string(i));
    const TensorRecord& a = actual.tensors[i];
    const TensorRecord& e = expected.tensors[i];
    EXPECT_EQ(a.name, e.name);
    EXPECT_EQ(a.dtype, e.dtype);
    EXPECT_EQ(a.shape, e.shape);
    EXPECT_EQ(a.nbytes, e.nbytes);
    EXPECT_EQ(a.slot_offset, e.slot_offset);
    EXPECT_EQ(a.block, e.block);
    EXPECT_EQ(a.first_chunk, e.first_chunk);
    EXPECT_EQ(a.chunk_count, e.chunk_count);
    EXPECT_EQ(a.chunk_size, e.chunk_size);
  }
  ASSERT_EQ(actual.chunks.size(), expected.chunks.size());
  for (size_t i = 0; i < actual.chunks.size(); ++i) {
    SCOPED_TRACE("chunk " + std::to_string(i));
    const ChunkRecord& a = actual.chunks[i];
    const ChunkRecord& e = expected.chunks[i];
    EXPECT_EQ(a.offset, e.offset);
    EXPECT_EQ(a.stored_size, e.stored_size);
    EXPECT_EQ(a.raw_size, e.raw_size);
    EXPECT_EQ(a.codec, e.codec);
    EXPECT_EQ(a.shuffle, e.shuffle);
    EXPECT_EQ(a.checksum, e.checksum);
  }
}

}  // namespace tensorstream::test_support
