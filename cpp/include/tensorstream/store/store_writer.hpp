// StoreWriter: writes one model (blocks of tensors) into a storage directory and publishes it atomically.
//
// Bytes are split into chunks of chunk_size, each optionally compressed (kept raw when that does not pay),
// checksummed with its binding, and written sequentially into tmp/; commit() fsyncs, writes the manifest and
// publishes with one rename. Until commit() returns, no reader can see any part of the model; if the writer
// throws, is destroyed, or its process dies, the previous model of that id (if any) is untouched and the temp
// directory is removed (or left for cleanup_orphaned_files when the process died).
//
// With compression on, chunks are compressed in batches (one chunk per core) on threads of the writer while the
// caller's thread writes the previous batch, so the last batch of a tensor is written during the next call. A
// write error (IoError: ENOSPC, EFBIG, EIO, naming the data file and the offset) therefore surfaces at the call
// that made the write, which may be the next add_tensor() or commit(); as for any error, the temp directory is
// removed before it is thrown and the writer refuses every later call.
//
// Thread-safety: one thread at a time. The compression threads are joined before each call returns or throws.
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "tensorstream/format/manifest.hpp"
#include "tensorstream/store/storage_directory.hpp"

namespace tensorstream {

struct StoreWriteOptions {
  uint64_t chunk_size = kDefaultChunkSize;  // multiple of 4096 in [4 KiB, 64 MiB]
  int compression_level = 0;                // 0 = off, 1..9 per docs/format.md
  PublishMode mode = PublishMode::kKeepExisting;
  std::map<std::string, std::string> metadata;
};

struct StoreWriteResult {
  std::string model_id;
  std::string fingerprint;
  PublishOutcome outcome = PublishOutcome::kPublished;
  uint64_t raw_bytes = 0;     // sum of tensor sizes
  uint64_t stored_bytes = 0;  // size of the data file
};

class StoreWriter {
 public:
  // Validates options (ConfigError) and the model id, and creates the temp directory.
  StoreWriter(const StorageDirectory& storage, std::string model_id, StoreWriteOptions options);
  ~StoreWriter();
  StoreWriter(const StoreWriter&) = delete;
  StoreWriter& operator=(const StoreWriter&) = delete;

  // Starts a new block; the previous one (if any) ends. Block names are unique within a model.
  void begin_block(std::string name);
  // Appends a tensor to the current block. bytes.size() must equal product(shape) * dtype_size(dtype).
  // The caller may free the bytes once this returns: what is still unwritten then is compressed bytes (or a copy)
  // owned by the writer. It may write the previous tensor's last batch of chunks (see above).
  // chunk_size: this tensor's own chunk size (a multiple of 4096 from 4096 up to the model's; 0 = the model's), for
  // a tensor read in small pieces, e.g. an embedding read by rows: a read verifies and decodes whole chunks.
  void add_tensor(std::string name, Dtype dtype, std::span<const int64_t> shape, std::span<const std::byte> bytes,
                  uint64_t chunk_size = 0);
  // Finishes the data file, writes the manifest, publishes. The writer is unusable afterwards.
  StoreWriteResult commit();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tensorstream
