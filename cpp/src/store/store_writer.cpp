#include "tensorstream/store/store_writer.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <thread>
#include <unordered_set>

#include "tensorstream/error.hpp"
#include "tensorstream/io/file.hpp"

namespace tensorstream {

namespace {
// A model id the writer uses for its temp directory until the fingerprint (and so the final id) is known.
constexpr std::string_view kPendingFingerprintId = "fp-pending";

void validate_options(const StoreWriteOptions& options) {
  if (options.chunk_size < kMinChunkSize || options.chunk_size > kMaxChunkSize ||
      options.chunk_size % kBlockAlignment != 0) {
    throw ConfigError("chunk_size", std::to_string(options.chunk_size) +
                                        " must be a multiple of 4096 between 4096 and 67108864 bytes");
  }
  (void)compression_for_level(options.compression_level);  // throws ConfigError when out of range
  if (options.metadata.size() > kMaxMetadataEntries) {
    throw ConfigError("metadata", "more than " + std::to_string(kMaxMetadataEntries) + " entries");
  }
  for (const auto& [key, value] : options.metadata) {
    if (key.empty() || key.size() > kMaxNameBytes || value.size() > kMaxMetadataValueBytes) {
      throw ConfigError("metadata", "entry '" + key.substr(0, 64) + "' has an empty or oversized key or value");
    }
  }
}

// Raw bytes of one chunk and where its encoded form ends up.
struct EncodedChunk {
  std::span<const std::byte> raw;
  std::vector<std::byte> compressed;
  std::vector<std::byte> scratch;
  bool is_compressed = false;
};
}  // namespace

struct StoreWriter::Impl {
  const StorageDirectory& storage;
  std::string model_id;  // empty: "fp-" + fingerprint, decided at commit
  StoreWriteOptions options;
  CompressionChoice compression;
  TempModelDir temp;
  std::string data_path;
  UniqueFd data_fd;
  Manifest manifest;
  FingerprintBuilder fingerprint;
  uint64_t cursor = 0;
  uint64_t raw_bytes = 0;
  std::unordered_set<std::string> block_names;
  std::unordered_set<std::string> tensor_names;
  bool failed = false;
  bool committed = false;
  std::vector<EncodedChunk> encode_batch;

  Impl(const StorageDirectory& storage_in, std::string id, StoreWriteOptions opts)
      : storage(storage_in), model_id(std::move(id)), options(std::move(opts)) {
    validate_options(options);
    compression = compression_for_level(options.compression_level);
    temp = storage.make_temp_dir(model_id.empty() ? kPendingFingerprintId : std::string_view(model_id));
    data_path = (temp.path() / "data").string();
    data_fd = open_file(data_path, O_WRONLY | O_CREAT | O_EXCL, 0644);
    manifest.store_id = storage.id();
    manifest.chunk_size = options.chunk_size;
    manifest.metadata = options.metadata;
  }

  // Removes the temp directory now (not at destruction): on a full disk the partial data must go at once.
  void abandon() noexcept {
    failed = true;
    data_fd.reset();
    temp = TempModelDir();
  }

  void ensure_usable() const {
    if (committed) throw Error("StoreWriter: commit() was already called");
    if (failed) throw Error("StoreWriter: an earlier call failed; this write was abandoned");
  }

  void encode_chunks(Dtype dtype) {
    const uint32_t shuffle = dtype_is_groupable_float(dtype) ? dtype_size(dtype) : 0;
    auto encode = [&](EncodedChunk& chunk) {
      chunk.is_compressed = compress_chunk(chunk.raw, compression, shuffle, chunk.compressed, chunk.scratch);
    };
    // Compression is CPU-bound; spread a batch over the cores. Raw chunks skip this entirely.
    const size_t workers = std::min<size_t>(encode_batch.size(), std::max(1u, std::thread::hardware_concurrency()));
    if (workers <= 1) {
      for (auto& chunk : encode_batch) encode(chunk);
      return;
    }
    std::vector<std::thread> threads;
    for (size_t w = 0; w < workers; ++w) {
      threads.emplace_back([&, w] {
        for (size_t i = w; i < encode_batch.size(); i += workers) encode(encode_batch[i]);
      });
    }
    for (auto& thread : threads) thread.join();
  }

