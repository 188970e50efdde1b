// Maintenance of a storage directory: integrity verification, orphan cleanup and defragmentation
// (the deployment guide's verify_storage_integrity, cleanup_orphaned_files, defragment_storage).
// Each returns a report; none of them throws for bad data inside the store (that is what the report is for),
// only for a storage directory that cannot be opened at all.
//
// Thread-safety: free functions; concurrent writers and readers of the same storage stay correct (publishes are
// atomic renames), though a verify racing a replace may report the model it saw.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace tensorstream {

struct ChunkProblem {
  std::string model;
  std::string tensor;
  uint64_t chunk = 0;
  uint64_t offset = 0;
  std::string error;
};

struct ModelVerification {
  std::string model;
  bool ok = false;
  uint64_t tensors = 0;
  uint64_t chunks_checked = 0;
  uint64_t bytes_checked = 0;
  std::string error;  // a model-level problem (unreadable manifest, wrong fingerprint, ...); empty if none
  std::vector<ChunkProblem> bad_chunks;
};

struct VerifyReport {
  bool ok = false;
  std::vector<ModelVerification> models;
  std::vector<std::string> orphans;  // paths cleanup_orphaned_files would remove (not an error)
};

// Checks everything: STORE, every manifest rule, every chunk's checksum and decoding, padding, fingerprint.
[[nodiscard]] VerifyReport verify_storage(const std::filesystem::path& root,
                                          const std::optional<std::string>& model = std::nullopt);

struct CleanupReport {
  std::vector<std::string> removed;
  std::vector<std::string> kept_in_use;  // temp directories whose writer is still alive
  uint64_t bytes_freed = 0;
  bool dry_run = false;
};

// Removes tmp/ leftovers of writers that are no longer alive, files in model directories that no manifest
// references, and model directories without a manifest.
[[nodiscard]] CleanupReport cleanup_orphans(const std::filesystem::path& root, bool dry_run = false);

struct ModelDefrag {
  std::string model;
  bool rewritten = false;
  std::string reason;  // why it was or was not rewritten
  uint64_t bytes_before = 0;
  uint64_t bytes_after = 0;
};

struct DefragReport {
  std::vector<ModelDefrag> models;
};

// Rewrites each model's data with its blocks in recorded execution order (models/<id>/execution_order, when
// present) and with no dead space, verifying every chunk on the way; a model already in that order is left
// alone. Publishing is atomic: a crash leaves the old or the new model, never a mix.
[[nodiscard]] DefragReport defragment(const std::filesystem::path& root,
                                      const std::optional<std::string>& model = std::nullopt);

// Execution order sidecar: block names, one per line, as recorded by the engine.
void write_execution_order(const std::filesystem::path& root, const std::string& model,
                           const std::vector<std::string>& block_names);
[[nodiscard]] std::optional<std::vector<std::string>> read_execution_order(const std::filesystem::path& root,
                                                                           const std::string& model);

}  // namespace tensorstream
