#include "tensorstream/format/manifest.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cstring>
#include <unordered_map>
#include <utility>

#include "tensorstream/error.hpp"

namespace tensorstream {

namespace {

using Json = nlohmann::json;

constexpr std::array<char, 8> kManifestMagic = {'T', 'S', 'M', 'A', 'N', 'I', 'F', '\0'};
// Depth as nlohmann counts it: the top-level value is at depth 0 and the schema's deepest containers (chunk
// objects) sit at depth 6. Scalars are leaves and cannot nest further, so only containers are limited.
constexpr int kMaxJsonDepth = 6;
constexpr size_t kMaxMetadataKeyBytes = 1024;
constexpr size_t kMaxModelIdBytes = 128;
// Names in error messages are cut here: a 64 MiB name must not become a 64 MiB exception message.
constexpr size_t kMaxQuotedBytes = 96;
// Path reported by errors about manifests that exist only in memory (writers).
constexpr const char* kInMemoryPath = "(manifest in memory)";

[[noreturn]] void fail(const char* rule, const std::string& path, const std::string& detail) {
  throw FormatError(rule, path, detail);
}

// Quotes untrusted text for an error message: bounded length, cut on a UTF-8 boundary, control bytes escaped,
// so the message stays valid UTF-8 (it may end up in a Python exception).
std::string quote(std::string_view text) {
  size_t keep = text.size();
  bool cut = false;
  if (keep > kMaxQuotedBytes) {
    keep = kMaxQuotedBytes;
    while (keep > 0 && (static_cast<unsigned char>(text[keep]) & 0xC0) == 0x80) --keep;
    cut = true;
  }
  std::string out = "'";
  for (size_t i = 0; i < keep; ++i) {
    const auto byte = static_cast<unsigned char>(text[i]);
    if (byte < 0x20 || byte == 0x7F || byte == '\\' || byte == '\'') {
      static constexpr char kDigits[] = "0123456789abcdef";
      if (byte == '\\' || byte == '\'') {
        out += '\\';
        out += static_cast<char>(byte);
      } else {
        out += "\\x";
        out += kDigits[byte >> 4];
        out += kDigits[byte & 0xF];
      }
    } else {
      out += static_cast<char>(byte);
    }
  }
  out += '\'';
  if (cut) out += "... (" + std::to_string(text.size()) + " bytes)";
  return out;
}

uint32_t load_le32(const std::byte* bytes) noexcept {
  uint32_t value = 0;
  for (int i = 3; i >= 0; --i) value = (value << 8) | static_cast<uint32_t>(bytes[i]);
  return value;
}

uint64_t load_le64(const std::byte* bytes) noexcept {
  uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | static_cast<uint64_t>(bytes[i]);
  return value;
}

void store_le32(std::byte* out, uint32_t value) noexcept {
  for (int i = 0; i < 4; ++i) out[i] = static_cast<std::byte>(value >> (8 * i));
}

void store_le64(std::byte* out, uint64_t value) noexcept {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<std::byte>(value >> (8 * i));
}

[[nodiscard]] bool checked_align(uint64_t value, uint64_t alignment, uint64_t& out) noexcept {
  uint64_t bumped = 0;
  if (__builtin_add_overflow(value, alignment - 1, &bumped)) return false;
  out = bumped / alignment * alignment;
  return true;
}

// nbytes = product(shape) * element size. The product is evaluated as exact arithmetic would: a zero dimension
// makes it 0 whatever the others are, so the result does not depend on the order of the dimensions.
// Returns an empty string on success, else why the shape breaks tensor.size.
std::string compute_nbytes(std::span<const int64_t> shape, uint32_t element_size, uint64_t& nbytes) {
  bool any_zero = false;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0 || static_cast<uint64_t>(shape[i]) > kMaxTensorBytes) {
      return "dimension " + std::to_string(i) + " is " + std::to_string(shape[i]) + ", outside [0, 2^48]";
    }
    if (shape[i] == 0) any_zero = true;
  }
  if (any_zero) {
    nbytes = 0;
    return {};
  }
  uint64_t product = element_size;
  for (const int64_t dim : shape) {
    if (__builtin_mul_overflow(product, static_cast<uint64_t>(dim), &product)) {
      return "the product of the shape and the element size overflows 64 bits";
    }
  }
  if (product > kMaxTensorBytes) return "nbytes is " + std::to_string(product) + ", above the limit 2^48";
  nbytes = product;
  return {};
}

uint64_t expected_chunk_count(uint64_t nbytes, uint64_t chunk_size) noexcept {
  return nbytes == 0 ? 0 : (nbytes - 1) / chunk_size + 1;
}

// Raw bytes held by chunk `index` of a tensor; 0 for a chunk past the end (only a broken writer makes one).
uint64_t chunk_raw_size(uint64_t nbytes, uint64_t chunk_size, uint64_t index) noexcept {
  uint64_t start = 0;
  if (__builtin_mul_overflow(index, chunk_size, &start) || start >= nbytes) return 0;
  return std::min(chunk_size, nbytes - start);
}

// ---- JSON syntax: manifest.json, manifest.depth, manifest.duplicate_key ----------------------------------------

// Builds the document from nlohmann's SAX events, refusing duplicate keys (nlohmann's own DOM builder keeps the
// last one silently) and containers nested too deep, the moment they appear. nlohmann's callback-based DOM
// builder could do the same checks, but after every object it rescans the whole parent container for discarded
// values, so an array of n objects costs O(n^2): minutes for a hostile 40 MB manifest.
class StrictJsonBuilder final : public nlohmann::json_sax<Json> {
 public:
  explicit StrictJsonBuilder(const std::string& path) : path_(path) {}

