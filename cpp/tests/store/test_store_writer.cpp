#include "tensorstream/store/store_writer.hpp"

#include <gtest/gtest.h>

#include <functional>

#include "support/store_fixture.hpp"
#include "support/temp_dir.hpp"
#include "tensorstream/error.hpp"
#include "tensorstream/store/store_reader.hpp"

namespace tensorstream {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

TEST(StoreWriter, LayoutFollowsTheFormat) {
  TempDir dir;
  const auto storage = StorageDirectory::open_or_create(dir.path());
  const auto blocks = testing::sample_model();
  StoreWriteOptions options;
  options.chunk_size = 4096;
  const StoreWriteResult result = testing::write_test_model(storage, "m", blocks, options);
  EXPECT_EQ(result.outcome, PublishOutcome::kPublished);
  EXPECT_EQ(result.model_id, "m");

  const StoreReader reader = StoreReader::open(storage, "m");
  const Manifest& manifest = reader.manifest();
  ASSERT_EQ(manifest.blocks.size(), blocks.size());
  EXPECT_EQ(fs::file_size(reader.data_path()), manifest.data_size);
  EXPECT_EQ(manifest.data_size % kBlockAlignment, 0u);
  uint64_t raw = 0;
  for (const BlockRecord& block : manifest.blocks) {
    EXPECT_EQ(block.offset % kBlockAlignment, 0u) << block.name;
    EXPECT_TRUE(block.all_raw);
    for (const TensorRecord& tensor : manifest.tensors_of(block)) {
      raw += tensor.nbytes;
      EXPECT_EQ(tensor.slot_offset % kTensorAlignment, 0u);
      if (tensor.chunk_count > 0) {
        // Uncompressed: the file region is the slot layout.
        EXPECT_EQ(manifest.chunks[tensor.first_chunk].offset, block.offset + tensor.slot_offset) << tensor.name;
      }
      for (const ChunkRecord& chunk : manifest.chunks_of(tensor)) EXPECT_LE(chunk.raw_size, 4096u);
    }
  }
  EXPECT_EQ(result.raw_bytes, raw);
  EXPECT_EQ(manifest.tensors[manifest.blocks[2].first_tensor].chunk_count, 3u);  // 9001 bytes in 4 KiB chunks
  EXPECT_TRUE(fs::is_empty(storage.tmp_dir()));
}

TEST(StoreWriter, CompressionShrinksWeightsAndKeepsNoiseRaw) {
  TempDir dir;
  const auto storage = StorageDirectory::open_or_create(dir.path());
  StoreWriteOptions options;
  options.compression_level = 5;
  options.chunk_size = 4096;
  (void)testing::write_test_model(storage, "m", testing::sample_model(), options);
  const StoreReader reader = StoreReader::open(storage, "m");
  const Manifest& manifest = reader.manifest();
  const TensorRecord& weights = manifest.tensors[*reader.find_tensor("layers.1.w")];
  const TensorRecord& noise = manifest.tensors[*reader.find_tensor("layers.1.noise")];
  for (const ChunkRecord& chunk : manifest.chunks_of(weights)) {
    if (chunk.raw_size < 4096) {
      EXPECT_EQ(chunk.codec, Codec::kRaw);  // a 6-byte tail cannot shrink
      continue;
    }
    EXPECT_EQ(chunk.codec, Codec::kZstd);
    EXPECT_EQ(chunk.shuffle, 2u);
    EXPECT_LT(chunk.stored_size, chunk.raw_size);
  }
  for (const ChunkRecord& chunk : manifest.chunks_of(noise)) EXPECT_EQ(chunk.codec, Codec::kRaw);
  EXPECT_FALSE(manifest.blocks[2].all_raw);
}

TEST(StoreWriter, FingerprintIgnoresChunkingAndCompression) {
  TempDir dir;
  const auto storage = StorageDirectory::open_or_create(dir.path());
  const auto blocks = testing::sample_model();
  StoreWriteOptions a;
  StoreWriteOptions b;
  b.chunk_size = 8192;
  b.compression_level = 1;
  const auto first = testing::write_test_model(storage, "", blocks, a);
  const auto second = testing::write_test_model(storage, "other", blocks, b);
  EXPECT_EQ(first.fingerprint, second.fingerprint);
  EXPECT_EQ(first.model_id, "fp-" + first.fingerprint);
  // Same content, content-addressed id: the second write finds the first.
  EXPECT_EQ(testing::write_test_model(storage, "", blocks, a).outcome, PublishOutcome::kAlreadyExisted);

  auto changed = blocks;
  changed[1].tensors[0].bytes[5] ^= std::byte{1};
  EXPECT_NE(testing::write_test_model(storage, "", changed, a).fingerprint, first.fingerprint);
  EXPECT_TRUE(fs::is_empty(storage.tmp_dir()));
}

TEST(StoreWriter, BadInputIsAConfigErrorAndLeavesNothingBehind) {
  TempDir dir;
  const auto storage = StorageDirectory::open_or_create(dir.path());
  const auto bytes = testing::random_bytes(16, 1);
  const std::vector<int64_t> shape4 = {4};
  auto expect_field = [](const std::function<void()>& action, const std::string& field) {
    try {
      action();
      ADD_FAILURE() << "no ConfigError for " << field;
    } catch (const ConfigError& error) {
      EXPECT_EQ(error.field(), field);
    }
  };
  StoreWriteOptions bad_chunk;
  bad_chunk.chunk_size = 1000;
  expect_field([&] { StoreWriter(storage, "m", bad_chunk); }, "chunk_size");
  StoreWriteOptions bad_level;
  bad_level.compression_level = 10;
  expect_field([&] { StoreWriter(storage, "m", bad_level); }, "compression_level");
  expect_field([&] { StoreWriter(storage, "../m", {}); }, "model_id");
  expect_field([&] {
    StoreWriter w(storage, "m", {});
    w.add_tensor("t", Dtype::kFloat32, shape4, bytes);
  }, "block");
  expect_field([&] {
    StoreWriter w(storage, "m", {});
    w.begin_block("b");
    w.add_tensor("t", Dtype::kFloat32, shape4, bytes);
    w.add_tensor("t", Dtype::kFloat32, shape4, bytes);
  }, "tensor name");
  expect_field([&] {
    StoreWriter w(storage, "m", {});
    w.begin_block("b");
    w.add_tensor("t", Dtype::kFloat64, shape4, bytes);  // needs 32 bytes
  }, "bytes");
  expect_field([&] {
    StoreWriter w(storage, "m", {});
    w.begin_block("b");
    const std::vector<int64_t> negative = {-1};
    w.add_tensor("t", Dtype::kFloat32, negative, {});
  }, "shape");
  expect_field([&] {
    StoreWriter w(storage, "m", {});
    w.begin_block("b");
    (void)w.commit();
  }, "block");
  expect_field([&] {
    StoreWriter w(storage, "m", {});
    w.begin_block("b");
    w.add_tensor("t", Dtype::kFloat32, shape4, bytes);
    w.begin_block("b");
  }, "block name");
  // An abandoned writer removes its temp directory, and no model appears.
  EXPECT_TRUE(fs::is_empty(storage.tmp_dir()));
  EXPECT_FALSE(storage.has_model("m"));
}

TEST(StoreWriter, AFailedWriterRefusesFurtherCalls) {
  TempDir dir;
  const auto storage = StorageDirectory::open_or_create(dir.path());
  StoreWriter writer(storage, "m", {});
  EXPECT_FALSE(fs::is_empty(storage.tmp_dir()));
  EXPECT_THROW(writer.add_tensor("t", Dtype::kUint8, {}, {}), ConfigError);
  EXPECT_TRUE(fs::is_empty(storage.tmp_dir()));  // removed at the failure, not when the writer is destroyed
  EXPECT_THROW(writer.begin_block("late"), Error);  // valid on a fresh writer, refused after a failure
  EXPECT_THROW((void)writer.commit(), Error);
}

}  // namespace
}  // namespace tensorstream
