// StoreWriter: writes one model (blocks of tensors) into a storage directory and publishes it atomically.
//
// Bytes are split into chunks of chunk_size, each optionally compressed (kept raw when that does not pay),
// checksummed with its binding, and written sequentially into tmp/; commit() fsyncs, writes the manifest and
// publishes with one rename. Until commit() returns, no reader can see any part of the model; if the writer
// throws, is destroyed, or its process dies, the previous model of that id (if any) is untouched and the temp
// directory is removed (or left for cleanup_orphaned_files when the process died).
//
// Thread-safety: one thread at a time. Compression of a tensor's chunks may use internal worker threads.
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
  // The bytes are written before this returns; the caller may free them afterwards.
  void add_tensor(std::string name, Dtype dtype, std::span<const int64_t> shape, std::span<const std::byte> bytes);
  // Finishes the data file, writes the manifest, publishes. The writer is unusable afterwards.
  StoreWriteResult commit();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tensorstream