  [[nodiscard]] Json take() { return std::move(root_); }

  bool null() override { return add(Json(nullptr)) != nullptr; }
  bool boolean(bool value) override { return add(Json(value)) != nullptr; }
  bool number_integer(number_integer_t value) override { return add(Json(value)) != nullptr; }
  bool number_unsigned(number_unsigned_t value) override { return add(Json(value)) != nullptr; }
  bool number_float(number_float_t value, const string_t& /*text*/) override { return add(Json(value)) != nullptr; }
  bool string(string_t& value) override { return add(Json(std::move(value))) != nullptr; }
  bool binary(binary_t& value) override { return add(Json(std::move(value))) != nullptr; }
  bool start_object(std::size_t /*elements*/) override { return open(Json::value_t::object); }
  bool start_array(std::size_t /*elements*/) override { return open(Json::value_t::array); }
  bool end_object() override { return close(); }
  bool end_array() override { return close(); }

  bool key(string_t& key) override {
    Frame& top = stack_.back();
    // Keys enter the object with their values, and a value always arrives before the next key, so the object
    // itself holds every key seen so far.
    if (top.value->contains(key)) {
      fail("manifest.duplicate_key", path_,
           "key " + quote(key) + " appears twice in the object at " + describe_position(stack_.size() - 1));
    }
    top.pending_key = std::move(key);
    return true;
  }

  bool parse_error(std::size_t position, const std::string& /*last_token*/, const Json::exception& error) override {
    // Includes nlohmann's out_of_range for numbers like 1e999 that no double holds.
    fail("manifest.json", path_,
         "the JSON does not parse (near byte " + std::to_string(position) + "): " + error.what());
  }

 private:
  struct Frame {
    Json* value = nullptr;                  // the open object or array
    std::string pending_key;                // objects: the key whose value comes next
    const std::string* child_key = nullptr;  // objects: the key of the newest member
  };

  Json* add(Json&& value) {
    if (stack_.empty()) {
      root_ = std::move(value);
      return &root_;
    }
    Frame& top = stack_.back();
    if (top.value->is_array()) {
      auto& array = top.value->get_ref<Json::array_t&>();
      array.push_back(std::move(value));
      return &array.back();  // stable: nothing is appended to this array until the new value is closed
    }
    auto& object = top.value->get_ref<Json::object_t&>();
    const auto [it, inserted] = object.emplace(std::move(top.pending_key), std::move(value));
    top.child_key = &it->first;
    return &it->second;
  }

  bool open(Json::value_t type) {
    // nlohmann's depth: the top-level value is at 0, and the schema's chunk objects sit at 6.
    const size_t depth = stack_.size();
    if (depth > kMaxJsonDepth) {
      fail("manifest.depth", path_,
           std::string(type == Json::value_t::object ? "an object" : "an array") + " inside " +
               describe_position(depth - 1) + " nests " + std::to_string(depth) + " levels deep; the limit is " +
               std::to_string(kMaxJsonDepth));
    }
    stack_.push_back(Frame{add(Json(type)), {}, nullptr});
    return true;
  }

  bool close() {
    stack_.pop_back();
    return true;
  }

  // Where the container stack_[index] sits (e.g. "blocks[1].tensors[0]"); each parent knows its newest child.
  [[nodiscard]] std::string describe_position(size_t index) const {
    std::string where;
    for (size_t i = 0; i < index && i < stack_.size(); ++i) {
      const Frame& parent = stack_[i];
      if (parent.value->is_object()) {
        const std::string& key = parent.child_key != nullptr ? *parent.child_key : parent.pending_key;
        const bool plain = !key.empty() && key.size() <= 64 && std::all_of(key.begin(), key.end(), [](char c) {
          return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
        });
        where += (where.empty() ? "" : ".") + (plain ? key : quote(key));
      } else {
        where += "[" + std::to_string(parent.value->size() - 1) + "]";
      }
    }
    return where.empty() ? "the top level" : where;
  }

  const std::string& path_;
  Json root_;
  std::vector<Frame> stack_;
};

Json parse_json_text(std::span<const std::byte> bytes, const std::string& path) {
  StrictJsonBuilder builder(path);
  const char* begin = reinterpret_cast<const char*>(bytes.data());
  // strict: the document is one value and nothing follows it; comments are not JSON.
  if (!Json::sax_parse(begin, begin + bytes.size(), &builder, nlohmann::json::input_format_t::json,
                       /*strict=*/true, /*ignore_comments=*/false)) {
    fail("manifest.json", path, "the JSON does not parse");  // parse_error() throws first; kept for safety
  }
  return builder.take();
}

// ---- manifest.schema -------------------------------------------------------------------------------------------

enum class JsonKind { kString, kInteger, kObject, kArray };

struct FieldSpec {
  const char* key;
  JsonKind kind;
};

constexpr std::array<FieldSpec, 7> kTopFields = {{{"store_id", JsonKind::kString},
                                                  {"model_id", JsonKind::kString},
                                                  {"fingerprint", JsonKind::kString},
                                                  {"chunk_size", JsonKind::kInteger},
                                                  {"data_size", JsonKind::kInteger},
                                                  {"metadata", JsonKind::kObject},
                                                  {"blocks", JsonKind::kArray}}};