  void add_tensor(std::string name, Dtype dtype, std::span<const int64_t> shape, std::span<const std::byte> bytes) {
    if (manifest.blocks.empty()) throw ConfigError("block", "add_tensor called before begin_block");
    if (name.empty() || name.size() > kMaxNameBytes) {
      throw ConfigError("tensor name", "'" + name.substr(0, 64) + "' must be 1-1024 bytes");
    }
    if (!tensor_names.insert(name).second) throw ConfigError("tensor name", "'" + name + "' appears twice");
    if (shape.size() > kMaxRank) throw ConfigError("shape", "tensor '" + name + "' has more than 16 dimensions");
    uint64_t nbytes = dtype_size(dtype);
    for (int64_t dim : shape) {
      if (dim < 0 || static_cast<uint64_t>(dim) > kMaxTensorBytes ||
          __builtin_mul_overflow(nbytes, static_cast<uint64_t>(dim), &nbytes) || nbytes > kMaxTensorBytes) {
        throw ConfigError("shape", "tensor '" + name + "' has a negative or too large dimension");
      }
    }
    if (nbytes != bytes.size()) {
      throw ConfigError("bytes", "tensor '" + name + "' has " + std::to_string(bytes.size()) +
                                     " bytes, but its dtype and shape need " + std::to_string(nbytes));
    }

    BlockRecord& block = manifest.blocks.back();
    TensorRecord tensor;
    tensor.name = std::move(name);
    tensor.dtype = dtype;
    tensor.shape.assign(shape.begin(), shape.end());
    tensor.block = static_cast<uint32_t>(manifest.blocks.size() - 1);
    tensor.first_chunk = manifest.chunks.size();
    const uint64_t tensor_index = manifest.tensors.size();

    fingerprint.add_tensor(tensor.name, dtype_name(dtype), shape);
    fingerprint.add_bytes(bytes);

    cursor = align_up(cursor, kTensorAlignment);
    const uint64_t chunk_size = options.chunk_size;
    const uint64_t chunk_count = (nbytes + chunk_size - 1) / chunk_size;
    // Chunks are encoded in batches (one per core) and written in order, so the file stays sequential.
    const uint64_t batch_size = compression.codec == Codec::kRaw ? 1 : std::max(1u, std::thread::hardware_concurrency());
    for (uint64_t first = 0; first < chunk_count; first += batch_size) {
      const uint64_t last = std::min(chunk_count, first + batch_size);
      encode_batch.resize(last - first);
      for (uint64_t i = first; i < last; ++i) {
        const uint64_t begin = i * chunk_size;
        encode_batch[i - first].raw = bytes.subspan(begin, std::min(chunk_size, nbytes - begin));
        encode_batch[i - first].is_compressed = false;
      }
      if (compression.codec != Codec::kRaw) encode_chunks(dtype);
      for (uint64_t i = first; i < last; ++i) {
        EncodedChunk& encoded = encode_batch[i - first];
        const std::span<const std::byte> stored =
            encoded.is_compressed ? std::span<const std::byte>(encoded.compressed) : encoded.raw;
        ChunkRecord chunk;
        chunk.offset = cursor;
        chunk.stored_size = stored.size();
        chunk.raw_size = encoded.raw.size();
        chunk.codec = encoded.is_compressed ? compression.codec : Codec::kRaw;
        chunk.shuffle = encoded.is_compressed && dtype_is_groupable_float(dtype) ? dtype_size(dtype) : 0;
        chunk.checksum = chunk_checksum({manifest.store_id, tensor_index, i, cursor}, stored);
        pwrite_all(data_fd.get(), stored, cursor, data_path);
        cursor += stored.size();
        manifest.chunks.push_back(chunk);
      }
    }
    tensor.chunk_count = manifest.chunks.size() - tensor.first_chunk;
    manifest.tensors.push_back(std::move(tensor));
    block.tensor_count += 1;
    raw_bytes += nbytes;
  }

  StoreWriteResult commit() {
    if (!manifest.blocks.empty() && manifest.blocks.back().tensor_count == 0) {
      throw ConfigError("block", "block '" + manifest.blocks.back().name + "' has no tensors");
    }
    manifest.data_size = cursor == 0 ? 0 : align_up(cursor, kBlockAlignment);
    // Extends the file with zeros up to the aligned end, so a 4 KiB-granular direct read never hits EOF.
    if (::ftruncate(data_fd.get(), static_cast<off_t>(manifest.data_size)) != 0) throw_errno(data_path, "truncate");
    if (::fsync(data_fd.get()) != 0) throw_errno(data_path, "fsync");
    data_fd.reset();

    manifest.fingerprint = fingerprint.finish();
    const std::string final_id = model_id.empty() ? "fp-" + manifest.fingerprint : model_id;
    manifest.model_id = final_id;
    compute_derived_fields(manifest);
    write_file_durably(temp.path() / "manifest", serialize_manifest(manifest));
    StoreWriteResult result;
    result.model_id = final_id;
    result.fingerprint = manifest.fingerprint;
    result.raw_bytes = raw_bytes;
    result.stored_bytes = manifest.data_size;
    result.outcome = storage.publish(temp, final_id, options.mode);
    temp = TempModelDir();  // after a replace it holds the old model, after a lost race our copy: free it now
    return result;
  }
};

StoreWriter::StoreWriter(const StorageDirectory& storage, std::string model_id, StoreWriteOptions options)
    : impl_(std::make_unique<Impl>(storage, std::move(model_id), std::move(options))) {}

StoreWriter::~StoreWriter() = default;  // an uncommitted temp directory is removed by TempModelDir

void StoreWriter::begin_block(std::string name) {
  impl_->ensure_usable();
  try {
    auto& m = impl_->manifest;
    if (!m.blocks.empty() && m.blocks.back().tensor_count == 0) {
      throw ConfigError("block", "block '" + m.blocks.back().name + "' has no tensors");
    }
    if (name.empty() || name.size() > kMaxNameBytes) {
      throw ConfigError("block name", "'" + name.substr(0, 64) + "' must be 1-1024 bytes");
    }
    if (!impl_->block_names.insert(name).second) throw ConfigError("block name", "'" + name + "' appears twice");
    impl_->cursor = align_up(impl_->cursor, kBlockAlignment);
    impl_->fingerprint.add_block(name);
    BlockRecord block;
    block.name = std::move(name);
    block.offset = impl_->cursor;
    block.first_tensor = m.tensors.size();
    m.blocks.push_back(std::move(block));
  } catch (...) {
    impl_->abandon();
    throw;
  }
}

void StoreWriter::add_tensor(std::string name, Dtype dtype, std::span<const int64_t> shape,
                             std::span<const std::byte> bytes) {
  impl_->ensure_usable();
  try {
    impl_->add_tensor(std::move(name), dtype, shape, bytes);
  } catch (...) {
    impl_->abandon();
    throw;
  }
}

StoreWriteResult StoreWriter::commit() {
  impl_->ensure_usable();
  try {
    StoreWriteResult result = impl_->commit();
    impl_->committed = true;
    return result;
  } catch (...) {
    impl_->abandon();
    throw;
  }
}

}  // namespace tensorstream
