#include "engine/load_plan.hpp"

#include <gtest/gtest.h>

#include <numeric>

#include "support/store_fixture.hpp"
#include "support/temp_dir.hpp"
#include "tensorstream/error.hpp"
#include "tensorstream/io/direct_io.hpp"
#include "tensorstream/store/storage_directory.hpp"
#include "tensorstream/store/store_reader.hpp"

namespace tensorstream::detail {
namespace {

using testing::TestBlock;

// Block 0: raw (incompressible bytes, several chunks); block 1: bf16 weights, compressed; block 2: empty tensor only.
std::vector<TestBlock> blocks() {
  return {
      {"raw", {{"raw.a", Dtype::kUint8, {10000}, testing::random_bytes(10000, 1)},
               {"raw.b", Dtype::kUint8, {300}, testing::random_bytes(300, 2)}}},
      {"packed", {{"packed.w", Dtype::kBfloat16, {9000}, testing::normal_bf16_bytes(9000, 3)}}},
      {"empty", {{"empty.e", Dtype::kFloat32, {0}, {}}}},
  };
}

class LoadPlanTest : public ::testing::Test {
 protected:
  void SetUp() override {
    storage_ = std::make_unique<StorageDirectory>(StorageDirectory::open_or_create(dir_.path()));
    StoreWriteOptions options;
    options.chunk_size = 4096;
    options.compression_level = 5;
    (void)testing::write_test_model(*storage_, "m", blocks(), options);
    store_ = std::make_unique<StoreReader>(StoreReader::open(*storage_, "m"));
  }
  const Manifest& manifest() const { return store_->manifest(); }

