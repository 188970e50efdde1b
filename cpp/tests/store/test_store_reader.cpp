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

INSTANTIATE_TEST_SUITE_P(Levels, StoreReaderTest, ::testing::Values(0, 1, 3, 5, 9));

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
