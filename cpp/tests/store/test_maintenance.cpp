#include "tensorstream/store/maintenance.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "support/store_fixture.hpp"
#include "support/temp_dir.hpp"
#include "tensorstream/error.hpp"
#include "tensorstream/store/store_reader.hpp"

namespace tensorstream {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

class MaintenanceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    storage_ = std::make_unique<StorageDirectory>(StorageDirectory::open_or_create(dir_.path()));
    StoreWriteOptions options;
    options.chunk_size = 4096;
    (void)testing::write_test_model(*storage_, "raw", testing::sample_model(1), options);
    options.compression_level = 5;
    (void)testing::write_test_model(*storage_, "zstd", testing::sample_model(2), options);
  }
  fs::path data(const std::string& model) const { return storage_->model_dir(model) / "data"; }
  TempDir dir_;
  std::unique_ptr<StorageDirectory> storage_;
};

TEST_F(MaintenanceTest, VerifyPassesAGoodStore) {
  const VerifyReport report = verify_storage(dir_.path());
  EXPECT_TRUE(report.ok);
  ASSERT_EQ(report.models.size(), 2u);
  for (const auto& model : report.models) {
    EXPECT_TRUE(model.ok) << model.model << ": " << model.error;
    EXPECT_GT(model.chunks_checked, 0u);
  }
  EXPECT_TRUE(report.orphans.empty());
}

TEST_F(MaintenanceTest, VerifyNamesEveryBadChunk) {
  const StoreReader reader = StoreReader::open(*storage_, "zstd");
  const Manifest& manifest = reader.manifest();
  const TensorRecord& tensor = manifest.tensors[*reader.find_tensor("layers.1.w")];
  const ChunkRecord& chunk = manifest.chunks[tensor.first_chunk + 1];
  testing::flip_bit(data("zstd"), chunk.offset + chunk.stored_size / 2, 5);
  const VerifyReport report = verify_storage(dir_.path());
  EXPECT_FALSE(report.ok);
  for (const auto& model : report.models) {
    if (model.model == "raw") {
      EXPECT_TRUE(model.ok);
      continue;
    }
    EXPECT_FALSE(model.ok);
    ASSERT_EQ(model.bad_chunks.size(), 1u);
    EXPECT_EQ(model.bad_chunks[0].tensor, "layers.1.w");
    EXPECT_EQ(model.bad_chunks[0].chunk, 1u);
    EXPECT_EQ(model.bad_chunks[0].offset, chunk.offset);
  }
  EXPECT_FALSE(verify_storage(dir_.path(), "zstd").ok);
  EXPECT_TRUE(verify_storage(dir_.path(), "raw").ok);
}

TEST_F(MaintenanceTest, VerifyChecksPadding) {
  const StoreReader reader = StoreReader::open(*storage_, "raw");
  const Manifest& manifest = reader.manifest();
  const BlockRecord& first = manifest.blocks[0];
  ASSERT_LT(first.end, manifest.blocks[1].offset);  // there is padding to corrupt
  testing::flip_bit(data("raw"), first.end, 0);
  const VerifyReport report = verify_storage(dir_.path(), "raw");
  EXPECT_FALSE(report.ok);
  EXPECT_NE(report.models[0].error.find("data.padding"), std::string::npos) << report.models[0].error;
}

TEST_F(MaintenanceTest, VerifyReportsUnreadableModelsWithoutThrowing) {
  fs::resize_file(data("raw"), 10);
  const VerifyReport report = verify_storage(dir_.path());
  EXPECT_FALSE(report.ok);
  bool found = false;
  for (const auto& model : report.models) {
    if (model.model == "raw") {
      found = true;
      EXPECT_NE(model.error.find("data.size"), std::string::npos) << model.error;
    }
  }
  EXPECT_TRUE(found);
}

TEST_F(MaintenanceTest, CleanupRemovesOrphansOnly) {
  // A dead writer's temp dir, a stray file in a model, a model dir without manifest, and a live writer.
  fs::create_directories(storage_->tmp_dir() / "raw.1.dead");
  testing::write_file_bytes(storage_->tmp_dir() / "raw.1.dead" / "data", testing::random_bytes(5000, 1));
  testing::write_file_bytes(storage_->model_dir("raw") / "data.old", testing::random_bytes(100, 2));
  fs::create_directories(storage_->model_dir("half"));
  TempModelDir live = storage_->make_temp_dir("zstd");

  const CleanupReport preview = cleanup_orphans(dir_.path(), /*dry_run=*/true);
  EXPECT_EQ(preview.removed.size(), 3u);
  EXPECT_TRUE(fs::exists(storage_->tmp_dir() / "raw.1.dead"));

  const CleanupReport report = cleanup_orphans(dir_.path());
  EXPECT_EQ(report.removed.size(), 3u);
  EXPECT_GE(report.bytes_freed, 5100u);
  ASSERT_EQ(report.kept_in_use.size(), 1u);
  EXPECT_EQ(report.kept_in_use[0], live.path().string());
  EXPECT_FALSE(fs::exists(storage_->tmp_dir() / "raw.1.dead"));
  EXPECT_FALSE(fs::exists(storage_->model_dir("raw") / "data.old"));
  EXPECT_FALSE(fs::exists(storage_->model_dir("half")));
  EXPECT_TRUE(fs::exists(live.path()));
  EXPECT_TRUE(verify_storage(dir_.path()).ok);
}