constexpr std::array<FieldSpec, 3> kBlockFields = {
    {{"name", JsonKind::kString}, {"offset", JsonKind::kInteger}, {"tensors", JsonKind::kArray}}};
constexpr std::array<FieldSpec, 4> kTensorFields = {{{"name", JsonKind::kString},
                                                     {"dtype", JsonKind::kString},
                                                     {"shape", JsonKind::kArray},
                                                     {"chunks", JsonKind::kArray}}};
// Keys a tensor object may carry in addition (docs/format.md §4).
constexpr std::array<FieldSpec, 1> kTensorOptionalFields = {{{"chunk_size", JsonKind::kInteger}}};
constexpr std::array<FieldSpec, 5> kChunkFields = {{{"offset", JsonKind::kInteger},
                                                    {"size", JsonKind::kInteger},
                                                    {"codec", JsonKind::kString},
                                                    {"shuffle", JsonKind::kInteger},
                                                    {"xxh3", JsonKind::kString}}};

bool has_kind(const Json& value, JsonKind kind) noexcept {
  switch (kind) {
    case JsonKind::kString: return value.is_string();
    case JsonKind::kInteger: return value.is_number_unsigned();  // nlohmann: negative, fraction, exponent, >u64 differ
    case JsonKind::kObject: return value.is_object();
    case JsonKind::kArray: return value.is_array();
  }
  return false;
}

const char* kind_text(JsonKind kind) noexcept {
  switch (kind) {
    case JsonKind::kString: return "a string";
    case JsonKind::kInteger: return "a non-negative integer without fraction or exponent";
    case JsonKind::kObject: return "an object";
    case JsonKind::kArray: return "an array";
  }
  return "?";
}

std::string describe_value(const Json& value) {
  switch (value.type()) {
    case Json::value_t::object: return "an object";
    case Json::value_t::array: return "an array";
    case Json::value_t::string: return "the string " + quote(value.get_ref<const std::string&>());
    case Json::value_t::number_integer: return "the signed integer " + value.dump();
    case Json::value_t::number_unsigned: return "the integer " + value.dump();
    case Json::value_t::number_float: return "the number " + value.dump();
    case Json::value_t::boolean: return value.dump();
    case Json::value_t::null: return "null";
    default: return "an unsupported value";
  }
}

template <typename Where>
void check_kind(const Json& value, JsonKind kind, const Where& where) {
  if (!has_kind(value, kind)) {
    fail("manifest.schema", where.path, where() + " must be " + kind_text(kind) + ", found " + describe_value(value));
  }
}

// Missing keys are reported in the spec's key order, then a wrongly typed optional key, then the first extra key
// (in nlohmann's key order).
template <size_t N, size_t M = 0, typename Where>
void check_object(const Json& value, const std::array<FieldSpec, N>& fields, const Where& where,
                  const std::array<FieldSpec, M>& optional_fields = {}) {
  check_kind(value, JsonKind::kObject, where);
  const auto check_field_kind = [&](const FieldSpec& field, const Json& found) {
    if (!has_kind(found, field.kind)) {
      fail("manifest.schema", where.path,
           where.field(field.key) + " must be " + kind_text(field.kind) + ", found " + describe_value(found));
    }
  };
  for (const FieldSpec& field : fields) {
    const auto it = value.find(field.key);
    if (it == value.end()) {
      fail("manifest.schema", where.path, where() + " lacks the key '" + field.key + "'");
    }
    check_field_kind(field, *it);
  }
  size_t expected_size = N;
  for (const FieldSpec& field : optional_fields) {
    const auto it = value.find(field.key);
    if (it == value.end()) continue;
    check_field_kind(field, *it);
    ++expected_size;
  }
  if (value.size() != expected_size) {
    const auto listed = [](const auto& specs, const std::string& key) {
      return std::any_of(specs.begin(), specs.end(), [&](const FieldSpec& field) { return key == field.key; });
    };
    for (const auto& item : value.items()) {
      if (!listed(fields, item.key()) && !listed(optional_fields, item.key())) {
        fail("manifest.schema", where.path, where() + " has the unexpected key " + quote(item.key()));
      }
    }
  }
}

// Lazily formatted location ("blocks[2].tensors[0].chunks[1]") so the happy path formats nothing.
struct Location {
  const std::string& path;
  size_t block = SIZE_MAX;
  size_t tensor = SIZE_MAX;
  size_t chunk = SIZE_MAX;
  const char* leaf = nullptr;
  size_t leaf_index = SIZE_MAX;

  std::string operator()() const {
    std::string text = block == SIZE_MAX ? std::string() : "blocks[" + std::to_string(block) + "]";
    if (tensor != SIZE_MAX) text += ".tensors[" + std::to_string(tensor) + "]";
    if (chunk != SIZE_MAX) text += ".chunks[" + std::to_string(chunk) + "]";
    if (leaf != nullptr) {
      Location parent = *this;
      parent.leaf = nullptr;
      text = parent.field(leaf);
      if (leaf_index != SIZE_MAX) text += "[" + std::to_string(leaf_index) + "]";
    }
    return text.empty() ? "the top-level value" : text;
  }

  // The location of a key of this object.
  std::string field(const char* key) const {
    if (block == SIZE_MAX) return key;
    return (*this)() + "." + key;
  }
};

