#include "tensorstream/store/maintenance.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <fstream>
#include <set>
#include <sstream>
#include <unordered_map>

#include "tensorstream/error.hpp"
#include "tensorstream/io/file.hpp"
#include "tensorstream/store/storage_directory.hpp"
#include "tensorstream/store/store_reader.hpp"

namespace tensorstream {

namespace fs = std::filesystem;

namespace {
constexpr const char* kExecutionOrderFile = "execution_order";
// Files a model directory may hold (docs/format.md §1); anything else is an orphan.
const std::set<std::string> kModelFiles = {"manifest", "data", kExecutionOrderFile};
// Loose files in tmp/ (STORE candidates) live for milliseconds; older ones belong to dead processes.
constexpr auto kLooseTempFileMaxAge = std::chrono::minutes(10);

uint64_t tree_size(const fs::path& path) {
  std::error_code ec;
  if (!fs::is_directory(path, ec)) return fs::file_size(path, ec);
  uint64_t total = 0;
  for (const auto& entry : fs::recursive_directory_iterator(path, ec)) {
    std::error_code size_ec;
    if (entry.is_regular_file(size_ec)) total += entry.file_size(size_ec);
  }
  return total;
}

// True when nobody holds the flock of `dir`, i.e. its writer has exited.
bool writer_is_gone(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return true;
  const bool gone = ::flock(fd, LOCK_EX | LOCK_NB) == 0;
  ::close(fd);  // also drops the lock we may have taken
  return gone;
}

void remove_orphan(const fs::path& path, CleanupReport& report) {
  report.bytes_freed += tree_size(path);
  report.removed.push_back(path.string());
  if (report.dry_run) return;
  std::error_code ec;
  fs::remove_all(path, ec);
  if (ec) throw IoError(path.string(), ec.value(), "remove orphan");
}

// Verifies one model completely; never throws for problems inside the model.
ModelVerification verify_model(const StorageDirectory& storage, const std::string& model_id) {
  ModelVerification result;
  result.model = model_id;
  try {
    const StoreReader reader = StoreReader::open(storage, model_id);
    const Manifest& manifest = reader.manifest();
    result.tensors = manifest.tensors.size();
    FingerprintBuilder fingerprint;
    std::vector<std::byte> stored;
    std::vector<std::byte> raw;
    std::vector<std::byte> scratch;
    uint64_t expected_cursor = 0;  // end of the previous region: everything between regions must be zero
    auto check_padding = [&](uint64_t from, uint64_t to) {
      if (to <= from) return;
      std::vector<std::byte> padding(to - from);
      pread_all(reader.data_fd(), padding, from, reader.data_path());
      for (size_t i = 0; i < padding.size(); ++i) {
        if (padding[i] != std::byte{0}) {
          throw FormatError("data.padding", reader.data_path(),
                            "non-zero padding byte at offset " + std::to_string(from + i));
        }
      }
    };
    for (const BlockRecord& block : manifest.blocks) {
      fingerprint.add_block(block.name);
      for (size_t t = block.first_tensor; t < block.first_tensor + block.tensor_count; ++t) {
        const TensorRecord& tensor = manifest.tensors[t];
        fingerprint.add_tensor(tensor.name, dtype_name(tensor.dtype), tensor.shape);
        for (size_t c = 0; c < tensor.chunk_count; ++c) {
          const ChunkRecord& chunk = manifest.chunks[tensor.first_chunk + c];
          check_padding(expected_cursor, chunk.offset);
          expected_cursor = chunk.offset + chunk.stored_size;
          stored.resize(chunk.stored_size);
          raw.resize(chunk.raw_size);
          result.chunks_checked += 1;
          result.bytes_checked += chunk.stored_size;
          try {
            reader.read_stored_chunk(t, c, stored, /*verify_checksum=*/true);
            reader.decode_chunk(t, c, stored, raw, scratch);
            fingerprint.add_bytes(raw);
          } catch (const CorruptionError& error) {
            result.bad_chunks.push_back(
                {model_id, tensor.name, c, chunk.offset, error.what()});
          }
        }
      }
    }
    check_padding(expected_cursor, manifest.data_size);
    if (result.bad_chunks.empty()) {
      const std::string actual = fingerprint.finish();
      if (actual != manifest.fingerprint) {
        result.error = "fingerprint mismatch: manifest says " + manifest.fingerprint + ", content gives " + actual;
      } else if (model_id.rfind("fp-", 0) == 0 && model_id != "fp-" + actual) {
        result.error = "model id " + model_id + " does not match its content fingerprint " + actual;
      }
    } else {
      result.error = std::to_string(result.bad_chunks.size()) + " corrupt chunk(s)";
    }
  } catch (const Error& error) {
    result.error = error.what();
  }
  result.ok = result.error.empty() && result.bad_chunks.empty();
  return result;
}

std::vector<std::string> models_to_visit(const StorageDirectory& storage, const std::optional<std::string>& model) {
  if (model) {
    (void)storage.model_dir(*model);  // validates the id
    return {*model};
  }
  return storage.list_models();
}

// The data file rewritten with blocks in `order` (indices into manifest.blocks), stored bytes copied verbatim and
// checksums re-bound to their new offsets. Every chunk is verified on the way: defragmentation never launders
// corrupt data into a fresh checksum.
void rewrite_model(const StorageDirectory& storage, const StoreReader& reader, const std::vector<size_t>& order) {
  const Manifest& old_manifest = reader.manifest();
  Manifest manifest;
  manifest.store_id = old_manifest.store_id;
  manifest.model_id = old_manifest.model_id;
  manifest.fingerprint = old_manifest.fingerprint;  // block order does not enter the fingerprint
  manifest.chunk_size = old_manifest.chunk_size;
  manifest.metadata = old_manifest.metadata;

  TempModelDir temp = storage.make_temp_dir(old_manifest.model_id);
  const std::string data_path = (temp.path() / "data").string();
  UniqueFd data_fd = open_file(data_path, O_WRONLY | O_CREAT | O_EXCL, 0644);
  std::vector<std::byte> stored;
  uint64_t cursor = 0;
  for (size_t old_block_index : order) {
    const BlockRecord& old_block = old_manifest.blocks[old_block_index];
    cursor = align_up(cursor, kBlockAlignment);
    BlockRecord block;
    block.name = old_block.name;
    block.offset = cursor;
    block.first_tensor = manifest.tensors.size();
    block.tensor_count = old_block.tensor_count;
    for (size_t t = old_block.first_tensor; t < old_block.first_tensor + old_block.tensor_count; ++t) {
      TensorRecord tensor = old_manifest.tensors[t];
      tensor.block = static_cast<uint32_t>(manifest.blocks.size());
      tensor.first_chunk = manifest.chunks.size();
      const uint64_t new_tensor_index = manifest.tensors.size();
      cursor = align_up(cursor, kTensorAlignment);
      for (size_t c = 0; c < tensor.chunk_count; ++c) {
        ChunkRecord chunk = old_manifest.chunks[old_manifest.tensors[t].first_chunk + c];
        stored.resize(chunk.stored_size);
        reader.read_stored_chunk(t, c, stored, /*verify_checksum=*/true);
        chunk.offset = cursor;
        chunk.checksum = chunk_checksum({manifest.store_id, new_tensor_index, c, cursor}, stored);
        pwrite_all(data_fd.get(), stored, cursor, data_path);
        cursor += stored.size();
        manifest.chunks.push_back(chunk);
      }
      manifest.tensors.push_back(std::move(tensor));
    }
    manifest.blocks.push_back(std::move(block));
  }
  manifest.data_size = cursor == 0 ? 0 : align_up(cursor, kBlockAlignment);
  if (::ftruncate(data_fd.get(), static_cast<off_t>(manifest.data_size)) != 0) throw_errno(data_path, "truncate");
  if (::fsync(data_fd.get()) != 0) throw_errno(data_path, "fsync");
  data_fd.reset();
  compute_derived_fields(manifest);
  write_file_durably(temp.path() / "manifest", serialize_manifest(manifest));
  // The recorded order stays valid for the rewritten model.
  const fs::path order_file = storage.model_dir(manifest.model_id) / kExecutionOrderFile;
  std::error_code ec;
  if (fs::exists(order_file, ec)) {
    fs::copy_file(order_file, temp.path() / kExecutionOrderFile, ec);
    if (ec) throw IoError(order_file.string(), ec.value(), "copy execution order");
    fsync_path(temp.path() / kExecutionOrderFile);
  }
  storage.publish(temp, manifest.model_id, PublishMode::kReplace);
}
}  // namespace

VerifyReport verify_storage(const fs::path& root, const std::optional<std::string>& model) {
  const StorageDirectory storage = StorageDirectory::open_existing(root);
  VerifyReport report;
  for (const std::string& model_id : models_to_visit(storage, model)) {
    // A directory without a manifest is not a model but debris; it is listed under orphans below.
    if (!model && !storage.has_model(model_id)) continue;
    report.models.push_back(verify_model(storage, model_id));
  }
  report.orphans = cleanup_orphans(root, /*dry_run=*/true).removed;
  report.ok = std::all_of(report.models.begin(), report.models.end(), [](const auto& m) { return m.ok; });
  return report;
}

CleanupReport cleanup_orphans(const fs::path& root, bool dry_run) {
  const StorageDirectory storage = StorageDirectory::open_existing(root);
  CleanupReport report;
  report.dry_run = dry_run;
  std::error_code ec;
  std::vector<fs::path> tmp_entries;
  for (const auto& entry : fs::directory_iterator(storage.tmp_dir(), ec)) tmp_entries.push_back(entry.path());
  if (ec) throw IoError(storage.tmp_dir().string(), ec.value(), "list");
  std::sort(tmp_entries.begin(), tmp_entries.end());
  for (const fs::path& path : tmp_entries) {
    std::error_code type_ec;
    if (fs::is_directory(fs::symlink_status(path, type_ec))) {
      if (writer_is_gone(path)) {
        remove_orphan(path, report);
      } else {
        report.kept_in_use.push_back(path.string());
      }
    } else {
      const auto age = fs::file_time_type::clock::now() - fs::last_write_time(path, type_ec);
      if (type_ec || age > kLooseTempFileMaxAge) remove_orphan(path, report);
    }
  }

  for (const std::string& model_id : storage.list_models()) {
    const fs::path dir = storage.model_dir(model_id);
    if (!fs::exists(dir / "manifest", ec)) {
      remove_orphan(dir, report);  // publishing is atomic, so a model directory without a manifest is debris
      continue;
    }
    std::vector<fs::path> strays;
    for (const auto& entry : fs::directory_iterator(dir, ec)) {
      if (kModelFiles.count(entry.path().filename().string()) == 0) strays.push_back(entry.path());
    }
    std::sort(strays.begin(), strays.end());
    for (const fs::path& stray : strays) remove_orphan(stray, report);
  }
  return report;
}

DefragReport defragment(const fs::path& root, const std::optional<std::string>& model) {
  const StorageDirectory storage = StorageDirectory::open_existing(root);
  DefragReport report;
  for (const std::string& model_id : models_to_visit(storage, model)) {
    ModelDefrag result;
    result.model = model_id;
    try {
      const ModelLock lock = storage.lock_model(model_id);  // two defrags of one model would only duplicate work
      const StoreReader reader = StoreReader::open(storage, model_id);
      const Manifest& manifest = reader.manifest();
      result.bytes_before = manifest.data_size;
      result.bytes_after = manifest.data_size;
      const auto recorded = read_execution_order(root, model_id);
      std::vector<size_t> order;
      std::vector<bool> placed(manifest.blocks.size(), false);
      if (recorded) {
        for (const std::string& name : *recorded) {
          const auto index = reader.find_block(name);
          if (index && !placed[*index]) {
            order.push_back(*index);
            placed[*index] = true;
          }
        }
      }
      for (size_t i = 0; i < manifest.blocks.size(); ++i) {
        if (!placed[i]) order.push_back(i);  // blocks the run never used keep their relative order, at the end
      }
      bool in_order = true;
      for (size_t i = 0; i < order.size(); ++i) in_order = in_order && order[i] == i;
      if (in_order) {
        result.reason = recorded ? "already in execution order; no dead space (the format allows none)"
                                 : "no recorded execution order; no dead space (the format allows none)";
      } else {
        rewrite_model(storage, reader, order);
        const StoreReader rewritten = StoreReader::open(storage, model_id);
        result.bytes_after = rewritten.manifest().data_size;
        result.rewritten = true;
        result.reason = "blocks rewritten in recorded execution order";
      }
    } catch (const Error& error) {
      result.reason = std::string("not rewritten: ") + error.what();
    }
    report.models.push_back(std::move(result));
  }
  return report;
}

void write_execution_order(const fs::path& root, const std::string& model,
                           const std::vector<std::string>& block_names) {
  const StorageDirectory storage = StorageDirectory::open_existing(root);
  const fs::path dir = storage.model_dir(model);
  const StoreReader reader = StoreReader::open(storage, model);
  std::set<std::string> seen;
  std::string text;
  for (const std::string& name : block_names) {
    if (!reader.find_block(name)) {
      throw ConfigError("execution order", "'" + name + "' is not a block of model '" + model + "'");
    }
    if (!seen.insert(name).second) throw ConfigError("execution order", "block '" + name + "' appears twice");
    text += name + "\n";
  }
  // Written beside the model and renamed over the old file: a reader sees the old order or the new one.
  const fs::path temp = dir / (std::string(kExecutionOrderFile) + ".tmp." + std::to_string(::getpid()));
  write_file_durably(temp, std::as_bytes(std::span(text.data(), text.size())), /*replace_existing=*/true);
  if (::rename(temp.c_str(), (dir / kExecutionOrderFile).c_str()) != 0) throw_errno(temp.string(), "rename");
  fsync_path(dir);
}

std::optional<std::vector<std::string>> read_execution_order(const fs::path& root, const std::string& model) {
  if (!is_valid_model_id(model)) {
    throw ConfigError("model_id", "'" + model + "' is not a valid model id");  // never a path outside models/
  }
  const fs::path path = root / "models" / model / kExecutionOrderFile;
  std::vector<std::byte> bytes;
  try {
    bytes = read_whole_file(path, 64ull << 20);
  } catch (const IoError&) {
    return std::nullopt;  // absent or unreadable: the order is only a hint
  }
  std::vector<std::string> names;
  std::set<std::string> seen;
  std::string current;
  for (std::byte b : bytes) {
    const char c = static_cast<char>(b);
    if (c != '\n') {
      current += c;
      continue;
    }
    if (current.empty() || !seen.insert(current).second) return std::nullopt;  // malformed: ignored
    names.push_back(std::move(current));
    current.clear();
  }
  if (!current.empty()) return std::nullopt;  // last line not terminated: a torn write
  return names;
}

}  // namespace tensorstream