TEST_F(MaintenanceTest, DefragRewritesInExecutionOrder) {
  const DefragReport untouched = defragment(dir_.path(), "raw");
  ASSERT_EQ(untouched.models.size(), 1u);
  EXPECT_FALSE(untouched.models[0].rewritten) << untouched.models[0].reason;

  const std::string fingerprint = StoreReader::open(*storage_, "zstd").manifest().fingerprint;
  write_execution_order(dir_.path(), "zstd", {"layers.1", "embed", "layers.0"});
  ASSERT_TRUE(read_execution_order(dir_.path(), "zstd"));
  const DefragReport report = defragment(dir_.path());
  for (const auto& model : report.models) EXPECT_EQ(model.rewritten, model.model == "zstd") << model.reason;

  const StoreReader reader = StoreReader::open(*storage_, "zstd");
  EXPECT_EQ(reader.manifest().blocks[0].name, "layers.1");
  EXPECT_EQ(reader.manifest().blocks[1].name, "embed");
  EXPECT_EQ(reader.manifest().fingerprint, fingerprint);
  for (const auto& block : testing::sample_model(2)) {
    for (const auto& expected : block.tensors) {
      std::vector<std::byte> out(expected.bytes.size());
      reader.read_tensor(*reader.find_tensor(expected.name), out);
      EXPECT_EQ(out, expected.bytes) << expected.name;
    }
  }
  EXPECT_TRUE(verify_storage(dir_.path()).ok);
  EXPECT_TRUE(fs::is_empty(storage_->tmp_dir()));
  EXPECT_FALSE(defragment(dir_.path(), "zstd").models[0].rewritten);  // already in order now
}

// A tensor's own chunk size survives verification and a rewrite.
TEST_F(MaintenanceTest, TensorsKeepTheirOwnChunkSizeThroughVerifyAndDefrag) {
  auto blocks = testing::sample_model(3);
  blocks[0].tensors[0].chunk_size = 4096;  // embed.weight: 10240 bytes in a model of 16 KiB chunks
  StoreWriteOptions options;
  options.chunk_size = 16384;
  options.compression_level = 5;
  (void)testing::write_test_model(*storage_, "own", blocks, options);
  EXPECT_TRUE(verify_storage(dir_.path(), std::string("own")).ok);
  write_execution_order(dir_.path(), "own", {"layers.1", "layers.0", "embed"});
  ASSERT_TRUE(defragment(dir_.path(), "own").models[0].rewritten);
  const StoreReader reader = StoreReader::open(*storage_, "own");
  const TensorRecord& table = reader.manifest().tensors[*reader.find_tensor("embed.weight")];
  EXPECT_EQ(table.chunk_size, 4096u);
  EXPECT_EQ(table.chunk_count, 3u);
  std::vector<std::byte> out(table.nbytes);
  reader.read_tensor(*reader.find_tensor("embed.weight"), out);
  EXPECT_EQ(out, blocks[0].tensors[0].bytes);
  EXPECT_TRUE(verify_storage(dir_.path(), std::string("own")).ok);
}

TEST_F(MaintenanceTest, DefragNeverLaundersCorruptData) {
  write_execution_order(dir_.path(), "raw", {"layers.1", "layers.0", "embed"});
  const StoreReader reader = StoreReader::open(*storage_, "raw");
  testing::flip_bit(data("raw"), reader.manifest().chunks[0].offset + 1, 1);
  const DefragReport report = defragment(dir_.path(), "raw");
  EXPECT_FALSE(report.models[0].rewritten);
  EXPECT_NE(report.models[0].reason.find("corrupt"), std::string::npos) << report.models[0].reason;
  EXPECT_TRUE(fs::is_empty(storage_->tmp_dir()));
}

TEST_F(MaintenanceTest, MalformedExecutionOrderIsIgnored) {
  testing::write_file_bytes(storage_->model_dir("raw") / "execution_order",
                            std::as_bytes(std::span("embed\nembed\n", 12)));
  EXPECT_FALSE(read_execution_order(dir_.path(), "raw"));
  testing::write_file_bytes(storage_->model_dir("raw") / "execution_order", std::as_bytes(std::span("embed", 5)));
  EXPECT_FALSE(read_execution_order(dir_.path(), "raw"));
  EXPECT_FALSE(defragment(dir_.path(), "raw").models[0].rewritten);
}

TEST_F(MaintenanceTest, ExecutionOrderNamesBlocksOfTheModelOnly) {
  EXPECT_THROW(write_execution_order(dir_.path(), "raw", {"embed", "nope"}), ConfigError);
  EXPECT_THROW(write_execution_order(dir_.path(), "raw", {"embed", "embed"}), ConfigError);
  EXPECT_THROW((void)read_execution_order(dir_.path(), "../raw"), ConfigError);
  EXPECT_FALSE(read_execution_order(dir_.path(), "raw"));
}

TEST(Maintenance, MissingStorageIsAnIoError) {
  TempDir dir;
  EXPECT_THROW((void)verify_storage(dir.path() / "none"), IoError);
  EXPECT_THROW((void)cleanup_orphans(dir.path() / "none"), IoError);
  EXPECT_THROW((void)defragment(dir.path() / "none"), IoError);
}

}  // namespace
}  // namespace tensorstream