void check_schema(const Json& doc, const std::string& path) {
  check_object(doc, kTopFields, Location{path});
  for (const auto& item : doc.at("metadata").items()) {
    if (!item.value().is_string()) {
      fail("manifest.schema", path,
           "metadata value for key " + quote(item.key()) + " must be a string, found " + describe_value(item.value()));
    }
  }
  const Json& blocks = doc.at("blocks");
  for (size_t b = 0; b < blocks.size(); ++b) {
    const Json& block = blocks[b];
    check_object(block, kBlockFields, Location{path, b});
    const Json& tensors = block.at("tensors");
    for (size_t t = 0; t < tensors.size(); ++t) {
      const Json& tensor = tensors[t];
      check_object(tensor, kTensorFields, Location{path, b, t}, kTensorOptionalFields);
      const Json& shape = tensor.at("shape");
      for (size_t d = 0; d < shape.size(); ++d) {
        check_kind(shape[d], JsonKind::kInteger, Location{path, b, t, SIZE_MAX, "shape", d});
      }
      const Json& chunks = tensor.at("chunks");
      for (size_t c = 0; c < chunks.size(); ++c) check_object(chunks[c], kChunkFields, Location{path, b, t, c});
    }
  }
}

// ---- value and layout rules ------------------------------------------------------------------------------------

const std::string& string_at(const Json& object, const char* key) { return object.at(key).get_ref<const std::string&>(); }
uint64_t integer_at(const Json& object, const char* key) { return object.at(key).get<uint64_t>(); }

std::string name_of_tensor(const std::string& name) { return "tensor " + quote(name); }

class ManifestValidator {
 public:
  ManifestValidator(const Json& doc, const ManifestExpectations& expect) : doc_(doc), expect_(expect), path_(expect.path) {}

  Manifest build() {
    check_identity();
    check_metadata();
    check_counts();
    walk_blocks();
    check_data_size();
    compute_derived_fields(manifest_);
    return std::move(manifest_);
  }

 private:
  void check_identity() {
    const std::string& store_text = string_at(doc_, "store_id");
    if (!parse_hex_bytes(store_text, manifest_.store_id)) {
      fail("manifest.store_id", path_, "store_id " + quote(store_text) + " is not 32 lowercase hex digits");
    }
    if (manifest_.store_id != expect_.store_id) {
      fail("manifest.store_id", path_,
           "store_id " + store_text + " differs from the STORE file's id " + hex_bytes(expect_.store_id));
    }

    const std::string& model_id = string_at(doc_, "model_id");
    if (!is_valid_model_id(model_id)) {
      fail("manifest.model_id", path_,
           "model_id " + quote(model_id) +
               " is not a valid model id (1-128 bytes of [A-Za-z0-9._-], not starting with '.' or '-')");
    }
    if (model_id != expect_.model_id) {
      fail("manifest.model_id", path_,
           "model_id " + quote(model_id) + " differs from the model directory " + quote(expect_.model_id));
    }
    manifest_.model_id = model_id;

    const std::string& fingerprint = string_at(doc_, "fingerprint");
    std::array<uint8_t, 16> fingerprint_bytes{};
    if (!parse_hex_bytes(fingerprint, fingerprint_bytes)) {
      fail("manifest.fingerprint", path_, "fingerprint " + quote(fingerprint) + " is not 32 lowercase hex digits");
    }
    manifest_.fingerprint = fingerprint;

    const uint64_t chunk_size = integer_at(doc_, "chunk_size");
    if (chunk_size < kMinChunkSize || chunk_size > kMaxChunkSize || chunk_size % kMinChunkSize != 0) {
      fail("manifest.chunk_size", path_,
           "chunk_size is " + std::to_string(chunk_size) + "; it must be a multiple of 4096 between 4096 and " +
               std::to_string(kMaxChunkSize));
    }
    manifest_.chunk_size = chunk_size;
  }

  void check_metadata() {
    const Json& metadata = doc_.at("metadata");
    if (metadata.size() > kMaxMetadataEntries) {
      fail("manifest.metadata", path_,
           "metadata has " + std::to_string(metadata.size()) + " entries; the limit is " +
               std::to_string(kMaxMetadataEntries));
    }
    for (const auto& item : metadata.items()) {
      const std::string& key = item.key();
      const std::string& value = item.value().get_ref<const std::string&>();
      if (key.empty() || key.size() > kMaxMetadataKeyBytes) {
        fail("manifest.metadata", path_,
             "metadata key " + quote(key) + " is " + std::to_string(key.size()) + " bytes; keys are 1-" +
                 std::to_string(kMaxMetadataKeyBytes) + " bytes");
      }
      if (value.size() > kMaxMetadataValueBytes) {
        fail("manifest.metadata", path_,
             "metadata value for key " + quote(key) + " is " + std::to_string(value.size()) +
                 " bytes; the limit is " + std::to_string(kMaxMetadataValueBytes));
      }
    }
    for (const auto& item : metadata.items()) {
      manifest_.metadata.emplace(item.key(), item.value().get_ref<const std::string&>());
    }
  }

