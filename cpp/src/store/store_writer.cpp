#include "tensorstream/store/store_writer.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <exception>
#include <mutex>
#include <thread>
#include <unordered_set>

#include "store/store_writer_testing.hpp"
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

// ---- the encode/write pipeline -------------------------------------------------------------------------------
//
// Chunks go to disk in batches of one chunk per core. While the compression threads encode batch k+1, the caller's
// thread writes batch k (its checksums, its pwrite()s, then sync_file_range() to start the disk write) and feeds
// batch k+1's raw bytes to the fingerprint; then it joins the threads and gives batch k+1 its offsets. At most two
// batches are in flight: one compressing, one being written.
//
// Why: benchmarks/README.md (S3, zstd level 5 on bf16 weights, 2-core VM) had this writer at 0.60 of `dd
// conv=fsync`, its time split into ~2.6 s/GiB of compression and checksums and ~1.9 s/GiB of writing, one after
// the other. Measured again for this change (same VM, 0.5 GiB, old and new builds alternating): the writer is
// CPU-bound there, ~2.3 CPU-s per 0.5 GiB compressing, and writing was ~0.16 s of page-cache copies plus a ~0.13 s
// fsync() at commit, with the second core idle during both and during the fingerprint and checksums. Overlapped,
// and with write-back started per batch, commit()'s fsync() fell to ~0.01 s, busy cores rose from ~1.65 to ~1.83
// and level 5 went from 0.40-0.42 to 0.44-0.46 GB/s (dd: 0.37-0.44 GB/s in the same runs).
//
// Why the caller's thread writes, and not a writer thread of its own: every write, checksum and manifest update
// then happens on the one thread that owns the manifest, an I/O error is thrown where it happens (no hand-over of
// errors between threads), and the compression threads only ever touch their own batch. The price is that a
// write can only happen during a call: the last batch of a tensor is written during the next add_tensor() or in
// commit(), and that is where its error (ENOSPC, EFBIG, EIO) surfaces.
//
// Bounded memory: two batches of owned stored bytes plus one scratch buffer per compression thread, about 3 x
// cores x chunk_size. A batch holds no pointer into the caller's tensor once it is encoded (a chunk that does not
// shrink is copied), so add_tensor() can return with it still unwritten; only at compression level 0, where the
// stored bytes are the caller's, is the last batch written before add_tensor() returns. Offsets are given in chunk
// order, exactly as a one-chunk-at-a-time writer gives them, so the data file and the manifest are byte-for-byte
// the same (test: PipelinedWritesGiveTheBytesOfAOneChunkAtATimeWriter).

// Below this many raw bytes a batch is compressed on the caller's thread: starting threads (tens of microseconds)
// would cost more than it saves.
constexpr uint64_t kThreadedEncodeBytes = 64 * 1024;

std::mutex& hooks_mutex() {
  static std::mutex mutex;
  return mutex;
}

detail::StoreWriterHooks& installed_hooks() {
  static detail::StoreWriterHooks hooks;
  return hooks;
}

// One chunk on its way to the data file.
struct PipelineChunk {
  std::span<const std::byte> raw;     // the caller's bytes
  std::vector<std::byte> owned;       // compressed bytes, or a copy of raw when it does not shrink
  Codec codec = Codec::kRaw;  // as encoded; kRaw: stored as is
  std::span<const std::byte> stored;  // what is written: owned, or raw at compression level 0
  uint64_t chunk_index = 0;           // within its tensor
  size_t record = 0;                  // its ChunkRecord in manifest.chunks
};

struct Batch {
  uint64_t number = 0;  // 0, 1, 2, ... per writer
  uint64_t tensor_index = 0;
  uint32_t shuffle = 0;
  bool borrows = false;  // stored bytes are the caller's (level 0): written before add_tensor returns
  size_t count = 0;      // chunks[0, count) are this batch; the vector only grows, so buffers are reused
  std::vector<PipelineChunk> chunks;
};

// The compression threads of one batch. Joined by the destructor too, so a write that throws while they run does
// not leave a thread behind; no thread outlives the writer call that started it.
class EncodeThreads {
 public:
  template <typename Work>
  EncodeThreads(size_t count, Work work) : errors_(count) {
    try {
      for (size_t i = 0; i < count; ++i) {
        threads_.emplace_back([this, i, work] {
          try {
            work(i);
          } catch (...) {
            errors_[i] = std::current_exception();
          }
        });
      }
    } catch (...) {  // std::thread could not start one: join those that did start
      join();
      throw;
    }
  }
  ~EncodeThreads() { join(); }
  EncodeThreads(const EncodeThreads&) = delete;
  EncodeThreads& operator=(const EncodeThreads&) = delete;

  void join_and_rethrow() {
    join();
    for (const std::exception_ptr& error : errors_) {
      if (error) std::rethrow_exception(error);
    }
  }

