// Storage directory, writer, reader and fingerprint. Memory crosses the boundary as (address, size) pairs that the
// Python side takes from torch tensors it keeps alive for the call; every call that touches file bytes releases
// the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <chrono>
#include <map>
#include <cstring>

#include "bindings.hpp"
#include "tensorstream/error.hpp"
#include "tensorstream/format/codec.hpp"
#include "tensorstream/store/storage_directory.hpp"
#include "tensorstream/store/store_reader.hpp"
#include "tensorstream/store/store_writer.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace tensorstream::bindings {

namespace {
Dtype parse_dtype(const std::string& name) {
  const auto dtype = dtype_from_name(name);
  if (!dtype) throw ConfigError("dtype", "'" + name + "' is not a dtype a store can hold");
  return *dtype;
}

std::span<std::byte> memory(uintptr_t address, size_t nbytes) {
  if (address == 0 && nbytes != 0) throw ConfigError("address", "null address for a non-empty buffer");
  return {reinterpret_cast<std::byte*>(address), nbytes};
}

const char* outcome_name(PublishOutcome outcome) {
  switch (outcome) {
    case PublishOutcome::kPublished: return "published";
    case PublishOutcome::kReplaced: return "replaced";
    case PublishOutcome::kAlreadyExisted: return "already_existed";
  }
  return "?";
}

nb::dict tensor_info(const Manifest& manifest, size_t index) {
  const TensorRecord& tensor = manifest.tensors[index];
  nb::dict info;
  info["index"] = index;
  info["name"] = tensor.name;
  info["dtype"] = std::string(dtype_name(tensor.dtype));
  info["shape"] = tensor.shape;
  info["nbytes"] = tensor.nbytes;
  info["block"] = tensor.block;
  info["slot_offset"] = tensor.slot_offset;
  uint64_t stored = 0;
  bool all_raw = true;
  for (const ChunkRecord& chunk : manifest.chunks_of(tensor)) {
    stored += chunk.stored_size;
    all_raw = all_raw && chunk.codec == Codec::kRaw;
  }
  info["stored_bytes"] = stored;
  info["chunks"] = tensor.chunk_count;
  info["chunk_size"] = tensor.chunk_size;
  // Raw chunks of a tensor are contiguous, so a raw tensor can be mapped straight from the data file.
  info["raw_file_offset"] = all_raw && tensor.chunk_count > 0
                                ? nb::object(nb::int_(manifest.chunks[tensor.first_chunk].offset))
                                : nb::none();
  return info;
}

// For benchmarks/codecs.py: encodes `bytes` chunk by chunk on this thread, decodes them `repeats` times (best
// time kept), checks the round trip, and reports sizes, codecs used and seconds. Timing in C++ keeps the Python
// call overhead out of per-chunk figures.
struct CodecMeasurement {
  uint64_t raw_bytes = 0;
  uint64_t stored_bytes = 0;
  double encode_s = 0;
  double decode_s = 0;
  std::map<std::string, int64_t> codecs;  // codec name -> chunks
};

CodecMeasurement measure_codec(std::span<const std::byte> bytes, uint32_t shuffle, int level, const std::string& floats,
                       uint64_t chunk_size, int repeats) {
  if (chunk_size == 0) throw ConfigError("chunk_size", "must be positive");
  CompressionChoice choice = compression_for_level(level);
  if (floats == "grouped") {
    choice.floats = FloatCoding::kGrouped;
  } else if (floats == "exponent") {
    choice.floats = FloatCoding::kExponent;
  } else if (floats == "smaller") {
    choice.floats = FloatCoding::kSmaller;
  } else if (floats != "level") {
    throw ConfigError("floats", "'" + floats + "' is not one of level, grouped, exponent, smaller");
  }
  using Clock = std::chrono::steady_clock;
  struct Encoded {
    Codec codec;
    std::vector<std::byte> stored;
  };
  std::vector<Encoded> chunks;
  std::vector<std::byte> scratch;
  CodecMeasurement result;
  const auto encode_start = Clock::now();
  for (uint64_t begin = 0; begin < bytes.size(); begin += chunk_size) {
    const auto raw = bytes.subspan(begin, std::min<uint64_t>(chunk_size, bytes.size() - begin));
    Encoded chunk;
    chunk.codec = compress_chunk(raw, choice, shuffle, chunk.stored, scratch);
    if (chunk.codec == Codec::kRaw) chunk.stored.assign(raw.begin(), raw.end());
    result.stored_bytes += chunk.stored.size();
    chunks.push_back(std::move(chunk));
  }
  result.encode_s = std::chrono::duration<double>(Clock::now() - encode_start).count();
  std::vector<std::byte> out(std::min<uint64_t>(chunk_size, bytes.size()));
  for (int repeat = 0; repeat < std::max(repeats, 1); ++repeat) {
    const auto start = Clock::now();
    uint64_t begin = 0;
    for (const Encoded& chunk : chunks) {
      const auto expected = bytes.subspan(begin, std::min<uint64_t>(chunk_size, bytes.size() - begin));
      const std::span<std::byte> target(out.data(), expected.size());
      if (!decompress_chunk(chunk.stored, chunk.codec, chunk.codec == Codec::kRaw ? 0 : shuffle, target, scratch) ||
          (repeat == 0 && std::memcmp(target.data(), expected.data(), expected.size()) != 0)) {
        throw Error("measure_codec: chunk at " + std::to_string(begin) + " does not round-trip");
      }
      begin += expected.size();
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    result.decode_s = repeat == 0 ? seconds : std::min(result.decode_s, seconds);  // the first pass also compares
  }
  for (const Encoded& chunk : chunks) ++result.codecs[std::string(codec_name(chunk.codec))];
  result.raw_bytes = bytes.size();
  return result;
}

// Python-side handle for a FingerprintBuilder (the C++ type is move-only and not default-copyable).
struct PyFingerprint {
  FingerprintBuilder builder;
};
}  // namespace

void bind_store(nb::module_& m) {
  m.attr("FORMAT_VERSION") = kFormatVersion;
  m.attr("DEFAULT_CHUNK_SIZE") = kDefaultChunkSize;
  m.attr("BLOCK_ALIGNMENT") = kBlockAlignment;
  m.attr("TENSOR_ALIGNMENT") = kTensorAlignment;
  m.def("is_valid_model_id", [](const std::string& id) { return is_valid_model_id(id); });
  m.def("dtype_size", [](const std::string& name) { return dtype_size(parse_dtype(name)); });
  m.def(
      "measure_codec",
      [](uintptr_t address, size_t nbytes, uint32_t shuffle, int level, const std::string& floats,
         uint64_t chunk_size, int repeats) {
        const auto bytes = memory(address, nbytes);
        CodecMeasurement measured;
        {
          nb::gil_scoped_release release;
          measured = measure_codec(bytes, shuffle, level, floats, chunk_size, repeats);
        }
        nb::dict result;
        result["raw_bytes"] = measured.raw_bytes;
        result["stored_bytes"] = measured.stored_bytes;
        result["encode_s"] = measured.encode_s;
        result["decode_s"] = measured.decode_s;
        result["codecs"] = measured.codecs;
        return result;
      },
      "address"_a, "nbytes"_a, "shuffle"_a, "level"_a, "floats"_a = "level", "chunk_size"_a = kDefaultChunkSize,
      "repeats"_a = 3);

  nb::class_<ModelLock>(m, "ModelLock");

  nb::class_<StorageDirectory>(m, "StorageDirectory")
      .def_static("open_or_create", [](const std::string& root) { return StorageDirectory::open_or_create(root); },
                  "root"_a)
      .def_static("open_existing", [](const std::string& root) { return StorageDirectory::open_existing(root); },
                  "root"_a)
      .def_prop_ro("root", [](const StorageDirectory& s) { return s.root().string(); })
      .def_prop_ro("store_id", [](const StorageDirectory& s) { return hex_bytes(s.id()); })
      .def("list_models", &StorageDirectory::list_models)
      .def("has_model", [](const StorageDirectory& s, const std::string& id) { return s.has_model(id); })
      .def("model_dir", [](const StorageDirectory& s, const std::string& id) { return s.model_dir(id).string(); })
      .def("remove_model", [](const StorageDirectory& s, const std::string& id) { s.remove_model(id); })
      .def("lock_model",
           [](const StorageDirectory& s, const std::string& id) { return s.lock_model(id); },
           nb::call_guard<nb::gil_scoped_release>(), "model_id"_a);

  nb::class_<StoreWriter>(m, "StoreWriter")
      .def(
          "__init__",
          [](StoreWriter* self, const StorageDirectory& storage, const std::string& model_id, uint64_t chunk_size,
             int compression_level, bool replace, const std::map<std::string, std::string>& metadata) {
            StoreWriteOptions options;
            options.chunk_size = chunk_size;
            options.compression_level = compression_level;
            options.mode = replace ? PublishMode::kReplace : PublishMode::kKeepExisting;
            options.metadata = metadata;
            new (self) StoreWriter(storage, model_id, std::move(options));
          },
          "storage"_a, "model_id"_a, "chunk_size"_a = kDefaultChunkSize, "compression_level"_a = 0,
          "replace"_a = false, "metadata"_a = std::map<std::string, std::string>{})
      .def("begin_block", &StoreWriter::begin_block, "name"_a)
      .def(
          "add_tensor",
          [](StoreWriter& writer, const std::string& name, const std::string& dtype, const std::vector<int64_t>& shape,
             uintptr_t address, size_t nbytes, uint64_t chunk_size) {
            const Dtype parsed = parse_dtype(dtype);
            const std::span<std::byte> bytes = memory(address, nbytes);
            nb::gil_scoped_release release;
            writer.add_tensor(name, parsed, shape, bytes, chunk_size);
          },
          "name"_a, "dtype"_a, "shape"_a, "address"_a, "nbytes"_a, "chunk_size"_a = 0)
      .def("commit", [](StoreWriter& writer) {
        StoreWriteResult result;
        {
          nb::gil_scoped_release release;
          result = writer.commit();
        }
        nb::dict out;
        out["model_id"] = result.model_id;
        out["fingerprint"] = result.fingerprint;
        out["outcome"] = outcome_name(result.outcome);
        out["raw_bytes"] = result.raw_bytes;
        out["stored_bytes"] = result.stored_bytes;
        return out;
      });

  nb::class_<PyFingerprint>(m, "FingerprintBuilder")
      .def(nb::init<>())
      .def("add_block", [](PyFingerprint& f, const std::string& name) { f.builder.add_block(name); })
      .def("add_tensor", [](PyFingerprint& f, const std::string& name, const std::string& dtype,
                            const std::vector<int64_t>& shape) {
        f.builder.add_tensor(name, dtype_name(parse_dtype(dtype)), shape);
      })
      .def("add_bytes", [](PyFingerprint& f, uintptr_t address, size_t nbytes) {
        const std::span<std::byte> bytes = memory(address, nbytes);
        nb::gil_scoped_release release;
        f.builder.add_bytes(bytes);
      })
      .def("finish", [](const PyFingerprint& f) { return f.builder.finish(); });

  nb::class_<StoreReader>(m, "StoreReader")
      .def_static(
          "open",
          [](const StorageDirectory& storage, const std::string& model_id) {
            nb::gil_scoped_release release;
            return StoreReader::open(storage, model_id);
          },
          "storage"_a, "model_id"_a)
      .def_prop_ro("model_id", [](const StoreReader& r) { return r.manifest().model_id; })
      .def_prop_ro("fingerprint", [](const StoreReader& r) { return r.manifest().fingerprint; })
      .def_prop_ro("chunk_size", [](const StoreReader& r) { return r.manifest().chunk_size; })
      .def_prop_ro("data_size", [](const StoreReader& r) { return r.manifest().data_size; })
      .def_prop_ro("data_path", &StoreReader::data_path)
      .def_prop_ro("metadata", [](const StoreReader& r) { return r.manifest().metadata; })
      .def_prop_ro("num_tensors", [](const StoreReader& r) { return r.manifest().tensors.size(); })
      .def("tensors", [](const StoreReader& r) {
        nb::list out;
        for (size_t i = 0; i < r.manifest().tensors.size(); ++i) out.append(tensor_info(r.manifest(), i));
        return out;
      })
      .def("blocks", [](const StoreReader& r) {
        nb::list out;
        const Manifest& manifest = r.manifest();
        for (const BlockRecord& block : manifest.blocks) {
          nb::dict info;
          info["name"] = block.name;
          info["offset"] = block.offset;
          info["stored_bytes"] = block.end - block.offset;
          info["slot_size"] = block.slot_size;
          info["all_raw"] = block.all_raw;
          nb::list tensors;
          for (size_t t = block.first_tensor; t < block.first_tensor + block.tensor_count; ++t) tensors.append(t);
          info["tensors"] = tensors;
          out.append(info);
        }
        return out;
      })
      .def("find_tensor", &StoreReader::find_tensor, "name"_a)
      .def("find_block", &StoreReader::find_block, "name"_a)
      .def(
          "read_tensor",
          [](const StoreReader& r, size_t index, uintptr_t address, size_t nbytes, bool verify) {
            const std::span<std::byte> out = memory(address, nbytes);
            nb::gil_scoped_release release;
            r.read_tensor(index, out, verify);
          },
          "index"_a, "address"_a, "nbytes"_a, "verify_checksums"_a = true)
      .def(
          "read_block",
          [](const StoreReader& r, size_t index, uintptr_t address, size_t nbytes, bool verify) {
            const std::span<std::byte> out = memory(address, nbytes);
            nb::gil_scoped_release release;
            r.read_block(index, out, verify);
          },
          "index"_a, "address"_a, "nbytes"_a, "verify_checksums"_a = true)
      .def(
          "read_rows",
          [](const StoreReader& r, size_t index, uint64_t row_bytes, uintptr_t rows_address, size_t row_count,
             uintptr_t address, size_t nbytes, bool verify) {
            // rows: `row_count` int64 values (sorted, unique) at `rows_address`; returns the stored bytes read.
            size_t rows_nbytes = 0;
            if (__builtin_mul_overflow(row_count, sizeof(int64_t), &rows_nbytes)) {
              throw ConfigError("rows", "too many rows");
            }
            const std::span<std::byte> row_memory = memory(rows_address, rows_nbytes);
            const std::span<const int64_t> rows(reinterpret_cast<const int64_t*>(row_memory.data()), row_count);
            const std::span<std::byte> out = memory(address, nbytes);
            nb::gil_scoped_release release;
            return r.read_rows(index, row_bytes, rows, out, verify);
          },
          "index"_a, "row_bytes"_a, "rows_address"_a, "row_count"_a, "address"_a, "nbytes"_a,
          "verify_checksums"_a = true);
}

}  // namespace tensorstream::bindings