  // Counted from the document before anything is reserved, so a hostile count cannot size an allocation.
  void check_counts() {
    const Json& blocks = doc_.at("blocks");
    if (blocks.size() > kMaxBlocks) {
      fail("manifest.counts", path_,
           "the manifest has " + std::to_string(blocks.size()) + " blocks; the limit is " + std::to_string(kMaxBlocks));
    }
    size_t tensors = 0;
    size_t chunks = 0;
    for (const Json& block : blocks) {
      const Json& block_tensors = block.at("tensors");
      if (__builtin_add_overflow(tensors, block_tensors.size(), &tensors)) tensors = SIZE_MAX;
      for (const Json& tensor : block_tensors) {
        if (__builtin_add_overflow(chunks, tensor.at("chunks").size(), &chunks)) chunks = SIZE_MAX;
      }
    }
    if (tensors > kMaxTensors) {
      fail("manifest.counts", path_,
           "the manifest has " + std::to_string(tensors) + " tensors; the limit is " + std::to_string(kMaxTensors));
    }
    if (chunks > kMaxChunks) {
      fail("manifest.counts", path_,
           "the manifest has " + std::to_string(chunks) + " chunks; the limit is " + std::to_string(kMaxChunks));
    }
    manifest_.blocks.reserve(blocks.size());
    manifest_.tensors.reserve(tensors);
    manifest_.chunks.reserve(chunks);
    block_names_.reserve(blocks.size());
    tensor_names_.reserve(tensors);
  }

  void walk_blocks() {
    const Json& blocks = doc_.at("blocks");
    for (size_t b = 0; b < blocks.size(); ++b) walk_block(b, blocks[b]);
  }

  void walk_block(size_t index, const Json& block) {
    const std::string& name = string_at(block, "name");
    if (name.empty() || name.size() > kMaxNameBytes) {
      fail("block.name", path_,
           "block " + std::to_string(index) + " has a name of " + std::to_string(name.size()) + " bytes (" +
               quote(name) + "); names are 1-" + std::to_string(kMaxNameBytes) + " bytes");
    }
    if (const auto [it, inserted] = block_names_.emplace(name, index); !inserted) {
      fail("block.duplicate_name", path_,
           "block " + quote(name) + " appears twice (blocks " + std::to_string(it->second) + " and " +
               std::to_string(index) + ")");
    }
    const Json& tensors = block.at("tensors");
    if (tensors.empty()) fail("block.empty", path_, "block " + quote(name) + " has no tensors");

    const uint64_t offset = integer_at(block, "offset");
    uint64_t expected = 0;
    if (!checked_align(cursor_, kBlockAlignment, expected) || offset != expected) {
      fail("block.offset", path_,
           "block " + quote(name) + " starts at " + std::to_string(offset) + ", expected " +
               std::to_string(expected) + " (the 4096-aligned end of the previous block)");
    }
    cursor_ = offset;

    BlockRecord record;
    record.name = name;
    record.offset = offset;
    record.first_tensor = manifest_.tensors.size();
    record.tensor_count = tensors.size();
    for (const Json& tensor : tensors) walk_tensor(index, record, tensor);
    manifest_.blocks.push_back(std::move(record));
  }

  void walk_tensor(size_t block_index, const BlockRecord& block, const Json& tensor) {
    const size_t global_index = manifest_.tensors.size();
    const std::string& name = string_at(tensor, "name");
    if (name.empty() || name.size() > kMaxNameBytes) {
      fail("tensor.name", path_,
           "tensor " + std::to_string(global_index) + " of block " + quote(block.name) + " has a name of " +
               std::to_string(name.size()) + " bytes (" + quote(name) + "); names are 1-" +
               std::to_string(kMaxNameBytes) + " bytes");
    }
    if (const auto [it, inserted] = tensor_names_.emplace(name, global_index); !inserted) {
      fail("tensor.duplicate_name", path_,
           "tensor name " + quote(name) + " appears twice (tensors " + std::to_string(it->second) + " and " +
               std::to_string(global_index) + ", in block " + quote(block.name) + ")");
    }
    const std::string& dtype_text = string_at(tensor, "dtype");
    const std::optional<Dtype> dtype = dtype_from_name(dtype_text);
    if (!dtype) fail("tensor.dtype", path_, name_of_tensor(name) + " has the unknown dtype " + quote(dtype_text));

    const Json& shape = tensor.at("shape");
    if (shape.size() > kMaxRank) {
      fail("tensor.rank", path_,
           name_of_tensor(name) + " has " + std::to_string(shape.size()) + " dimensions; the limit is " +
               std::to_string(kMaxRank));
    }
    TensorRecord record;
    record.shape.reserve(shape.size());
    for (size_t d = 0; d < shape.size(); ++d) {
      // Checked while unsigned: a dimension above 2^63 would turn negative as int64_t.
      const uint64_t dim = shape[d].get<uint64_t>();
      if (dim > kMaxTensorBytes) {
        fail("tensor.size", path_,
             name_of_tensor(name) + ": dimension " + std::to_string(d) + " is " + std::to_string(dim) +
                 ", above the limit 2^48");
      }
      record.shape.push_back(static_cast<int64_t>(dim));
    }
    uint64_t nbytes = 0;
    if (const std::string why = compute_nbytes(record.shape, dtype_size(*dtype), nbytes); !why.empty()) {
      fail("tensor.size", path_, name_of_tensor(name) + ": " + why);
    }

    uint64_t chunk_size = manifest_.chunk_size;
    if (const auto own = tensor.find("chunk_size"); own != tensor.end()) {
      chunk_size = own->get<uint64_t>();
      if (chunk_size < kMinChunkSize || chunk_size >= manifest_.chunk_size || chunk_size % kMinChunkSize != 0) {
        fail("tensor.chunk_size", path_,
             name_of_tensor(name) + " has chunk_size " + std::to_string(chunk_size) +
                 "; a tensor's own chunk size is a multiple of 4096, at least 4096 and below the manifest's " +
                 std::to_string(manifest_.chunk_size));
      }
    }

    const Json& chunks = tensor.at("chunks");
    const uint64_t expected_chunks = expected_chunk_count(nbytes, chunk_size);
    if (chunks.size() != expected_chunks) {
      fail("tensor.chunk_count", path_,
           name_of_tensor(name) + " has " + std::to_string(chunks.size()) + " chunks, expected " +
               std::to_string(expected_chunks) + " (" + std::to_string(nbytes) + " bytes in chunks of " +
               std::to_string(chunk_size) + ")");
    }

    if (!checked_align(cursor_, kTensorAlignment, cursor_)) {
      fail("chunk.offset", path_, name_of_tensor(name) + " cannot be aligned: the data cursor is at its limit");
    }

    record.name = name;
    record.dtype = *dtype;
    record.nbytes = nbytes;
    record.chunk_size = chunk_size;
    record.block = static_cast<uint32_t>(block_index);
    record.first_chunk = manifest_.chunks.size();
    record.chunk_count = chunks.size();
    for (size_t c = 0; c < chunks.size(); ++c) walk_chunk(record, c, chunks[c]);
    manifest_.tensors.push_back(std::move(record));
  }

