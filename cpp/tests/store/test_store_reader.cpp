#include "tensorstream/store/store_reader.hpp"

#include <unistd.h>

#include <gtest/gtest.h>

#include <thread>

#include "support/store_fixture.hpp"
#include "support/temp_dir.hpp"
#include "tensorstream/error.hpp"

namespace tensorstream {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

class StoreReaderTest : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    storage_ = std::make_unique<StorageDirectory>(StorageDirectory::open_or_create(dir_.path()));
    blocks_ = testing::sample_model();
    StoreWriteOptions options;
    options.chunk_size = 4096;
    options.compression_level = GetParam();
    (void)testing::write_test_model(*storage_, "m", blocks_, options);
  }
  TempDir dir_;
  std::unique_ptr<StorageDirectory> storage_;
  std::vector<testing::TestBlock> blocks_;
};

TEST_P(StoreReaderTest, TensorsAndBlocksRoundTrip) {
  const StoreReader reader = StoreReader::open(*storage_, "m");
  for (size_t b = 0; b < blocks_.size(); ++b) {
    const BlockRecord& block = reader.manifest().blocks[b];
    std::vector<std::byte> slot(block.slot_size, std::byte{0xAA});
    reader.read_block(b, slot);
    for (const testing::TestTensor& expected : blocks_[b].tensors) {
      const size_t index = *reader.find_tensor(expected.name);
      const TensorRecord& tensor = reader.manifest().tensors[index];
      EXPECT_EQ(tensor.shape, expected.shape);
      EXPECT_EQ(tensor.dtype, expected.dtype);
      std::vector<std::byte> out(tensor.nbytes);
      reader.read_tensor(index, out);
      EXPECT_EQ(out, expected.bytes) << expected.name;
      EXPECT_TRUE(std::equal(expected.bytes.begin(), expected.bytes.end(), slot.begin() + tensor.slot_offset))
          << expected.name << " in block slot";
    }
  }
  EXPECT_FALSE(reader.find_tensor("nope"));
  EXPECT_EQ(reader.find_block("layers.1"), 2u);
}

TEST_P(StoreReaderTest, FlippedByteIsACorruptionErrorNamingTheChunk) {
  const std::string data = (storage_->model_dir("m") / "data").string();
  StoreReader reader = StoreReader::open(*storage_, "m");
  const size_t index = *reader.find_tensor("layers.1.noise");
  const TensorRecord tensor = reader.manifest().tensors[index];
  const ChunkRecord chunk = reader.manifest().chunks[tensor.first_chunk + 1];
  testing::flip_bit(data, chunk.offset + 100, 3);
  std::vector<std::byte> out(tensor.nbytes);
  try {
    reader.read_tensor(index, out);
    FAIL() << "expected CorruptionError";
  } catch (const CorruptionError& error) {
    EXPECT_EQ(error.site().model, "m");
    EXPECT_EQ(error.site().tensor, "layers.1.noise");
    EXPECT_EQ(error.site().chunk, 1u);
    EXPECT_EQ(error.site().offset, chunk.offset);
  }
  const BlockRecord& block = reader.manifest().blocks[2];
  std::vector<std::byte> slot(block.slot_size);
  EXPECT_THROW(reader.read_block(2, slot), CorruptionError);
  // The other tensors of the model still read.
  std::vector<std::byte> other(reader.manifest().tensors[0].nbytes);
  EXPECT_NO_THROW(reader.read_tensor(0, other));
}

