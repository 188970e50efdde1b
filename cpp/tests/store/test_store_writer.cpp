#include "tensorstream/store/store_writer.hpp"

#include <gtest/gtest.h>
#include <sys/resource.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <optional>

#include "store/store_writer_testing.hpp"
#include "support/store_fixture.hpp"
#include "support/temp_dir.hpp"
#include "tensorstream/error.hpp"
#include "tensorstream/store/store_reader.hpp"

namespace tensorstream {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

constexpr uint64_t kKiB = 1024;

// Installs StoreWriter test hooks for the writers one test constructs, and removes them when it ends.
class ScopedHooks {
 public:
  explicit ScopedHooks(detail::StoreWriterHooks hooks) { detail::set_store_writer_hooks_for_testing(std::move(hooks)); }
  ~ScopedHooks() { detail::set_store_writer_hooks_for_testing({}); }
  ScopedHooks(const ScopedHooks&) = delete;
  ScopedHooks& operator=(const ScopedHooks&) = delete;
};

// What docs/format.md says a writer stores for `blocks`, built one chunk at a time without threads: the manifest
// file image and the data file. The writer's pipeline must produce exactly these bytes.
struct ReferenceStore {
  std::vector<std::byte> manifest;
  std::vector<std::byte> data;
};

ReferenceStore reference_store(const StoreId& store_id, const std::string& model_id,
                               const std::vector<testing::TestBlock>& blocks, const StoreWriteOptions& options) {
  const CompressionChoice choice = compression_for_level(options.compression_level);
  Manifest manifest;
  manifest.store_id = store_id;
  manifest.model_id = model_id;
  manifest.chunk_size = options.chunk_size;
  manifest.metadata = options.metadata;
  FingerprintBuilder fingerprint;
  ReferenceStore out;
  uint64_t cursor = 0;
  for (const testing::TestBlock& block : blocks) {
    cursor = align_up(cursor, kBlockAlignment);
    fingerprint.add_block(block.name);
    BlockRecord record;
    record.name = block.name;
    record.offset = cursor;
    record.first_tensor = manifest.tensors.size();
    record.tensor_count = block.tensors.size();
    manifest.blocks.push_back(record);
    for (const testing::TestTensor& tensor : block.tensors) {
      cursor = align_up(cursor, kTensorAlignment);
      fingerprint.add_tensor(tensor.name, dtype_name(tensor.dtype), tensor.shape);
      fingerprint.add_bytes(tensor.bytes);
      TensorRecord t;
      t.name = tensor.name;
      t.dtype = tensor.dtype;
      t.shape = tensor.shape;
      t.block = static_cast<uint32_t>(manifest.blocks.size() - 1);
      t.first_chunk = manifest.chunks.size();
      t.chunk_size = tensor.chunk_size;
      const uint64_t chunk_size = tensor.chunk_size != 0 ? tensor.chunk_size : options.chunk_size;
      const uint32_t shuffle = dtype_is_groupable_float(tensor.dtype) ? dtype_size(tensor.dtype) : 0;
      const std::span<const std::byte> bytes(tensor.bytes);
      for (uint64_t begin = 0, index = 0; begin < bytes.size(); begin += chunk_size, ++index) {
        const auto raw = bytes.subspan(begin, std::min<uint64_t>(chunk_size, bytes.size() - begin));
        std::vector<std::byte> compressed;
        std::vector<std::byte> scratch;
        const Codec codec = compress_chunk(raw, choice, shuffle, compressed, scratch);
        const bool shrunk = codec != Codec::kRaw;
        const std::span<const std::byte> stored = shrunk ? std::span<const std::byte>(compressed) : raw;
        ChunkRecord chunk;
        chunk.offset = cursor;
        chunk.stored_size = stored.size();
        chunk.codec = codec;
        chunk.shuffle = shrunk ? shuffle : 0;
        chunk.checksum = chunk_checksum({store_id, manifest.tensors.size(), index, cursor}, stored);
        out.data.resize(cursor + stored.size());
        std::copy(stored.begin(), stored.end(), out.data.begin() + static_cast<ptrdiff_t>(cursor));
        cursor += stored.size();
        manifest.chunks.push_back(chunk);
      }
      t.chunk_count = manifest.chunks.size() - t.first_chunk;
      manifest.tensors.push_back(t);
    }
  }
  manifest.data_size = cursor == 0 ? 0 : align_up(cursor, kBlockAlignment);
  out.data.resize(manifest.data_size);
  manifest.fingerprint = fingerprint.finish();
  compute_derived_fields(manifest);
  out.manifest = serialize_manifest(manifest);
  return out;
}

// The sample model and a block of tensors several batches long at 64 KiB chunks: compressible bf16 with a tail,
// incompressible bytes (stored raw, so the pipeline copies them), float32, zeros, and one-chunk tensors.
std::vector<testing::TestBlock> pipeline_model() {
  auto blocks = testing::sample_model(7);
  testing::TestBlock big{"big", {}};
  constexpr int64_t kWeights = 5 * 32 * 1024 + 9;  // 5 chunks of 64 KiB and an 18-byte tail
  constexpr int64_t kNoise = 3 * 64 * 1024 + 1;
  big.tensors.push_back({"big.w", Dtype::kBfloat16, {kWeights}, testing::normal_bf16_bytes(kWeights, 11)});
  big.tensors.push_back({"big.noise", Dtype::kUint8, {kNoise}, testing::random_bytes(kNoise, 12)});
  big.tensors.push_back({"big.one", Dtype::kBfloat16, {32 * 1024}, testing::normal_bf16_bytes(32 * 1024, 13)});
  std::vector<std::byte> floats = testing::normal_bf16_bytes(2 * 64 * 1024, 14);  // 256 KiB: 64 Ki float32
  big.tensors.push_back({"big.f32", Dtype::kFloat32, {64 * 1024}, std::move(floats)});
  big.tensors.push_back({"big.zeros", Dtype::kFloat16, {7 * 32 * 1024}, std::vector<std::byte>(7 * 64 * 1024)});
  blocks.push_back(std::move(big));
  blocks.push_back({"tail", {{"tail.w", Dtype::kBfloat16, {70000}, testing::normal_bf16_bytes(70000, 15)}}});
  return blocks;
}

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
    EXPECT_EQ(chunk.codec, Codec::kExponent);  // floats take the exponent codec below level 6
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
  for (const uint64_t own : {uint64_t{1}, uint64_t{2048}, uint64_t{6144}, kDefaultChunkSize + 4096}) {
    SCOPED_TRACE(own);
    expect_field([&] {
      StoreWriter w(storage, "m", {});
      w.begin_block("b");
      w.add_tensor("t", Dtype::kFloat32, shape4, bytes, own);  // not 4 KiB pages, or above the model's chunks
    }, "chunk_size");
  }
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

TEST(StoreWriter, PipelinedWritesGiveTheBytesOfAOneChunkAtATimeWriter) {
  TempDir dir;
  const auto storage = StorageDirectory::open_or_create(dir.path());
  const auto blocks = pipeline_model();
  for (const int level : {0, 1, 5}) {
    for (const uint64_t chunk_size : {4 * kKiB, 64 * kKiB}) {
      SCOPED_TRACE("level " + std::to_string(level) + ", chunk " + std::to_string(chunk_size));
      StoreWriteOptions options;
      options.compression_level = level;
      options.chunk_size = chunk_size;
      options.metadata = {{"k", "v"}};
      const std::string id = "m" + std::to_string(level) + "-" + std::to_string(chunk_size);
      (void)testing::write_test_model(storage, id, blocks, options);
      const ReferenceStore expected = reference_store(storage.id(), id, blocks, options);
      const fs::path model = storage.model_dir(id);
      EXPECT_TRUE(testing::read_file_bytes(model / "manifest") == expected.manifest);
      EXPECT_TRUE(testing::read_file_bytes(model / "data") == expected.data);
    }
  }
}

// Tensors with their own, smaller chunks among ones with the model's: the same bytes as the one-chunk-at-a-time
// writer, the manifest says each tensor's size, and every tensor reads back.
TEST(StoreWriter, TensorsWithTheirOwnChunkSize) {
  TempDir dir;
  const auto storage = StorageDirectory::open_or_create(dir.path());
  auto blocks = pipeline_model();
  for (testing::TestBlock& block : blocks) {
    for (testing::TestTensor& tensor : block.tensors) {
      if (tensor.name == "big.w" || tensor.name == "big.noise") tensor.chunk_size = 4 * kKiB;
      if (tensor.name == "tail.w") tensor.chunk_size = 12 * kKiB;
    }
  }
  for (const int level : {0, 5}) {
    SCOPED_TRACE("level " + std::to_string(level));
    StoreWriteOptions options;
    options.compression_level = level;
    options.chunk_size = 64 * kKiB;
    const std::string id = "own-" + std::to_string(level);
    (void)testing::write_test_model(storage, id, blocks, options);
    const ReferenceStore expected = reference_store(storage.id(), id, blocks, options);
    EXPECT_TRUE(testing::read_file_bytes(storage.model_dir(id) / "manifest") == expected.manifest);
    EXPECT_TRUE(testing::read_file_bytes(storage.model_dir(id) / "data") == expected.data);

    const StoreReader reader = StoreReader::open(storage, id);
    for (const testing::TestBlock& block : blocks) {
      for (const testing::TestTensor& tensor : block.tensors) {
        const size_t index = *reader.find_tensor(tensor.name);
        const TensorRecord& record = reader.manifest().tensors[index];
        EXPECT_EQ(record.chunk_size, tensor.chunk_size != 0 ? tensor.chunk_size : 64 * kKiB) << tensor.name;
        std::vector<std::byte> out(record.nbytes);
        reader.read_tensor(index, out, /*verify_checksums=*/true);
        EXPECT_TRUE(out == tensor.bytes) << tensor.name;
      }
    }
    const TensorRecord& weights = reader.manifest().tensors[*reader.find_tensor("big.w")];
    EXPECT_EQ(weights.chunk_count, (weights.nbytes + 4 * kKiB - 1) / (4 * kKiB));
  }
}

TEST(StoreWriter, CompressingTheNextBatchOverlapsWritingThePrevious) {
  // The first write of each batch waits until the compression of the batch after it has started: with the
  // pipeline that happens at once. A writer that compressed and wrote one after the other would never start the
  // next batch during the wait, which gives up after 10 s (once: a failure, not a hang). No timing is asserted.
  struct Probe {
    std::mutex mutex;
    std::condition_variable started;
    uint64_t encodes_started = 0;  // one past the highest batch whose compression has started
    bool committing = false;
    bool gave_up = false;
    std::map<uint64_t, bool> overlapped;  // batch -> its write began while the next batch was compressing
    std::map<uint64_t, uint64_t> batch_at;  // chunk offset -> batch
  } probe;
  detail::StoreWriterHooks hooks;
  hooks.encode_started = [&probe](uint64_t batch) {
    const std::lock_guard lock(probe.mutex);
    probe.encodes_started = std::max(probe.encodes_started, batch + 1);
    probe.started.notify_all();
  };
  hooks.before_write = [&probe](uint64_t batch, uint64_t offset, uint64_t) {
    std::unique_lock lock(probe.mutex);
    probe.batch_at[offset] = batch;
    if (probe.overlapped.count(batch) == 0) {
      // commit() writes the last batch: no batch follows it.
      const auto next_started = [&] { return probe.encodes_started > batch + 1; };
      probe.overlapped[batch] = !probe.committing && !probe.gave_up &&
                                probe.started.wait_for(lock, std::chrono::seconds(10), next_started);
      probe.gave_up = probe.gave_up || (!probe.committing && !probe.overlapped[batch]);
    }
    return 0;
  };
  const ScopedHooks scoped(hooks);

  TempDir dir;
  const auto storage = StorageDirectory::open_or_create(dir.path());
  StoreWriteOptions options;
  options.compression_level = 5;
  options.chunk_size = 64 * kKiB;
  StoreWriter writer(storage, "m", options);
  writer.begin_block("b");
  // 5 and 3 chunks: at least one batch each, whatever the number of cores.
  const auto first = testing::normal_bf16_bytes(5 * 32 * 1024, 1);
  const auto second = testing::normal_bf16_bytes(3 * 32 * 1024, 2);
  const std::vector<int64_t> shape_first = {5 * 32 * 1024};
  const std::vector<int64_t> shape_second = {3 * 32 * 1024};
  writer.add_tensor("first", Dtype::kBfloat16, shape_first, first);
  writer.add_tensor("second", Dtype::kBfloat16, shape_second, second);
  {
    const std::lock_guard lock(probe.mutex);
    probe.committing = true;
  }
  (void)writer.commit();

  const std::lock_guard lock(probe.mutex);
  ASSERT_GE(probe.overlapped.size(), 2u);
  const uint64_t last = probe.overlapped.rbegin()->first;
  for (const auto& [batch, overlapped] : probe.overlapped) {
    if (batch != last) EXPECT_TRUE(overlapped) << "batch " << batch << " was written without the next compressing";
  }
  // The pipeline runs across add_tensor() calls: the last batch of "first" was written while the first batch of
  // "second" compressed.
  const StoreReader reader = StoreReader::open(storage, "m");
  const Manifest& manifest = reader.manifest();
  const TensorRecord& a = manifest.tensors[*reader.find_tensor("first")];
  const TensorRecord& b = manifest.tensors[*reader.find_tensor("second")];
  const uint64_t last_of_first = probe.batch_at.at(manifest.chunks_of(a).back().offset);
  EXPECT_EQ(probe.batch_at.at(manifest.chunks_of(b).front().offset), last_of_first + 1);
  EXPECT_TRUE(probe.overlapped.at(last_of_first));
}

// One compressible chunk of 64 KiB (bf16 normal weights).
std::vector<std::byte> one_chunk(uint64_t seed) { return testing::normal_bf16_bytes(32 * 1024, seed); }

// Fails the first write of batch `failing` with `error` and remembers the offset it was asked to write at.
struct FailingWrite {
  std::mutex mutex;
  std::optional<uint64_t> offset;