  void walk_chunk(const TensorRecord& tensor, size_t index, const Json& chunk) {
    auto site = [&] { return name_of_tensor(tensor.name) + " chunk " + std::to_string(index); };

    const uint64_t offset = integer_at(chunk, "offset");
    const uint64_t size = integer_at(chunk, "size");
    uint64_t end = 0;
    if (__builtin_add_overflow(offset, size, &end)) {
      fail("chunk.bounds", path_,
           site() + ": offset " + std::to_string(offset) + " + size " + std::to_string(size) + " overflows 64 bits");
    }

    const std::string& codec_text = string_at(chunk, "codec");
    const std::optional<Codec> codec = codec_from_name(codec_text);
    if (!codec) fail("chunk.codec", path_, site() + " has the unknown codec " + quote(codec_text));

    const uint64_t shuffle = integer_at(chunk, "shuffle");
    if (*codec == Codec::kExponent && shuffle == 0) {
      fail("chunk.shuffle", path_,
           site() + " has codec exponent and shuffle 0; an exponent chunk needs shuffle = its float dtype's size");
    }
    if (shuffle != 0) {
      const bool allowed = *codec != Codec::kRaw && dtype_is_groupable_float(tensor.dtype) &&
                           shuffle == dtype_size(tensor.dtype);
      if (!allowed) {
        fail("chunk.shuffle", path_,
             site() + " has shuffle " + std::to_string(shuffle) + " with codec " +
                 std::string(codec_name(*codec)) + " and dtype " + std::string(dtype_name(tensor.dtype)) +
                 "; only lz4/zstd/exponent chunks of float16, bfloat16 or float32 may shuffle, by the dtype size");
      }
    }

    const uint64_t raw_size = chunk_raw_size(tensor.nbytes, tensor.chunk_size, index);
    if (*codec == Codec::kRaw ? size != raw_size : (size == 0 || size >= raw_size)) {
      fail("chunk.size", path_,
           site() + " (" + std::string(codec_name(*codec)) + ") stores " + std::to_string(size) + " bytes for " +
               std::to_string(raw_size) + " raw bytes; " +
               (*codec == Codec::kRaw ? "a raw chunk stores exactly its raw bytes"
                                      : "a compressed chunk must be non-empty and smaller than its raw bytes"));
    }

    const std::string& checksum_text = string_at(chunk, "xxh3");
    uint64_t checksum = 0;
    if (!parse_hex64(checksum_text, checksum)) {
      fail("chunk.checksum", path_, site() + " has the checksum " + quote(checksum_text) +
                                        ", which is not 16 lowercase hex digits");
    }

    if (offset != cursor_) {
      fail("chunk.offset", path_,
           site() + " starts at " + std::to_string(offset) + ", expected " + std::to_string(cursor_));
    }
    cursor_ = end;

    ChunkRecord record;
    record.offset = offset;
    record.stored_size = size;
    record.raw_size = raw_size;
    record.codec = *codec;
    record.shuffle = static_cast<uint32_t>(shuffle);  // shuffle is 0 or a dtype size here
    record.checksum = checksum;
    manifest_.chunks.push_back(record);
  }

  void check_data_size() {
    const uint64_t data_size = integer_at(doc_, "data_size");
    uint64_t expected = 0;
    if (!checked_align(cursor_, kBlockAlignment, expected) || data_size != expected) {
      fail("manifest.data_size", path_,
           "data_size is " + std::to_string(data_size) + ", expected " + std::to_string(expected) +
               " (the last chunk ends at " + std::to_string(cursor_) + ")");
    }
    manifest_.data_size = data_size;
    if (expect_.data_file_size && *expect_.data_file_size != data_size) {
      fail("data.size", expect_.data_path.empty() ? path_ : expect_.data_path,
           "the data file is " + std::to_string(*expect_.data_file_size) + " bytes, but the manifest says " +
               std::to_string(data_size));
    }
  }

  const Json& doc_;
  const ManifestExpectations& expect_;
  const std::string& path_;
  Manifest manifest_;
  uint64_t cursor_ = 0;  // the layout cursor of docs/format.md §4
  // Views into the document's strings, which outlive the walk.
  std::unordered_map<std::string_view, size_t> block_names_;
  std::unordered_map<std::string_view, size_t> tensor_names_;
};

