// A storage directory: one STORE identity file and many published models (docs/format.md, "Directory").
//
//   <root>/STORE              identity: magic, version, store id
//   <root>/models/<model-id>/ manifest, data (and optionally execution_order)
//   <root>/tmp/               one directory per in-progress write, flock'ed by its writer while alive
//   <root>/locks/             <model-id>.lock files: flock'ed to avoid duplicate work, never for correctness
//
// Publishing is one rename of a complete, fsync'ed directory from tmp/ into models/, so a reader sees a whole
// model or none, whatever happens to the writer.
//
// Thread-safety: a StorageDirectory is immutable after open; its methods may be called from any thread.
#pragma once

#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "tensorstream/format/checksum.hpp"
#include "tensorstream/io/file.hpp"

namespace tensorstream {

// A directory under tmp/ that one writer owns. Removed (recursively) on destruction unless published.
// Move-only; used by one thread.
class TempModelDir {
 public:
  TempModelDir() = default;
  TempModelDir(std::filesystem::path path, UniqueFd lock_fd);
  ~TempModelDir();
  TempModelDir(TempModelDir&& other) noexcept;
  // Removes the directory this object owned before taking over `other`'s.
  TempModelDir& operator=(TempModelDir&& other) noexcept;
  TempModelDir(const TempModelDir&) = delete;
  TempModelDir& operator=(const TempModelDir&) = delete;
  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }
  // Called after a successful publish: the directory no longer exists under this name.
  void release() noexcept { path_.clear(); lock_fd_.reset(); }

 private:
  std::filesystem::path path_;
  UniqueFd lock_fd_;  // flock'ed directory fd: tells cleanup that this writer is alive
};

enum class PublishMode {
  kKeepExisting,  // another complete model of that id wins; ours is discarded
  kReplace,       // ours atomically replaces an existing one (renameat2 RENAME_EXCHANGE)
};

enum class PublishOutcome { kPublished, kReplaced, kAlreadyExisted };

// An exclusive advisory lock on locks/<model-id>.lock, released on destruction. Move-only.
class ModelLock {
 public:
  ModelLock() = default;
  explicit ModelLock(UniqueFd fd) : fd_(std::move(fd)) {}

 private:
  UniqueFd fd_;
};

class StorageDirectory {
 public:
  // Opens `root`, creating it and its STORE file if absent. Throws IoError / FormatError.
  [[nodiscard]] static StorageDirectory open_or_create(const std::filesystem::path& root);
  // Opens an existing storage directory; IoError(ENOENT) if there is none.
  [[nodiscard]] static StorageDirectory open_existing(const std::filesystem::path& root);

  [[nodiscard]] const std::filesystem::path& root() const noexcept { return root_; }
  [[nodiscard]] const StoreId& id() const noexcept { return id_; }
  [[nodiscard]] std::filesystem::path models_dir() const { return root_ / "models"; }
  [[nodiscard]] std::filesystem::path tmp_dir() const { return root_ / "tmp"; }
  [[nodiscard]] std::filesystem::path locks_dir() const { return root_ / "locks"; }
  // Throws ConfigError for an invalid model id: names are data and never become arbitrary paths.
  [[nodiscard]] std::filesystem::path model_dir(std::string_view model_id) const;

  // Published model ids (directories under models/ with a valid name), sorted.
  [[nodiscard]] std::vector<std::string> list_models() const;
  [[nodiscard]] bool has_model(std::string_view model_id) const;
  // Removes a published model: renamed into tmp/ first so the removal itself is atomic.
  void remove_model(std::string_view model_id) const;

  // Creates tmp/<model-id>.<pid>.<random>/ and flocks it.
  [[nodiscard]] TempModelDir make_temp_dir(std::string_view model_id) const;
  // fsyncs the temp directory, renames it to models/<model-id>, fsyncs models/. Throws IoError.
  PublishOutcome publish(TempModelDir& temp, std::string_view model_id, PublishMode mode) const;

  // Blocks until this process holds locks/<model-id>.lock exclusively.
  [[nodiscard]] ModelLock lock_model(std::string_view model_id) const;

 private:
  StorageDirectory(std::filesystem::path root, StoreId id) : root_(std::move(root)), id_(id) {}
  std::filesystem::path root_;
  StoreId id_{};
};

// Reads and validates a STORE file image (docs/format.md, "STORE file"). Throws FormatError.
[[nodiscard]] StoreId parse_store_file(std::span<const std::byte> bytes, const std::string& path);
[[nodiscard]] std::vector<std::byte> serialize_store_file(const StoreId& id);

}  // namespace tensorstream