  testing::TempDir dir_;
  std::unique_ptr<StorageDirectory> storage_;
  std::unique_ptr<StoreReader> store_;
};

uint64_t chunks_of(const Manifest& manifest, size_t block) {
  uint64_t count = 0;
  for (const TensorRecord& tensor : manifest.tensors_of(manifest.blocks[block])) count += tensor.chunk_count;
  return count;
}

TEST_F(LoadPlanTest, HostRawBlockIsReadAsARegionStraightIntoTheSlot) {
  ASSERT_TRUE(manifest().blocks[0].all_raw);
  LoadPlanInputs inputs;
  inputs.direct = true;
  const LoadPlan plan = plan_load(manifest(), 0, inputs);
  ASSERT_EQ(plan.kind, LoadPlan::Kind::kRegion);
  const BlockRecord& record = manifest().blocks[0];
  const uint64_t length = align_up(record.end - record.offset, 4096);
  uint64_t covered = 0;
  for (const PlannedRead& read : plan.reads) {
    EXPECT_FALSE(read.staged);
    EXPECT_TRUE(read.direct);
    EXPECT_EQ(read.file_offset, record.offset + covered);  // contiguous, in order
    EXPECT_EQ(read.slot_offset, covered);
    EXPECT_EQ(read.file_offset % 4096, 0u);
    EXPECT_EQ(read.length % 4096, 0u);
    covered += read.length;
  }
  EXPECT_EQ(covered, length);
  ASSERT_EQ(plan.in_place.size(), chunks_of(manifest(), 0));
  // Every chunk is covered by exactly the reads that say so.
  for (size_t k = 0; k < plan.in_place.size(); ++k) {
    uint32_t covering = 0;
    for (const PlannedRead& read : plan.reads) covering += (k >= read.first_chunk && k < read.last_chunk) ? 1 : 0;
    EXPECT_EQ(covering, plan.reads_per_chunk[k]) << k;
    EXPECT_GE(covering, 1u);
  }
  EXPECT_EQ(plan.max_staged_bytes, 0u);
}

TEST_F(LoadPlanTest, UnalignedArenaKeepsRegionReadsBuffered) {
  LoadPlanInputs inputs;
  inputs.direct = true;
  inputs.slots_aligned = false;
  const LoadPlan plan = plan_load(manifest(), 0, inputs);
  for (const PlannedRead& read : plan.reads) EXPECT_FALSE(read.direct);
}

TEST_F(LoadPlanTest, MappedBlockHasNoReadsOnlyChunksToVerify) {
  LoadPlanInputs inputs;
  inputs.map = true;
  const LoadPlan plan = plan_load(manifest(), 0, inputs);
  EXPECT_EQ(plan.kind, LoadPlan::Kind::kMapped);
  EXPECT_TRUE(plan.reads.empty());
  EXPECT_EQ(plan.in_place.size(), chunks_of(manifest(), 0));
  // A compressed block cannot be a view of the file.
  EXPECT_EQ(plan_load(manifest(), 1, inputs).kind, LoadPlan::Kind::kChunks);
}

TEST_F(LoadPlanTest, CompressedChunksAreStagedAndDirectReadsRoundOutTo4KiB) {
  ASSERT_FALSE(manifest().blocks[1].all_raw);
  for (const bool direct : {false, true}) {
    LoadPlanInputs inputs;
    inputs.direct = direct;
    const LoadPlan plan = plan_load(manifest(), 1, inputs);
    ASSERT_EQ(plan.kind, LoadPlan::Kind::kChunks);
    ASSERT_EQ(plan.reads.size(), chunks_of(manifest(), 1));
    for (const PlannedRead& read : plan.reads) {
      const ChunkRecord& chunk = manifest().chunks[manifest().tensors[read.tensor].first_chunk + read.chunk];
      EXPECT_EQ(read.staged, chunk.codec != Codec::kRaw);
      if (!read.staged) continue;
      EXPECT_EQ(read.direct, direct);
      // The chunk's stored bytes lie at `skip` inside the read, whole.
      EXPECT_EQ(read.file_offset + read.skip, chunk.offset);
      EXPECT_GE(read.length, read.skip + chunk.stored_size);
      if (direct) {
        EXPECT_EQ(read.file_offset % 4096, 0u);
        EXPECT_EQ(read.length % 4096, 0u);
        EXPECT_LE(read.file_offset + read.length, manifest().data_size);  // never past the (aligned) file end
      } else {
        EXPECT_EQ(read.skip, 0u);
        EXPECT_EQ(read.length, chunk.stored_size);
      }
      EXPECT_LE(read.length, staging_bytes_for(manifest().chunk_size));
      EXPECT_LE(read.length, plan.max_staged_bytes);
    }
  }
}

TEST_F(LoadPlanTest, DeviceSlotsStageEveryChunk) {
  for (const size_t block : {size_t{0}, size_t{1}}) {
    LoadPlanInputs inputs;
    inputs.access = SlotAccess::kDeviceByCopy;
    inputs.map = true;  // ignored: a device slot is never a view of the file
    inputs.direct = true;
    const LoadPlan plan = plan_load(manifest(), block, inputs);
    ASSERT_EQ(plan.kind, LoadPlan::Kind::kChunks) << block;
    EXPECT_EQ(plan.reads.size(), chunks_of(manifest(), block));
    for (const PlannedRead& read : plan.reads) {
      EXPECT_TRUE(read.staged);
      EXPECT_TRUE(read.direct) << "staging is aligned, so O_DIRECT stays on for device slots";
    }
  }
}

TEST_F(LoadPlanTest, DeviceDirectReadsRawRegionsIntoTheSlotOnlyWhenNothingIsVerifiedOnTheCpu) {
  LoadPlanInputs inputs;
  inputs.access = SlotAccess::kDeviceDirect;
  inputs.verify = false;
  EXPECT_EQ(plan_load(manifest(), 0, inputs).kind, LoadPlan::Kind::kRegion);
  EXPECT_EQ(plan_load(manifest(), 1, inputs).kind, LoadPlan::Kind::kChunks);  // compressed: decoded on the CPU
  inputs.verify = true;
  const LoadPlan verified = plan_load(manifest(), 0, inputs);
  ASSERT_EQ(verified.kind, LoadPlan::Kind::kChunks);
  for (const PlannedRead& read : verified.reads) EXPECT_TRUE(read.staged);
}

TEST_F(LoadPlanTest, EmptyBlockNeedsNoReads) {
  const LoadPlan plan = plan_load(manifest(), 2, LoadPlanInputs{});
  EXPECT_EQ(plan.kind, LoadPlan::Kind::kEmpty);
  EXPECT_TRUE(plan.reads.empty());
  EXPECT_EQ(plan.stored_bytes, 0u);
}

TEST_F(LoadPlanTest, StoredBytesAreTheBlocksRegion) {
  for (size_t b = 0; b < manifest().blocks.size(); ++b) {
    const BlockRecord& record = manifest().blocks[b];
    EXPECT_EQ(plan_load(manifest(), b, LoadPlanInputs{}).stored_bytes, record.end - record.offset) << b;
  }
}

TEST_F(LoadPlanTest, AChunkLargerThanTheChunkSizeIsRefusedNotStaged) {
  Manifest broken = manifest();
  broken.chunks[manifest().tensors[manifest().blocks[1].first_tensor].first_chunk].stored_size =
      manifest().chunk_size + 1;
  EXPECT_THROW((void)plan_load(broken, 1, LoadPlanInputs{}), FormatError);
}

}  // namespace
}  // namespace tensorstream::detail