// Index ranges of a manifest assembled in memory; a broken writer must get an error, not out-of-bounds access.
void check_ranges(const Manifest& manifest) {
  if (manifest.blocks.size() > kMaxBlocks || manifest.tensors.size() > kMaxTensors ||
      manifest.chunks.size() > kMaxChunks) {
    fail("manifest.counts", kInMemoryPath,
         std::to_string(manifest.blocks.size()) + " blocks, " + std::to_string(manifest.tensors.size()) +
             " tensors, " + std::to_string(manifest.chunks.size()) + " chunks exceed the limits");
  }
  for (const BlockRecord& block : manifest.blocks) {
    if (block.first_tensor > manifest.tensors.size() ||
        block.tensor_count > manifest.tensors.size() - block.first_tensor) {
      fail("manifest.counts", kInMemoryPath,
           "block " + quote(block.name) + " refers to tensors [" + std::to_string(block.first_tensor) + ", +" +
               std::to_string(block.tensor_count) + ") of " + std::to_string(manifest.tensors.size()));
    }
    for (const TensorRecord& tensor : manifest.tensors_of(block)) {
      if (tensor.first_chunk > manifest.chunks.size() ||
          tensor.chunk_count > manifest.chunks.size() - tensor.first_chunk) {
        fail("manifest.counts", kInMemoryPath,
             name_of_tensor(tensor.name) + " refers to chunks [" + std::to_string(tensor.first_chunk) + ", +" +
                 std::to_string(tensor.chunk_count) + ") of " + std::to_string(manifest.chunks.size()));
      }
    }
  }
}

}  // namespace

bool is_valid_model_id(std::string_view model_id) noexcept {
  if (model_id.empty() || model_id.size() > kMaxModelIdBytes) return false;
  if (model_id.front() == '.' || model_id.front() == '-') return false;
  return std::all_of(model_id.begin(), model_id.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
           c == '-';
  });
}

ManifestHeader parse_manifest_header(std::span<const std::byte> header, uint64_t file_size, const std::string& path) {
  if (file_size < kManifestHeaderSize || header.size() < kManifestHeaderSize) {
    fail("manifest.size", path,
         "the file is " + std::to_string(std::min<uint64_t>(file_size, header.size())) +
             " bytes, shorter than the 32-byte header");
  }
  if (std::memcmp(header.data(), kManifestMagic.data(), kManifestMagic.size()) != 0) {
    std::string found;
    for (size_t i = 0; i < kManifestMagic.size(); ++i) {
      found += hex64(static_cast<uint64_t>(header[i])).substr(14);
    }
    fail("manifest.magic", path, "the magic is " + found + " (hex), expected 'TSMANIF\\0'");
  }
  const uint32_t version = load_le32(header.data() + 8);
  if (version != kFormatVersion) {
    fail("manifest.version", path,
         "the format version is " + std::to_string(version) + "; this reader supports " +
             std::to_string(kFormatVersion));
  }
  const uint32_t flags = load_le32(header.data() + 12);
  if (flags != 0) fail("manifest.flags", path, "the flags are " + std::to_string(flags) + ", expected 0");

  ManifestHeader result;
  result.json_length = load_le64(header.data() + 16);
  result.json_checksum = load_le64(header.data() + 24);
  if (result.json_length > kMaxManifestJsonBytes) {
    fail("manifest.json_length", path,
         "json_length is " + std::to_string(result.json_length) + ", above the limit of " +
             std::to_string(kMaxManifestJsonBytes) + " bytes");
  }
  if (result.json_length != file_size - kManifestHeaderSize) {
    fail("manifest.json_length", path,
         "json_length is " + std::to_string(result.json_length) + " but " +
             std::to_string(file_size - kManifestHeaderSize) + " bytes follow the header");
  }
  return result;
}

Manifest parse_manifest_body(std::span<const std::byte> json, const ManifestHeader& header,
                             const ManifestExpectations& expect) {
  if (json.size() != header.json_length) {
    fail("manifest.json_length", expect.path,
         "json_length is " + std::to_string(header.json_length) + " but " + std::to_string(json.size()) +
             " bytes of JSON were read");
  }
  const uint64_t checksum = plain_checksum(json);
  if (checksum != header.json_checksum) {
    fail("manifest.checksum", expect.path,
         "the JSON hashes to " + hex64(checksum) + ", the header says " + hex64(header.json_checksum));
  }
  const Json doc = parse_json_text(json, expect.path);
  check_schema(doc, expect.path);
  return ManifestValidator(doc, expect).build();
}

Manifest parse_manifest(std::span<const std::byte> file, const ManifestExpectations& expect) {
  const ManifestHeader header =
      parse_manifest_header(file.first(std::min(file.size(), kManifestHeaderSize)), file.size(), expect.path);
  return parse_manifest_body(file.subspan(kManifestHeaderSize), header, expect);
}