  detail::StoreWriterHooks hooks(uint64_t failing, int error) {
    detail::StoreWriterHooks out;
    out.before_write = [this, failing, error](uint64_t batch, uint64_t at, uint64_t) {
      if (batch != failing) return 0;
      const std::lock_guard lock(mutex);
      offset = at;
      return error;
    };
    return out;
  }
};

void expect_names_data_file_and_offset(const StorageDirectory& storage, const IoError& error, int errno_value,
                                       uint64_t offset) {
  const std::string what = error.what();
  EXPECT_EQ(error.errno_value(), errno_value) << what;
  EXPECT_EQ(fs::path(error.path()).filename(), "data") << what;
  EXPECT_EQ(fs::path(error.path()).parent_path().parent_path(), storage.tmp_dir()) << what;
  EXPECT_NE(what.find(error.path()), std::string::npos) << what;
  EXPECT_NE(what.find("offset " + std::to_string(offset) + " "), std::string::npos) << what;
  EXPECT_NE(what.find(strerrorname_np(errno_value)), std::string::npos) << what;
}

void expect_refused_and_unpublished(StoreWriter& writer, const StorageDirectory& storage) {
  EXPECT_TRUE(fs::is_empty(storage.tmp_dir()));  // removed when the error was thrown
  const auto bytes = one_chunk(9);
  const std::vector<int64_t> shape = {32 * 1024};
  EXPECT_THROW(writer.begin_block("late"), Error);
  EXPECT_THROW(writer.add_tensor("late", Dtype::kBfloat16, shape, bytes), Error);
  EXPECT_THROW((void)writer.commit(), Error);
}

TEST(StoreWriter, AFailedWriteOfAnEarlierBatchIsThrownByTheNextCall) {
  // "one" (batch 1) is compressed during its add_tensor() and written during the next one, which fails with
  // ENOSPC: that call throws it, naming the data file and the offset of the write.
  FailingWrite failing;
  const ScopedHooks scoped(failing.hooks(1, ENOSPC));
  TempDir dir;
  const auto storage = StorageDirectory::open_or_create(dir.path());
  StoreWriteOptions options;
  options.compression_level = 5;
  options.chunk_size = 64 * kKiB;
  StoreWriter writer(storage, "m", options);
  const std::vector<int64_t> shape = {32 * 1024};
  const auto zero = one_chunk(1);
  const auto one = one_chunk(2);
  const auto two = one_chunk(3);
  writer.begin_block("b");
  writer.add_tensor("zero", Dtype::kBfloat16, shape, zero);
  writer.add_tensor("one", Dtype::kBfloat16, shape, one);
  try {
    writer.add_tensor("two", Dtype::kBfloat16, shape, two);
    ADD_FAILURE() << "the failed write of batch 1 was not reported by the next call";
  } catch (const IoError& error) {
    const std::lock_guard lock(failing.mutex);
    ASSERT_TRUE(failing.offset.has_value());
    EXPECT_GT(*failing.offset, 0u);  // after "zero"
    EXPECT_EQ(*failing.offset % kTensorAlignment, 0u);
    expect_names_data_file_and_offset(storage, error, ENOSPC, *failing.offset);
  }
  expect_refused_and_unpublished(writer, storage);
  EXPECT_FALSE(storage.has_model("m"));
}

TEST(StoreWriter, AFailedWriteOfTheLastBatchIsThrownByCommitAndKeepsTheEarlierModel) {
  TempDir dir;
  const auto storage = StorageDirectory::open_or_create(dir.path());
  const std::string earlier = testing::write_test_model(storage, "m", testing::sample_model()).fingerprint;

  FailingWrite failing;
  const ScopedHooks scoped(failing.hooks(1, EIO));
  StoreWriteOptions options;
  options.compression_level = 5;
  options.chunk_size = 64 * kKiB;
  options.mode = PublishMode::kReplace;
  StoreWriter writer(storage, "m", options);
  const std::vector<int64_t> shape = {32 * 1024};
  const auto zero = one_chunk(1);
  const auto one = one_chunk(2);
  writer.begin_block("b");
  writer.add_tensor("zero", Dtype::kBfloat16, shape, zero);
  writer.add_tensor("one", Dtype::kBfloat16, shape, one);  // batch 1, written by commit()
  try {
    (void)writer.commit();
    ADD_FAILURE() << "commit() did not report the failed write of the last batch";
  } catch (const IoError& error) {
    const std::lock_guard lock(failing.mutex);
    ASSERT_TRUE(failing.offset.has_value());
    expect_names_data_file_and_offset(storage, error, EIO, *failing.offset);
  }
  expect_refused_and_unpublished(writer, storage);
  EXPECT_EQ(StoreReader::open(storage, "m").manifest().fingerprint, earlier);
}

// Lowers RLIMIT_FSIZE (and ignores SIGXFSZ, whose default action kills the process) for one test: a write past
// the limit then fails with EFBIG, as a write to a full disk fails with ENOSPC.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) {
    EXPECT_EQ(::getrlimit(RLIMIT_FSIZE, &old_), 0);
    old_handler_ = std::signal(SIGXFSZ, SIG_IGN);
    const rlimit lowered{bytes, old_.rlim_max};
    EXPECT_EQ(::setrlimit(RLIMIT_FSIZE, &lowered), 0);
  }
  ~FileSizeLimit() {
    EXPECT_EQ(::setrlimit(RLIMIT_FSIZE, &old_), 0);
    std::signal(SIGXFSZ, old_handler_);
  }
  FileSizeLimit(const FileSizeLimit&) = delete;
  FileSizeLimit& operator=(const FileSizeLimit&) = delete;

 private:
  rlimit old_{};
  void (*old_handler_)(int) = SIG_DFL;
};