TEST_P(StoreReaderTest, ReadsFromManyThreadsAgree) {
  const StoreReader reader = StoreReader::open(*storage_, "m");
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int round = 0; round < 20; ++round) {
        for (const auto& block : blocks_) {
          for (const auto& expected : block.tensors) {
            std::vector<std::byte> out(expected.bytes.size());
            reader.read_tensor(*reader.find_tensor(expected.name), out);
            if (out != expected.bytes) mismatches++;
          }
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(mismatches.load(), 0);
}

// embed.weight is 64 rows of 160 bytes in 4096-byte chunks (4096, 4096, 2048): rows 25 and 51 straddle chunks.
TEST_P(StoreReaderTest, ReadRowsCopiesRowsAcrossChunksAndChecksThem) {
  const std::string data = (storage_->model_dir("m") / "data").string();
  const StoreReader reader = StoreReader::open(*storage_, "m");
  const size_t index = *reader.find_tensor("embed.weight");
  const TensorRecord tensor = reader.manifest().tensors[index];
  ASSERT_EQ(tensor.chunk_count, 3u);
  const uint64_t row_bytes = 80 * 2;
  const std::vector<std::byte>& expected = blocks_[0].tensors[0].bytes;
  const auto check = [&](std::vector<int64_t> rows, bool verify) {
    std::vector<std::byte> out(rows.size() * row_bytes, std::byte{0xAA});
    const uint64_t read = reader.read_rows(index, row_bytes, rows, out, verify);
    EXPECT_EQ(read > 0, !rows.empty());
    for (size_t k = 0; k < rows.size(); ++k) {
      EXPECT_TRUE(std::equal(out.begin() + k * row_bytes, out.begin() + (k + 1) * row_bytes,
                             expected.begin() + rows[k] * row_bytes))
          << "row " << rows[k] << (verify ? " verified" : " unverified");
    }
    return read;
  };
  for (const bool verify : {true, false}) {
    (void)check({0}, verify);
    (void)check({63}, verify);
    (void)check({0, 25, 26, 51, 63}, verify);
    (void)check({24, 25, 26, 27, 50, 51, 52}, verify);
  }
  uint64_t whole = 0;
  for (const ChunkRecord& chunk : reader.manifest().chunks_of(tensor)) whole += chunk.stored_size;
  const ChunkRecord& first = reader.manifest().chunks[tensor.first_chunk];
  EXPECT_EQ(check({1, 2}, true), first.stored_size);  // only the chunk that holds the rows
  EXPECT_EQ(check({25}, true), first.stored_size + reader.manifest().chunks[tensor.first_chunk + 1].stored_size);
  std::vector<int64_t> all(64);
  for (int64_t r = 0; r < 64; ++r) all[r] = r;
  EXPECT_EQ(check(all, true), whole);  // each chunk read once
  EXPECT_EQ(check({}, true), 0u);

  std::vector<std::byte> one(row_bytes);
  const std::vector<int64_t> bad_rows[] = {{64}, {-1}, {3, 3}, {5, 4}};
  for (const auto& rows : bad_rows) {
    std::vector<std::byte> out(rows.size() * row_bytes);
    EXPECT_THROW((void)reader.read_rows(index, row_bytes, rows, out, true), ConfigError);
  }
  const std::vector<int64_t> row0{0};
  EXPECT_THROW((void)reader.read_rows(index, 150, row0, one, true), ConfigError);     // does not divide the tensor
  EXPECT_THROW((void)reader.read_rows(index, 0, row0, one, true), ConfigError);
  EXPECT_THROW((void)reader.read_rows(index, row_bytes, row0, std::span(one).first(10), true), ConfigError);
  EXPECT_THROW((void)reader.read_rows(9999, row_bytes, row0, one, true), ConfigError);

  // A bad middle chunk: rows that need it fail naming tensor and chunk; rows of the other chunks still read.
  const ChunkRecord middle = reader.manifest().chunks[tensor.first_chunk + 1];
  testing::flip_bit(data, middle.offset + 7, 2);
  const std::vector<int64_t> straddling{25};
  std::vector<std::byte> out(row_bytes);
  try {
    (void)reader.read_rows(index, row_bytes, straddling, out, true);
    FAIL() << "expected CorruptionError";
  } catch (const CorruptionError& error) {
    EXPECT_EQ(error.site().tensor, "embed.weight");
    EXPECT_EQ(error.site().chunk, 1u);
    EXPECT_EQ(error.site().offset, middle.offset);
  }
  (void)check({0, 24, 52, 63}, true);
}

INSTANTIATE_TEST_SUITE_P(Levels, StoreReaderTest, ::testing::Values(0, 1, 3, 5, 9));

// A table of 1000 rows of 1536 bytes (a MiniLM row) with chunks of 40 rows (61440 bytes, what torch/rows.py picks)
// in a model of 4 MiB chunks: a read of three rows reads, verifies and decodes three small chunks, not the table.
TEST(StoreReader, RowsOfATableWithItsOwnChunkSizeReadOnlyTheirChunks) {
  constexpr uint64_t kRowBytes = 1536;
  constexpr uint64_t kRowsPerChunk = 40;
  for (const int level : {0, 5}) {
    SCOPED_TRACE("level " + std::to_string(level));
    TempDir dir;
    const auto storage = StorageDirectory::open_or_create(dir.path());
    testing::TestTensor table{"table", Dtype::kFloat32, {1000, 384}, testing::normal_bf16_bytes(1000 * 768, 3),
                              kRowBytes * kRowsPerChunk};
    StoreWriteOptions options;
    options.compression_level = level;
    (void)testing::write_test_model(storage, "m", {{"embed", {table}}}, options);
    const StoreReader reader = StoreReader::open(storage, "m");
    const TensorRecord& record = reader.manifest().tensors[0];
    ASSERT_EQ(record.chunk_count, 25u);
    const std::vector<int64_t> rows{3, 500, 999};  // chunks 0, 12 and 24
    std::vector<std::byte> out(rows.size() * kRowBytes);
    const uint64_t read = reader.read_rows(0, kRowBytes, rows, out, /*verify_checksums=*/true);
    const auto stored = [&](size_t c) { return reader.manifest().chunks[record.first_chunk + c].stored_size; };
    EXPECT_EQ(read, stored(0) + stored(12) + stored(24));
    EXPECT_LE(read, 3 * kRowBytes * kRowsPerChunk);
    for (size_t k = 0; k < rows.size(); ++k) {
      EXPECT_TRUE(std::equal(out.begin() + k * kRowBytes, out.begin() + (k + 1) * kRowBytes,
                             table.bytes.begin() + rows[k] * kRowBytes))
          << "row " << rows[k];
    }
  }
}

TEST(StoreReader, MissingModelIsENOENTNamingIt) {
  TempDir dir;
  const auto storage = StorageDirectory::open_or_create(dir.path());
  try {
    (void)StoreReader::open(storage, "ghost");
    FAIL() << "expected IoError";
  } catch (const IoError& error) {
    EXPECT_EQ(error.errno_value(), ENOENT);
    EXPECT_NE(std::string(error.what()).find("ghost"), std::string::npos);
  }
}

TEST(StoreReader, TruncatedOrExtendedDataFileIsRefusedAtOpen) {
  TempDir dir;
  const auto storage = StorageDirectory::open_or_create(dir.path());
  (void)testing::write_test_model(storage, "m", testing::sample_model());
  const fs::path data = storage.model_dir("m") / "data";
  const auto size = fs::file_size(data);
  for (const auto new_size : {size - 1, size + 1}) {
    fs::resize_file(data, new_size);
    try {
      (void)StoreReader::open(storage, "m");
      ADD_FAILURE() << "expected FormatError at size " << new_size;
    } catch (const FormatError& error) {
      EXPECT_EQ(error.rule(), "data.size");
      EXPECT_EQ(error.path(), data.string());  // names the file that is wrong, not the manifest
    }
  }
}

TEST(StoreReader, ModelMovedToAnotherStoreIsRefused) {
  TempDir a;
  TempDir b;
  const auto first = StorageDirectory::open_or_create(a.path());
  const auto second = StorageDirectory::open_or_create(b.path());
  (void)testing::write_test_model(first, "m", testing::sample_model());
  fs::rename(first.model_dir("m"), second.models_dir() / "m");
  try {
    (void)StoreReader::open(second, "m");
    FAIL() << "expected FormatError";
  } catch (const FormatError& error) {
    EXPECT_EQ(error.rule(), "manifest.store_id");
  }
}

TEST(StoreReader, WrongBufferSizesAreConfigErrors) {
  TempDir dir;
  const auto storage = StorageDirectory::open_or_create(dir.path());
  (void)testing::write_test_model(storage, "m", testing::sample_model());
  const StoreReader reader = StoreReader::open(storage, "m");
  std::vector<std::byte> small(1);
  EXPECT_THROW(reader.read_tensor(0, small), ConfigError);
  EXPECT_THROW(reader.read_block(0, small), ConfigError);
  EXPECT_THROW(reader.read_tensor(9999, small), ConfigError);
}

}  // namespace
}  // namespace tensorstream