std::vector<std::byte> serialize_manifest(const Manifest& manifest) {
  check_ranges(manifest);
  // ordered_json keeps the keys in the order of docs/format.md, which is easier to read than sorted keys.
  using Ordered = nlohmann::ordered_json;
  Ordered doc = Ordered::object();
  doc["store_id"] = hex_bytes(manifest.store_id);
  doc["model_id"] = manifest.model_id;
  doc["fingerprint"] = manifest.fingerprint;
  doc["chunk_size"] = manifest.chunk_size;
  doc["data_size"] = manifest.data_size;
  Ordered metadata = Ordered::object();
  for (const auto& [key, value] : manifest.metadata) metadata[key] = value;
  doc["metadata"] = std::move(metadata);
  Ordered blocks = Ordered::array();
  for (const BlockRecord& block : manifest.blocks) {
    Ordered tensors = Ordered::array();
    for (const TensorRecord& tensor : manifest.tensors_of(block)) {
      Ordered shape = Ordered::array();
      for (const int64_t dim : tensor.shape) shape.push_back(dim);
      Ordered chunks = Ordered::array();
      for (const ChunkRecord& chunk : manifest.chunks_of(tensor)) {
        Ordered entry = Ordered::object();
        entry["offset"] = chunk.offset;
        entry["size"] = chunk.stored_size;
        entry["codec"] = std::string(codec_name(chunk.codec));
        entry["shuffle"] = chunk.shuffle;
        entry["xxh3"] = hex64(chunk.checksum);
        chunks.push_back(std::move(entry));
      }
      Ordered entry = Ordered::object();
      entry["name"] = tensor.name;
      entry["dtype"] = std::string(dtype_name(tensor.dtype));
      entry["shape"] = std::move(shape);
      if (tensor.chunk_size != 0 && tensor.chunk_size != manifest.chunk_size) entry["chunk_size"] = tensor.chunk_size;
      entry["chunks"] = std::move(chunks);
      tensors.push_back(std::move(entry));
    }
    Ordered entry = Ordered::object();
    entry["name"] = block.name;
    entry["offset"] = block.offset;
    entry["tensors"] = std::move(tensors);
    blocks.push_back(std::move(entry));
  }
  doc["blocks"] = std::move(blocks);

  std::string text;
  try {
    text = doc.dump();
  } catch (const Ordered::exception& error) {
    // Names are user data; one that is not UTF-8 cannot be written as JSON.
    fail("manifest.json", kInMemoryPath, std::string("the manifest cannot be written as JSON: ") + error.what());
  }

  std::vector<std::byte> file(kManifestHeaderSize + text.size());
  std::memcpy(file.data(), kManifestMagic.data(), kManifestMagic.size());
  store_le32(file.data() + 8, kFormatVersion);
  store_le32(file.data() + 12, 0);
  store_le64(file.data() + 16, text.size());
  std::memcpy(file.data() + kManifestHeaderSize, text.data(), text.size());
  const auto json = std::span<const std::byte>(file).subspan(kManifestHeaderSize);
  store_le64(file.data() + 24, plain_checksum(json));
  return file;
}

void compute_derived_fields(Manifest& manifest) {
  check_ranges(manifest);
  if (manifest.chunk_size == 0) fail("manifest.chunk_size", kInMemoryPath, "chunk_size is 0");
  for (size_t b = 0; b < manifest.blocks.size(); ++b) {
    BlockRecord& block = manifest.blocks[b];
    uint64_t slot_cursor = 0;
    uint64_t end = block.offset;
    bool all_raw = true;
    for (size_t t = block.first_tensor; t < block.first_tensor + block.tensor_count; ++t) {
      TensorRecord& tensor = manifest.tensors[t];
      tensor.block = static_cast<uint32_t>(b);  // b < kMaxBlocks, checked above
      const std::string why = compute_nbytes(tensor.shape, dtype_size(tensor.dtype), tensor.nbytes);
      if (!why.empty()) fail("tensor.size", kInMemoryPath, name_of_tensor(tensor.name) + ": " + why);
      if (!checked_align(slot_cursor, kTensorAlignment, slot_cursor)) {
        fail("tensor.size", kInMemoryPath, "the slot of block " + quote(block.name) + " overflows 64 bits");
      }
      tensor.slot_offset = slot_cursor;
      if (tensor.chunk_size == 0) tensor.chunk_size = manifest.chunk_size;
      if (tensor.chunk_size > manifest.chunk_size) {
        fail("tensor.chunk_size", kInMemoryPath,
             name_of_tensor(tensor.name) + " has chunk_size " + std::to_string(tensor.chunk_size) +
                 ", above the manifest's " + std::to_string(manifest.chunk_size));
      }
      if (__builtin_add_overflow(slot_cursor, tensor.nbytes, &slot_cursor)) {
        fail("tensor.size", kInMemoryPath, "the slot of block " + quote(block.name) + " overflows 64 bits");
      }
      for (size_t c = 0; c < tensor.chunk_count; ++c) {
        ChunkRecord& chunk = manifest.chunks[tensor.first_chunk + c];
        chunk.raw_size = chunk_raw_size(tensor.nbytes, tensor.chunk_size, c);
        all_raw = all_raw && chunk.codec == Codec::kRaw;
        if (__builtin_add_overflow(chunk.offset, chunk.stored_size, &end)) {
          fail("chunk.bounds", kInMemoryPath,
               name_of_tensor(tensor.name) + " chunk " + std::to_string(c) + ": offset + size overflows 64 bits");
        }
      }
    }
    if (!checked_align(slot_cursor, kBlockAlignment, block.slot_size)) {
      fail("tensor.size", kInMemoryPath, "the slot of block " + quote(block.name) + " overflows 64 bits");
    }
    block.end = end;
    block.all_raw = all_raw;
  }
}

}  // namespace tensorstream