TEST(StoreWriter, AFileSizeLimitHitByAPipelinedWriteIsEfbigAtItsOffset) {
  // A real failing pwrite(), no hook: 1 MiB of compressible weights in 64 KiB chunks stores ~700 KiB, the limit
  // stops it at 300 KiB + 7, in the middle of some chunk. Whichever call writes that chunk throws.
  TempDir dir;
  const auto storage = StorageDirectory::open_or_create(dir.path());
  const auto weights = testing::normal_bf16_bytes(512 * 1024, 5);
  const std::vector<int64_t> shape = {512 * 1024};
  StoreWriteOptions options;
  options.compression_level = 5;
  options.chunk_size = 64 * kKiB;
  constexpr uint64_t kLimit = 300 * kKiB + 7;
  StoreWriter writer(storage, "m", options);
  {
    const FileSizeLimit limit(kLimit);
    try {
      writer.begin_block("b");
      writer.add_tensor("w", Dtype::kBfloat16, shape, weights);
      (void)writer.commit();
      ADD_FAILURE() << "no error past RLIMIT_FSIZE";
    } catch (const IoError& error) {
      expect_names_data_file_and_offset(storage, error, EFBIG, kLimit);  // the short write stops at the limit
    }
  }
  expect_refused_and_unpublished(writer, storage);
  EXPECT_FALSE(storage.has_model("m"));
}

}  // namespace
}  // namespace tensorstream
