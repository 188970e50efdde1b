#include "tensorstream/store/store_reader.hpp"

#include <fcntl.h>

#include <algorithm>
#include <cerrno>

#include "tensorstream/error.hpp"

namespace tensorstream {

namespace {
// Per-thread buffers for compressed chunks: reads from many threads never share or reallocate them per call.
std::vector<std::byte>& stored_buffer() {
  thread_local std::vector<std::byte> buffer;
  return buffer;
}
std::vector<std::byte>& scratch_buffer() {
  thread_local std::vector<std::byte> buffer;
  return buffer;
}
std::vector<std::byte>& decoded_buffer() {
  thread_local std::vector<std::byte> buffer;
  return buffer;
}
}  // namespace

StoreReader StoreReader::open(const StorageDirectory& storage, std::string_view model_id) {
  const std::filesystem::path dir = storage.model_dir(model_id);
  const std::string manifest_path = (dir / "manifest").string();
  StoreReader reader;
  reader.data_path_ = (dir / "data").string();

  // Both files are opened relative to one descriptor of the model directory, so a concurrent replace (which swaps
  // whole directories) can never pair the old manifest with the new data file.
  UniqueFd dir_fd;
  try {
    dir_fd = open_file(dir, O_RDONLY | O_DIRECTORY);
  } catch (const IoError& error) {
    if (error.errno_value() == ENOENT) {
      throw IoError(dir.string(), ENOENT,
                    "open model '" + std::string(model_id) + "' in '" + storage.root().string() + "' (no such model)");
    }
    throw;
  }
  auto open_member = [&](const char* name, const std::string& path) {
    const int fd = ::openat(dir_fd.get(), name, O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw_errno(path, "open");
    return UniqueFd(fd);
  };
  UniqueFd manifest_fd = open_member("manifest", manifest_path);
  reader.data_fd_ = open_member("data", reader.data_path_);

  // Header first: the JSON length is validated against the file size before a buffer is allocated for it.
  const uint64_t manifest_size = file_size(manifest_fd.get(), manifest_path);
  std::vector<std::byte> header(std::min<uint64_t>(manifest_size, kManifestHeaderSize));
  pread_all(manifest_fd.get(), header, 0, manifest_path);
  const ManifestHeader parsed_header = parse_manifest_header(header, manifest_size, manifest_path);
  std::vector<std::byte> json(parsed_header.json_length);
  pread_all(manifest_fd.get(), json, kManifestHeaderSize, manifest_path);

  ManifestExpectations expect;
  expect.path = manifest_path;
  expect.store_id = storage.id();
  expect.model_id = std::string(model_id);
  expect.data_file_size = file_size(reader.data_fd_.get(), reader.data_path_);
  expect.data_path = reader.data_path_;
  reader.manifest_ = parse_manifest_body(json, parsed_header, expect);

  for (size_t i = 0; i < reader.manifest_.blocks.size(); ++i) reader.block_index_.emplace(reader.manifest_.blocks[i].name, i);
  for (size_t i = 0; i < reader.manifest_.tensors.size(); ++i) {
    reader.tensor_index_.emplace(reader.manifest_.tensors[i].name, i);
  }
  return reader;
}

std::optional<size_t> StoreReader::find_block(std::string_view name) const {
  const auto it = block_index_.find(name);
  return it == block_index_.end() ? std::nullopt : std::optional(it->second);
}

std::optional<size_t> StoreReader::find_tensor(std::string_view name) const {
  const auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? std::nullopt : std::optional(it->second);
}

CorruptionSite StoreReader::site(size_t tensor_index, size_t chunk_in_tensor) const {
  const TensorRecord& tensor = manifest_.tensors[tensor_index];
  return CorruptionSite{data_path_, manifest_.model_id, tensor.name, chunk_in_tensor,
                        manifest_.chunks[tensor.first_chunk + chunk_in_tensor].offset};
}

void StoreReader::check_chunk(size_t tensor_index, size_t chunk_in_tensor, std::span<const std::byte> stored) const {
  const TensorRecord& tensor = manifest_.tensors[tensor_index];
  const ChunkRecord& chunk = manifest_.chunks[tensor.first_chunk + chunk_in_tensor];
  const uint64_t actual = chunk_checksum({manifest_.store_id, tensor_index, chunk_in_tensor, chunk.offset}, stored);
  if (actual != chunk.checksum) {
    throw CorruptionError(site(tensor_index, chunk_in_tensor),
                          "checksum mismatch (stored " + hex64(chunk.checksum) + ", computed " + hex64(actual) + ")");
  }
}

void StoreReader::decode_chunk(size_t tensor_index, size_t chunk_in_tensor, std::span<const std::byte> stored,
                               std::span<std::byte> out, std::vector<std::byte>& scratch) const {
  const TensorRecord& tensor = manifest_.tensors[tensor_index];
  const ChunkRecord& chunk = manifest_.chunks[tensor.first_chunk + chunk_in_tensor];
  if (!decompress_chunk(stored, chunk.codec, chunk.shuffle, out, scratch)) {
    throw CorruptionError(site(tensor_index, chunk_in_tensor),
                          std::string(codec_name(chunk.codec)) + " data does not decode to exactly " +
                              std::to_string(out.size()) + " bytes");
  }
}

void StoreReader::read_stored_chunk(size_t tensor_index, size_t chunk_in_tensor, std::span<std::byte> out,
                                    bool verify_checksum) const {
  const TensorRecord& tensor = manifest_.tensors[tensor_index];
  const ChunkRecord& chunk = manifest_.chunks[tensor.first_chunk + chunk_in_tensor];
  if (out.size() != chunk.stored_size) throw ConfigError("out", "buffer size differs from the chunk's stored size");
  pread_all(data_fd_.get(), out, chunk.offset, data_path_);
  if (verify_checksum) check_chunk(tensor_index, chunk_in_tensor, out);
}

void StoreReader::read_tensor_chunks(size_t index, std::span<std::byte> out, bool verify) const {
  const TensorRecord& tensor = manifest_.tensors[index];
  uint64_t raw_offset = 0;
  for (size_t c = 0; c < tensor.chunk_count; ++c) {
    const ChunkRecord& chunk = manifest_.chunks[tensor.first_chunk + c];
    const std::span<std::byte> target = out.subspan(raw_offset, chunk.raw_size);
    if (chunk.codec == Codec::kRaw) {
      // Raw bytes land in the caller's memory directly; a bad checksum throws before the caller sees them.
      read_stored_chunk(index, c, target, verify);
    } else {
      std::vector<std::byte>& stored = stored_buffer();
      stored.resize(chunk.stored_size);
      read_stored_chunk(index, c, stored, verify);
      decode_chunk(index, c, stored, target, scratch_buffer());
    }
    raw_offset += chunk.raw_size;
  }
}

void StoreReader::read_tensor(size_t index, std::span<std::byte> out, bool verify_checksums) const {
  if (index >= manifest_.tensors.size()) throw ConfigError("tensor", "index " + std::to_string(index) + " out of range");
  const TensorRecord& tensor = manifest_.tensors[index];
  if (out.size() != tensor.nbytes) {
    throw ConfigError("out", "buffer of " + std::to_string(out.size()) + " bytes for tensor '" + tensor.name +
                                 "' of " + std::to_string(tensor.nbytes) + " bytes");
  }
  read_tensor_chunks(index, out, verify_checksums);
}

void StoreReader::read_block(size_t index, std::span<std::byte> slot, bool verify_checksums) const {
  if (index >= manifest_.blocks.size()) throw ConfigError("block", "index " + std::to_string(index) + " out of range");
  const BlockRecord& block = manifest_.blocks[index];
  if (slot.size() < block.slot_size) {
    throw ConfigError("slot", "slot of " + std::to_string(slot.size()) + " bytes for block '" + block.name +
                                  "' of " + std::to_string(block.slot_size) + " bytes");
  }
  if (block.all_raw) {
    // The on-disk region is the slot layout (docs/format.md §5): one read, then checksums in place.
    pread_all(data_fd_.get(), slot.first(block.end - block.offset), block.offset, data_path_);
    if (!verify_checksums) return;
    for (size_t t = block.first_tensor; t < block.first_tensor + block.tensor_count; ++t) {
      const TensorRecord& tensor = manifest_.tensors[t];
      for (size_t c = 0; c < tensor.chunk_count; ++c) {
        const ChunkRecord& chunk = manifest_.chunks[tensor.first_chunk + c];
        check_chunk(t, c, slot.subspan(chunk.offset - block.offset, chunk.stored_size));
      }
    }
    return;
  }
  for (size_t t = block.first_tensor; t < block.first_tensor + block.tensor_count; ++t) {
    const TensorRecord& tensor = manifest_.tensors[t];
    read_tensor_chunks(t, slot.subspan(tensor.slot_offset, tensor.nbytes), verify_checksums);
  }
}

uint64_t StoreReader::read_rows(size_t tensor_index, uint64_t row_bytes, std::span<const int64_t> rows,
                                std::span<std::byte> out, bool verify_checksums) const {
  if (tensor_index >= manifest_.tensors.size()) {
    throw ConfigError("tensor", "index " + std::to_string(tensor_index) + " out of range");
  }
  const TensorRecord& tensor = manifest_.tensors[tensor_index];
  if (row_bytes == 0 || tensor.nbytes % row_bytes != 0) {
    throw ConfigError("row_bytes", std::to_string(row_bytes) + " bytes per row do not divide tensor '" + tensor.name +
                                       "' of " + std::to_string(tensor.nbytes) + " bytes");
  }
  const uint64_t row_count = tensor.nbytes / row_bytes;
  uint64_t wanted = 0;
  if (__builtin_mul_overflow(static_cast<uint64_t>(rows.size()), row_bytes, &wanted) || wanted != out.size()) {
    throw ConfigError("out", "buffer of " + std::to_string(out.size()) + " bytes for " + std::to_string(rows.size()) +
                                 " rows of " + std::to_string(row_bytes) + " bytes of tensor '" + tensor.name + "'");
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i] < 0 || static_cast<uint64_t>(rows[i]) >= row_count) {
      throw ConfigError("rows", "row " + std::to_string(rows[i]) + " of tensor '" + tensor.name +
                                    "' is out of range (it has " + std::to_string(row_count) + " rows)");
    }
    if (i > 0 && rows[i] <= rows[i - 1]) {
      throw ConfigError("rows", "rows of tensor '" + tensor.name + "' must be sorted and unique (" +
                                    std::to_string(rows[i - 1]) + " then " + std::to_string(rows[i]) + ")");
    }
  }
  // Every product below is at most tensor.nbytes (row < row_count, row_count * row_bytes == nbytes): no overflow.
  const auto row_begin = [&](size_t k) { return static_cast<uint64_t>(rows[k]) * row_bytes; };
  uint64_t stored_read = 0;
  size_t next = 0;           // first requested row not yet wholly copied
  uint64_t chunk_begin = 0;  // raw offset of chunk c in the tensor
  for (size_t c = 0; c < tensor.chunk_count && next < rows.size(); ++c) {
    const ChunkRecord& chunk = manifest_.chunks[tensor.first_chunk + c];
    const uint64_t chunk_end = chunk_begin + chunk.raw_size;
    while (next < rows.size() && row_begin(next) + row_bytes <= chunk_begin) ++next;
    if (next == rows.size()) break;
    if (row_begin(next) >= chunk_end) {  // no requested row in this chunk: never read
      chunk_begin = chunk_end;
      continue;
    }
    const bool direct = chunk.codec == Codec::kRaw && !verify_checksums;
    std::span<const std::byte> raw;
    if (!direct) {
      std::vector<std::byte>& decoded = decoded_buffer();
      decoded.resize(chunk.raw_size);
      if (chunk.codec == Codec::kRaw) {
        read_stored_chunk(tensor_index, c, decoded, verify_checksums);
      } else {
        std::vector<std::byte>& stored = stored_buffer();
        stored.resize(chunk.stored_size);
        read_stored_chunk(tensor_index, c, stored, verify_checksums);
        decode_chunk(tensor_index, c, stored, decoded, scratch_buffer());
      }
      stored_read += chunk.stored_size;
      raw = decoded;
    }
    // The parts of rows next, next+1, ... that lie in this chunk; a run of adjacent rows is one copy (or one read).
    size_t k = next;
    while (k < rows.size() && row_begin(k) < chunk_end) {
      const uint64_t seg_begin = std::max(row_begin(k), chunk_begin);
      size_t last = k;
      while (last + 1 < rows.size() && rows[last + 1] == rows[last] + 1 && row_begin(last + 1) < chunk_end) ++last;
      const uint64_t seg_end = std::min(row_begin(last) + row_bytes, chunk_end);
      const uint64_t length = seg_end - seg_begin;
      const std::span<std::byte> target = out.subspan(k * row_bytes + (seg_begin - row_begin(k)), length);
      if (direct) {
        pread_all(data_fd_.get(), target, chunk.offset + (seg_begin - chunk_begin), data_path_);
        stored_read += length;
      } else {
        std::copy_n(raw.data() + (seg_begin - chunk_begin), length, target.data());
      }
      k = last + 1;
    }
    chunk_begin = chunk_end;
  }
  return stored_read;
}

}  // namespace tensorstream