 private:
  void join() noexcept {
    for (std::thread& thread : threads_) {
      if (thread.joinable()) thread.join();
    }
  }

  std::vector<std::exception_ptr> errors_;  // sized before any thread starts: each thread writes its own slot
  std::vector<std::thread> threads_;
};
}  // namespace

namespace detail {
void set_store_writer_hooks_for_testing(StoreWriterHooks hooks) {
  const std::lock_guard lock(hooks_mutex());
  installed_hooks() = std::move(hooks);
}
}  // namespace detail

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
  uint64_t cursor = 0;  // end of the last chunk given an offset (written or pending)
  uint64_t raw_bytes = 0;
  std::unordered_set<std::string> block_names;
  std::unordered_set<std::string> tensor_names;
  bool failed = false;
  bool committed = false;
  detail::StoreWriterHooks hooks;
  size_t encode_threads = 1;  // one per core
  std::array<Batch, 2> batches;
  Batch* pending = nullptr;  // encoded and given offsets, not yet written
  uint64_t batches_started = 0;
  std::vector<std::vector<std::byte>> scratch;  // one per compression thread

  Impl(const StorageDirectory& storage_in, std::string id, StoreWriteOptions opts)
      : storage(storage_in), model_id(std::move(id)), options(std::move(opts)) {
    validate_options(options);
    compression = compression_for_level(options.compression_level);
    {
      const std::lock_guard lock(hooks_mutex());
      hooks = installed_hooks();
    }
    encode_threads = std::max(1u, std::thread::hardware_concurrency());
    scratch.resize(encode_threads);
    temp = storage.make_temp_dir(model_id.empty() ? kPendingFingerprintId : std::string_view(model_id));
    data_path = (temp.path() / "data").string();
    data_fd = open_file(data_path, O_WRONLY | O_CREAT | O_EXCL, 0644);
    manifest.store_id = storage.id();
    manifest.chunk_size = options.chunk_size;
    manifest.metadata = options.metadata;
  }

  // Removes the temp directory now (not at destruction): on a full disk the partial data must go at once. No
  // compression thread runs here: they are joined before any writer call returns or throws.
  void abandon() noexcept {
    failed = true;
    pending = nullptr;
    data_fd.reset();
    temp = TempModelDir();
  }

  void ensure_usable() const {
    if (committed) throw Error("StoreWriter: commit() was already called");
    if (failed) throw Error("StoreWriter: an earlier call failed; this write was abandoned");
  }

  [[nodiscard]] bool compressing() const noexcept { return compression.codec != Codec::kRaw; }

  // Compression thread `share` of `shares` encodes chunks share, share + shares, ... of the batch.
  void encode_share(Batch& batch, size_t share, size_t shares) {
    if (hooks.encode_started) hooks.encode_started(batch.number);
    for (size_t i = share; i < batch.count; i += shares) {
      PipelineChunk& chunk = batch.chunks[i];
      chunk.codec = compress_chunk(chunk.raw, compression, batch.shuffle, chunk.owned, scratch[share]);
      // Stored raw: copied, so the batch owns what it writes and may outlive the caller's tensor.
      if (chunk.codec == Codec::kRaw) chunk.owned.assign(chunk.raw.begin(), chunk.raw.end());
    }
  }

  // Gives the batch's chunks their offsets and manifest records, in chunk order (checksums come at the write).
  void seal(Batch& batch) {
    for (size_t i = 0; i < batch.count; ++i) {
      PipelineChunk& encoded = batch.chunks[i];
      encoded.stored = compressing() ? std::span<const std::byte>(encoded.owned) : encoded.raw;
      ChunkRecord chunk;
      chunk.offset = cursor;
      chunk.stored_size = encoded.stored.size();
      chunk.raw_size = encoded.raw.size();
      chunk.codec = encoded.codec;
      chunk.shuffle = encoded.codec != Codec::kRaw ? batch.shuffle : 0;
      encoded.record = manifest.chunks.size();
      cursor += encoded.stored.size();
      manifest.chunks.push_back(chunk);
    }
  }

  // Checksums and writes the pending batch, if any.
  void write_pending() {
    if (pending == nullptr) return;
    Batch& batch = *pending;
    pending = nullptr;
    for (size_t i = 0; i < batch.count; ++i) {
      const PipelineChunk& encoded = batch.chunks[i];
      ChunkRecord& chunk = manifest.chunks[encoded.record];
      chunk.checksum = chunk_checksum({manifest.store_id, batch.tensor_index, encoded.chunk_index, chunk.offset},
                                      encoded.stored);
      if (hooks.before_write) {
        const int injected = hooks.before_write(batch.number, chunk.offset, encoded.stored.size());
        if (injected != 0) throw IoError(data_path, injected, "write at offset " + std::to_string(chunk.offset));
      }
      pwrite_all(data_fd.get(), encoded.stored, chunk.offset, data_path);
    }
    if (compressing()) start_writeback(batch);
  }

  // Starts the disk write of the batch now, while the next one compresses, instead of leaving all of it to the
  // fsync() in commit(). A hint: SYNC_FILE_RANGE_WRITE alone neither waits for the disk nor consumes a write-back
  // error, so the fsync() still decides durability and reports any error; its own result is therefore ignored.
  // Not at level 0: nothing compresses meanwhile, and on the 2-core VM it made that arm slower (medians of 24 runs,
  // twice: 1.25 -> 0.96 and 1.55 -> 1.08 GB/s; the disk write then competes with the page-cache copies that are
  // that arm's whole cost).
  void start_writeback(const Batch& batch) const noexcept {
    const uint64_t begin = manifest.chunks[batch.chunks[0].record].offset;
    const ChunkRecord& last = manifest.chunks[batch.chunks[batch.count - 1].record];
    (void)::sync_file_range(data_fd.get(), static_cast<off_t>(begin),
                            static_cast<off_t>(last.offset + last.stored_size - begin), SYNC_FILE_RANGE_WRITE);
  }

  // Encodes `batch` (whose raw bytes are `raw`) while the pending batch is written, then makes it the pending one.
  void advance(Batch& batch, std::span<const std::byte> raw) {
    if (compressing() && raw.size() >= kThreadedEncodeBytes) {
      const size_t shares = std::min(batch.count, encode_threads);
      EncodeThreads encoders(shares, [this, &batch, shares](size_t share) { encode_share(batch, share, shares); });
      write_pending();
      fingerprint.add_bytes(raw);
      encoders.join_and_rethrow();
    } else {
      if (compressing()) encode_share(batch, 0, 1);
      write_pending();
      fingerprint.add_bytes(raw);
    }
    seal(batch);
    pending = &batch;
  }

  void add_tensor(std::string name, Dtype dtype, std::span<const int64_t> shape, std::span<const std::byte> bytes,
                  uint64_t own_chunk_size) {
    if (manifest.blocks.empty()) throw ConfigError("block", "add_tensor called before begin_block");
    if (own_chunk_size != 0 && (own_chunk_size < kMinChunkSize || own_chunk_size > options.chunk_size ||
                                own_chunk_size % kBlockAlignment != 0)) {
      throw ConfigError("chunk_size", "tensor '" + name.substr(0, 64) + "': its chunk size " +
                                          std::to_string(own_chunk_size) + " must be a multiple of 4096 between 4096 "
                                          "and the model's chunk size " + std::to_string(options.chunk_size));
    }
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

    cursor = align_up(cursor, kTensorAlignment);
    const uint64_t chunk_size = own_chunk_size != 0 ? own_chunk_size : options.chunk_size;
    tensor.chunk_size = chunk_size;
    const uint64_t chunk_count = (nbytes + chunk_size - 1) / chunk_size;
    // About a model chunk's bytes per thread and batch, whatever this tensor's chunk size.
    const uint64_t batch_size = compressing() ? encode_threads * (options.chunk_size / chunk_size) : 1;
    for (uint64_t first = 0; first < chunk_count; first += batch_size) {
      const uint64_t last = std::min(chunk_count, first + batch_size);
      Batch& batch = pending == &batches[0] ? batches[1] : batches[0];
      batch.number = batches_started++;
      batch.tensor_index = tensor_index;
      batch.shuffle = dtype_is_groupable_float(dtype) ? dtype_size(dtype) : 0;
      batch.borrows = !compressing();
      batch.count = last - first;
      if (batch.chunks.size() < batch.count) batch.chunks.resize(batch.count);
      for (uint64_t i = first; i < last; ++i) {
        const uint64_t begin = i * chunk_size;
        PipelineChunk& chunk = batch.chunks[i - first];
        chunk.raw = bytes.subspan(begin, std::min(chunk_size, nbytes - begin));
        chunk.codec = Codec::kRaw;
        chunk.chunk_index = i;
      }
      const uint64_t begin = first * chunk_size;
      advance(batch, bytes.subspan(begin, std::min(nbytes, last * chunk_size) - begin));
    }
    if (pending != nullptr && pending->borrows) write_pending();  // the caller may free its bytes on return
    tensor.chunk_count = manifest.chunks.size() - tensor.first_chunk;
    manifest.tensors.push_back(std::move(tensor));
    block.tensor_count += 1;
    raw_bytes += nbytes;
  }

  StoreWriteResult commit() {
    if (!manifest.blocks.empty() && manifest.blocks.back().tensor_count == 0) {
      throw ConfigError("block", "block '" + manifest.blocks.back().name + "' has no tensors");
    }
    write_pending();
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
                             std::span<const std::byte> bytes, uint64_t chunk_size) {
  impl_->ensure_usable();
  try {
    impl_->add_tensor(std::move(name), dtype, shape, bytes, chunk_size);
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
