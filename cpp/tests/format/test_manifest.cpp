// The manifest parser against docs/format.md §3-§4: a round trip, the derived layout, and one generated corrupt
// file per rule (each test breaks exactly one thing of a valid manifest, so it reaches exactly its rule).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "support/manifest_builder.hpp"
#include "tensorstream/error.hpp"
#include "tensorstream/format/manifest.hpp"

namespace tensorstream {
namespace {

using test_support::BuiltModel;
using test_support::ManifestJson;

constexpr uint64_t k2Pow48 = 1ull << 48;

// Parses `file` and checks that it fails with exactly `rule`.
void expect_rule(const std::vector<std::byte>& file, const std::string& rule, const ManifestExpectations& expect) {
  try {
    const Manifest manifest = parse_manifest(file, expect);
    ADD_FAILURE() << "the manifest parsed, but rule " << rule << " should have rejected it";
  } catch (const FormatError& error) {
    EXPECT_EQ(error.rule(), rule) << error.what();
    EXPECT_EQ(error.path(), expect.path);
  }
}

class ManifestTest : public ::testing::Test {
 protected:
  void expect_rule(const std::vector<std::byte>& file, const std::string& rule) const {
    tensorstream::expect_rule(file, rule, model_.expect);
  }
  // The standard model with its JSON edited.
  std::vector<std::byte> with_json(const std::function<void(ManifestJson&)>& edit) const {
    return test_support::mutate_manifest_json(model_.manifest, edit);
  }
  std::vector<std::byte> with_text(const std::function<void(std::string&)>& edit) const {
    return test_support::mutate_manifest_text(model_.manifest, edit);
  }
  std::vector<std::byte> with_bytes(const std::function<void(std::vector<std::byte>&)>& edit) const {
    return test_support::mutate_manifest_bytes(model_.manifest, edit);
  }
  std::vector<std::byte> file() const { return serialize_manifest(model_.manifest); }

  // Accessors into the standard model's JSON (see manifest_builder.hpp for its layout).
  static ManifestJson& block(ManifestJson& doc, size_t b) { return doc["blocks"][b]; }
  static ManifestJson& tensor(ManifestJson& doc, size_t b, size_t t) { return doc["blocks"][b]["tensors"][t]; }
  static ManifestJson& chunk(ManifestJson& doc, size_t b, size_t t, size_t c) {
    return doc["blocks"][b]["tensors"][t]["chunks"][c];
  }

  BuiltModel model_ = test_support::build_standard_model();
};

std::string replace_once(std::string text, const std::string& from, const std::string& to) {
  const size_t at = text.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  if (at != std::string::npos) text.replace(at, from.size(), to);
  return text;
}

// ---- valid manifests ---------------------------------------------------------------------------------------------

TEST_F(ManifestTest, StandardModelHasTheShapeTheTestsRelyOn) {
  const Manifest& m = model_.manifest;
  ASSERT_EQ(m.blocks.size(), 3u);
  ASSERT_EQ(m.tensors.size(), 9u);
  EXPECT_EQ(m.tensors[0].name, "embed.weight");
  ASSERT_EQ(m.tensors[0].chunk_count, 2u);
  EXPECT_EQ(m.chunks[0].codec, Codec::kLz4);
  EXPECT_EQ(m.chunks[0].shuffle, 2u);
  EXPECT_LT(m.chunks[0].stored_size, m.chunks[0].raw_size);
  EXPECT_EQ(m.chunks[1].codec, Codec::kRaw);
  EXPECT_EQ(m.tensors[1].shape.size(), 0u);  // scalar
  EXPECT_EQ(m.tensors[1].nbytes, 4u);
  EXPECT_EQ(m.tensors[4].name, "layers.0.empty");
  EXPECT_EQ(m.tensors[4].chunk_count, 0u);
  EXPECT_EQ(m.tensors[7].chunk_count, 3u);  // head.w
}

TEST_F(ManifestTest, RoundTrip) {
  const Manifest parsed = parse_manifest(file(), model_.expect);
  test_support::expect_manifests_equal(parsed, model_.manifest);
  EXPECT_EQ(serialize_manifest(parsed), file());
}

TEST_F(ManifestTest, RoundTripWithoutDataFileCheck) {
  ManifestExpectations expect = model_.expect;
  expect.data_file_size.reset();
  test_support::expect_manifests_equal(parse_manifest(file(), expect), model_.manifest);
}

TEST(ManifestRoundTrip, EmptyModel) {
  test_support::ModelSpec spec;
  spec.store_id = test_support::test_store_id();
  const BuiltModel model = test_support::build_model(spec);
  EXPECT_EQ(model.manifest.data_size, 0u);
  const Manifest parsed = parse_manifest(serialize_manifest(model.manifest), model.expect);
  test_support::expect_manifests_equal(parsed, model.manifest);
}

TEST(ManifestRoundTrip, OnlyEmptyTensorsHaveNoBytes) {
  test_support::ModelSpec spec;
  spec.store_id = test_support::test_store_id();
  spec.chunk_size = kMaxChunkSize;
  spec.blocks = {{"a", {{"a.x", Dtype::kFloat64, {0}, {}, {}, 0}}},
                 {"b", {{"b.x", Dtype::kInt8, {3, 0, 7}, {}, {}, 0}}}};
  const BuiltModel model = test_support::build_model(spec);
  EXPECT_EQ(model.manifest.data_size, 0u);
  EXPECT_EQ(model.manifest.blocks[1].offset, 0u);
  test_support::expect_manifests_equal(parse_manifest(serialize_manifest(model.manifest), model.expect),
                                       model.manifest);
}

TEST(ManifestRoundTrip, ZstdChunksAndEveryDtype) {
  test_support::ModelSpec spec;
  spec.store_id = test_support::test_store_id();
  spec.model_id = "fp-0123456789abcdef0123456789abcdef";
  test_support::BlockSpec block{"all", {}};
  for (int d = 0; d < kDtypeCount; ++d) {
    const auto dtype = static_cast<Dtype>(d);
    test_support::TensorSpec tensor{"t." + std::string(dtype_name(dtype)), dtype, {1500}, {}, {Codec::kZstd, 3}, 0};
    if (dtype_is_groupable_float(dtype)) tensor.shuffle = dtype_size(dtype);
    block.tensors.push_back(tensor);
  }
  spec.blocks = {block};
  const BuiltModel model = test_support::build_model(spec);
  size_t zstd_chunks = 0;
  for (const ChunkRecord& chunk : model.manifest.chunks) zstd_chunks += chunk.codec == Codec::kZstd;
  EXPECT_GT(zstd_chunks, 0u);
  test_support::expect_manifests_equal(parse_manifest(serialize_manifest(model.manifest), model.expect),
                                       model.manifest);
}

// A 1024-byte name, a 1024-byte metadata key, a 65536-byte metadata value, rank 16: all at their limits.
TEST_F(ManifestTest, LimitsAreInclusive) {
  const auto file_at_limits = with_json([](ManifestJson& doc) {
    doc["metadata"][std::string(1024, 'k')] = std::string(65536, 'v');
    block(doc, 0)["name"] = std::string(1024, 'b');
    tensor(doc, 2, 1)["name"] = std::string(1024, 't');
    ManifestJson shape = ManifestJson::array();
    shape.push_back(5);
    for (int i = 0; i < 15; ++i) shape.push_back(1);
    tensor(doc, 2, 1)["shape"] = shape;  // head.ids: 5 int32 either way
  });
  const Manifest parsed = parse_manifest(file_at_limits, model_.expect);
  EXPECT_EQ(parsed.tensors[8].shape.size(), kMaxRank);
  EXPECT_EQ(parsed.blocks[0].name.size(), kMaxNameBytes);
}

TEST_F(ManifestTest, ZeroDimensionMakesAnEmptyTensorWhateverTheOtherDimensions) {
  const auto shapes = {ManifestJson::array({k2Pow48, k2Pow48, 0}), ManifestJson::array({0, k2Pow48, k2Pow48})};
  for (const ManifestJson& shape : shapes) {
    SCOPED_TRACE(shape.dump());
    const Manifest parsed =
        parse_manifest(with_json([&](ManifestJson& doc) { tensor(doc, 1, 2)["shape"] = shape; }), model_.expect);
    EXPECT_EQ(parsed.tensors[4].nbytes, 0u);
  }
}

TEST_F(ManifestTest, KeyOrderAndWhitespaceDoNotMatter) {
  std::string text = test_support::manifest_json(model_.manifest).dump(2);
  ManifestJson sorted = nlohmann::json::parse(text);  // nlohmann::json sorts keys
  const auto reordered = test_support::encode_manifest_text(sorted.dump(1, '\t'));
  test_support::expect_manifests_equal(parse_manifest(reordered, model_.expect), model_.manifest);
}

// ---- derived layout ----------------------------------------------------------------------------------------------

// A hand-checked example of docs/format.md §5 (slots) and §4 (data layout).
TEST_F(ManifestTest, DerivedLayoutMatchesTheSpec) {
  const Manifest m = parse_manifest(file(), model_.expect);

  // Block "layers.0" is all raw: w 8000 B, b 24 B, empty 0 B, mask 10 B, freqs 48 B.
  const BlockRecord& layers = m.blocks[1];
  EXPECT_EQ(layers.name, "layers.0");
  EXPECT_EQ(layers.first_tensor, 2u);
  EXPECT_EQ(layers.tensor_count, 5u);
  EXPECT_TRUE(layers.all_raw);
  const std::vector<uint64_t> nbytes = {8000, 24, 0, 10, 48};
  const std::vector<uint64_t> slots = {0, 8192, 8448, 8448, 8704};  // align(cursor, 256) before each tensor
  for (size_t i = 0; i < nbytes.size(); ++i) {
    const TensorRecord& t = m.tensors[layers.first_tensor + i];
    SCOPED_TRACE(t.name);
    EXPECT_EQ(t.nbytes, nbytes[i]);
    EXPECT_EQ(t.slot_offset, slots[i]);
    EXPECT_EQ(t.block, 1u);
    // An all-raw block is laid out on disk exactly like its slot.
    if (t.chunk_count > 0) {
      EXPECT_EQ(m.chunks[t.first_chunk].offset, layers.offset + t.slot_offset);
    }
  }
  EXPECT_EQ(layers.slot_size, 12288u);                 // align(8704 + 48, 4096)
  EXPECT_EQ(layers.end, layers.offset + 8704 + 48);    // one past the last stored byte
  EXPECT_EQ(layers.offset % kBlockAlignment, 0u);

  // layers.0.w: two chunks, 4096 + 3904 raw bytes, contiguous.
  const TensorRecord& w = m.tensors[2];
  ASSERT_EQ(w.chunk_count, 2u);
  EXPECT_EQ(m.chunks[w.first_chunk].raw_size, 4096u);
  EXPECT_EQ(m.chunks[w.first_chunk + 1].raw_size, 3904u);
  EXPECT_EQ(m.chunks[w.first_chunk + 1].offset, layers.offset + 4096);

  // Block "embed" holds an lz4 chunk: not all raw, but its slot is still the raw layout.
  const BlockRecord& embed = m.blocks[0];
  EXPECT_EQ(embed.offset, 0u);
  EXPECT_FALSE(embed.all_raw);
  EXPECT_EQ(m.tensors[0].slot_offset, 0u);
  EXPECT_EQ(m.tensors[1].slot_offset, 6144u);  // embed.weight is 6144 bytes
  EXPECT_EQ(embed.slot_size, 8192u);
  EXPECT_EQ(m.chunks[0].raw_size, 4096u);
  EXPECT_EQ(m.chunks[1].raw_size, 2048u);
  EXPECT_EQ(m.chunks[1].offset, m.chunks[0].stored_size);

  // Block "head": 9000 bytes in 3 chunks, then 20 bytes.
  const BlockRecord& head = m.blocks[2];
  EXPECT_EQ(head.offset, align_up(layers.end, kBlockAlignment));
  EXPECT_EQ(m.tensors[8].slot_offset, 9216u);
  EXPECT_EQ(head.slot_size, 12288u);
  EXPECT_EQ(m.chunks[m.tensors[7].first_chunk + 2].raw_size, 808u);
  EXPECT_EQ(m.data_size, align_up(head.end, kBlockAlignment));
}

TEST(ManifestDerived, ComputeDerivedFieldsForAWriter) {
  Manifest m;
  m.chunk_size = 4096;
  m.blocks.push_back({"b", 8192, 0, 0, 0, 3, true});
  m.tensors.push_back({"x", Dtype::kFloat32, {3, 2}, 0, 0, 0, 0, 1});   // 24 B
  m.tensors.push_back({"y", Dtype::kUint16, {}, 0, 0, 0, 1, 1});        // scalar, 2 B
  m.tensors.push_back({"z", Dtype::kInt8, {5000}, 0, 0, 0, 2, 2});      // 2 chunks
  m.chunks.push_back({8192, 24, 0, Codec::kRaw, 0, 0});
  m.chunks.push_back({8448, 2, 0, Codec::kRaw, 0, 0});
  m.chunks.push_back({8704, 100, 0, Codec::kZstd, 0, 0});
  m.chunks.push_back({8804, 904, 0, Codec::kRaw, 0, 0});
  compute_derived_fields(m);
  EXPECT_EQ(m.tensors[0].nbytes, 24u);
  EXPECT_EQ(m.tensors[1].nbytes, 2u);
  EXPECT_EQ(m.tensors[2].nbytes, 5000u);
  EXPECT_EQ(m.tensors[0].slot_offset, 0u);
  EXPECT_EQ(m.tensors[1].slot_offset, 256u);
  EXPECT_EQ(m.tensors[2].slot_offset, 512u);
  EXPECT_EQ(m.chunks[2].raw_size, 4096u);
  EXPECT_EQ(m.chunks[3].raw_size, 904u);
  EXPECT_EQ(m.blocks[0].slot_size, 8192u);  // align(512 + 5000, 4096)
  EXPECT_EQ(m.blocks[0].end, 8804u + 904u);
  EXPECT_FALSE(m.blocks[0].all_raw);
  for (const TensorRecord& t : m.tensors) EXPECT_EQ(t.block, 0u);
}

TEST(ManifestDerived, BrokenWriterInputIsAnErrorNotACrash) {
  Manifest m;
  m.chunk_size = 4096;
  m.blocks.push_back({"b", 0, 0, 0, 0, 2, true});
  m.tensors.push_back({"x", Dtype::kFloat32, {3}, 0, 0, 0, 0, 0});
  EXPECT_THROW(compute_derived_fields(m), FormatError);  // tensor range past the end
  EXPECT_THROW((void)serialize_manifest(m), FormatError);
  m.blocks[0].tensor_count = 1;
  m.tensors[0].chunk_count = 1;  // chunk range past the end
  EXPECT_THROW(compute_derived_fields(m), FormatError);
  m.tensors[0].chunk_count = 0;
  m.chunk_size = 0;
  EXPECT_THROW(compute_derived_fields(m), FormatError);
  m.chunk_size = 4096;
  m.tensors[0].shape = {1ll << 40, 1ll << 40};
  EXPECT_THROW(compute_derived_fields(m), FormatError);
}

TEST(ManifestSerialize, NameThatIsNotUtf8IsAnError) {
  BuiltModel model = test_support::build_standard_model();
  model.manifest.tensors[0].name = "bad\xff";
  try {
    (void)serialize_manifest(model.manifest);
    ADD_FAILURE() << "serialized a name that is not UTF-8";
  } catch (const FormatError& error) {
    EXPECT_EQ(error.rule(), "manifest.json");
  }
}

TEST(ManifestModelId, ValidIds) {
  for (const char* id : {"a", "A", "0", "llama-3.1-8b", "fp-0123456789abcdef0123456789abcdef", "a.b_c-d", "x-", "_x",
                         "x..y"}) {
    EXPECT_TRUE(is_valid_model_id(id)) << id;
  }
  EXPECT_TRUE(is_valid_model_id(std::string(128, 'm')));
}

TEST(ManifestModelId, InvalidIds) {
  for (const char* id : {"", ".", "..", ".hidden", "-x", "a/b", "../x", "a b", "a\\b", "caf\xc3\xa9", "a:b", "a\nb",
                         "x*"}) {
    EXPECT_FALSE(is_valid_model_id(id)) << id;
  }
  EXPECT_FALSE(is_valid_model_id(std::string(129, 'm')));
  EXPECT_FALSE(is_valid_model_id(std::string_view("a\0b", 3)));
}

// ---- §3 header ---------------------------------------------------------------------------------------------------

TEST_F(ManifestTest, Rule_manifest_size) {
  for (size_t size : {0, 1, 31}) {
    SCOPED_TRACE(size);
    std::vector<std::byte> bytes = file();
    bytes.resize(size);
    expect_rule(bytes, "manifest.size");
  }
}

TEST_F(ManifestTest, Rule_manifest_magic) {
  expect_rule(with_bytes([](std::vector<std::byte>& b) { b[0] = std::byte{'X'}; }), "manifest.magic");
  expect_rule(with_bytes([](std::vector<std::byte>& b) { b[7] = std::byte{' '}; }), "manifest.magic");
}

TEST_F(ManifestTest, Rule_manifest_version) {
  expect_rule(with_bytes([](std::vector<std::byte>& b) { test_support::put_le32(b, 8, 2); }), "manifest.version");
  expect_rule(with_bytes([](std::vector<std::byte>& b) { test_support::put_le32(b, 8, 0); }), "manifest.version");
}

TEST_F(ManifestTest, Rule_manifest_flags) {
  expect_rule(with_bytes([](std::vector<std::byte>& b) { test_support::put_le32(b, 12, 1); }), "manifest.flags");
}

TEST_F(ManifestTest, Rule_manifest_json_length) {
  {
    SCOPED_TRACE("above 64 MiB");
    expect_rule(with_bytes([](std::vector<std::byte>& b) { test_support::put_le64(b, 16, (64ull << 20) + 1); }),
                "manifest.json_length");
    expect_rule(with_bytes([](std::vector<std::byte>& b) { test_support::put_le64(b, 16, UINT64_MAX); }),
                "manifest.json_length");
  }
  {
    SCOPED_TRACE("longer than the file (truncated JSON)");
    expect_rule(with_bytes([](std::vector<std::byte>& b) { b.pop_back(); }), "manifest.json_length");
  }
  {
    SCOPED_TRACE("trailing byte");
    expect_rule(with_bytes([](std::vector<std::byte>& b) { b.push_back(std::byte{' '}); }), "manifest.json_length");
  }
  {
    SCOPED_TRACE("shorter than the file");
    expect_rule(with_bytes([](std::vector<std::byte>& b) {
                  test_support::put_le64(b, 16, test_support::get_le64(b, 16) - 1);
                }),
                "manifest.json_length");
  }
}

TEST_F(ManifestTest, Rule_manifest_checksum) {
  expect_rule(with_bytes([](std::vector<std::byte>& b) { b[24] ^= std::byte{1}; }), "manifest.checksum");
  expect_rule(with_bytes([](std::vector<std::byte>& b) { b[40] ^= std::byte{0x20}; }), "manifest.checksum");
}

TEST_F(ManifestTest, HeaderRulesComeInOrder) {
  // Every header field broken at once: the first rule in the spec's order wins.
  expect_rule(with_bytes([](std::vector<std::byte>& b) {
                b[0] = std::byte{'X'};
                test_support::put_le32(b, 8, 9);
                test_support::put_le32(b, 12, 9);
                test_support::put_le64(b, 16, 1);
              }),
              "manifest.magic");
  expect_rule(with_bytes([](std::vector<std::byte>& b) {
                test_support::put_le32(b, 12, 9);
                test_support::put_le64(b, 16, 1);
              }),
              "manifest.flags");
}

TEST_F(ManifestTest, HeaderAndBodyEntryPoints) {
  const std::vector<std::byte> bytes = file();
  const auto span = std::span<const std::byte>(bytes);
  const ManifestHeader header = parse_manifest_header(span.first(kManifestHeaderSize), bytes.size(), "x");
  EXPECT_EQ(header.json_length, bytes.size() - kManifestHeaderSize);
  try {
    (void)parse_manifest_header(span.first(kManifestHeaderSize), bytes.size() + 1, "x");
    ADD_FAILURE();
  } catch (const FormatError& error) {
    EXPECT_EQ(error.rule(), "manifest.json_length");
  }
  try {
    (void)parse_manifest_body(span.subspan(kManifestHeaderSize + 1), header, model_.expect);
    ADD_FAILURE();
  } catch (const FormatError& error) {
    EXPECT_EQ(error.rule(), "manifest.json_length");
  }
  test_support::expect_manifests_equal(parse_manifest_body(span.subspan(kManifestHeaderSize), header, model_.expect),
                                       model_.manifest);
}

// ---- §4 JSON shape -----------------------------------------------------------------------------------------------

TEST_F(ManifestTest, Rule_manifest_json) {
  expect_rule(test_support::encode_manifest_text(""), "manifest.json");
  expect_rule(test_support::encode_manifest_text("{"), "manifest.json");
  expect_rule(with_text([](std::string& t) { t.pop_back(); }), "manifest.json");                  // truncated
  expect_rule(with_text([](std::string& t) { t += "{}"; }), "manifest.json");                     // two values
  expect_rule(with_text([](std::string& t) { t.insert(1, "/* c */"); }), "manifest.json");        // comment
  expect_rule(with_text([](std::string& t) { t = replace_once(t, "\"embed\"", "\"emb\xff\""); }),  // not UTF-8
              "manifest.json");
  expect_rule(with_text([](std::string& t) { t = replace_once(t, "\"embed\"", "'embed'"); }), "manifest.json");
  // Numbers no double holds are refused by the parser itself.
  expect_rule(with_text([](std::string& t) { t = replace_once(t, "\"chunk_size\":4096", "\"chunk_size\":1e999"); }),
              "manifest.json");
}

TEST_F(ManifestTest, Rule_manifest_depth) {
  // The chunk objects sit at depth 6 (top level = 0) and parse; any container deeper than that is refused,
  // even where the schema would refuse it anyway.
  expect_rule(with_json([](ManifestJson& doc) {
                doc["metadata"]["deep"] = ManifestJson::parse("[[[[[[[[[[\"x\"]]]]]]]]]]");
              }),
              "manifest.depth");
  expect_rule(with_json([](ManifestJson& doc) { chunk(doc, 1, 0, 0)["extra"] = ManifestJson::object(); }),
              "manifest.depth");
  expect_rule(with_json([](ManifestJson& doc) { tensor(doc, 1, 0)["shape"] = ManifestJson::parse("[[[7]]]"); }),
              "manifest.depth");
  // Deep nesting is refused while parsing, long before it could exhaust anything.
  expect_rule(test_support::encode_manifest_text(std::string(1'000'000, '[')), "manifest.depth");
  // At depth 6 the same value is only a schema violation.
  expect_rule(with_json([](ManifestJson& doc) { doc["metadata"]["deep"] = ManifestJson::parse("[[[[[\"x\"]]]]]"); }),
              "manifest.schema");
}

TEST_F(ManifestTest, Rule_manifest_duplicate_key) {
  expect_rule(with_text([](std::string& t) { t.insert(1, "\"chunk_size\":4096,"); }), "manifest.duplicate_key");
  expect_rule(with_text([](std::string& t) { t = replace_once(t, "{\"offset\":", "{\"size\":1,\"offset\":"); }),
              "manifest.duplicate_key");
  expect_rule(with_text([](std::string& t) {
                t = replace_once(t, "\"metadata\":{", "\"metadata\":{\"architecture\":\"x\",");
              }),
              "manifest.duplicate_key");
}

TEST_F(ManifestTest, Rule_manifest_schema) {
  struct Case {
    const char* what;
    std::function<void(ManifestJson&)> edit;
  };
  const std::vector<Case> cases = {
      {"top level is not an object", [](ManifestJson& doc) { doc = ManifestJson::array(); }},
      {"missing top-level key", [](ManifestJson& doc) { doc.erase("data_size"); }},
      {"missing block key", [](ManifestJson& doc) { block(doc, 2).erase("offset"); }},
      {"missing tensor key", [](ManifestJson& doc) { tensor(doc, 0, 1).erase("dtype"); }},
      {"missing chunk key", [](ManifestJson& doc) { chunk(doc, 2, 0, 2).erase("xxh3"); }},
      {"extra top-level key", [](ManifestJson& doc) { doc["version"] = 1; }},
      {"extra block key", [](ManifestJson& doc) { block(doc, 0)["size"] = 1; }},
      {"extra tensor key", [](ManifestJson& doc) { tensor(doc, 1, 1)["stride"] = ManifestJson::array(); }},
      {"extra chunk key", [](ManifestJson& doc) { chunk(doc, 0, 0, 0)["raw_size"] = 4096; }},
      {"renamed key", [](ManifestJson& doc) {
         chunk(doc, 0, 0, 0)["checksum"] = chunk(doc, 0, 0, 0)["xxh3"];
         chunk(doc, 0, 0, 0).erase("xxh3");
       }},
      {"string for integer", [](ManifestJson& doc) { doc["chunk_size"] = "4096"; }},
      {"integer for string", [](ManifestJson& doc) { doc["model_id"] = 5; }},
      {"object for array", [](ManifestJson& doc) { doc["blocks"] = ManifestJson::object(); }},
      {"array for object", [](ManifestJson& doc) { doc["metadata"] = ManifestJson::array(); }},
      {"null", [](ManifestJson& doc) { tensor(doc, 2, 0)["name"] = nullptr; }},
      {"boolean", [](ManifestJson& doc) { chunk(doc, 1, 0, 1)["shuffle"] = false; }},
      {"block not an object", [](ManifestJson& doc) { doc["blocks"][1] = "layers.0"; }},
      {"chunk not an object", [](ManifestJson& doc) { tensor(doc, 2, 0)["chunks"][1] = 4096; }},
      {"negative integer", [](ManifestJson& doc) { chunk(doc, 1, 0, 0)["offset"] = -1; }},
      {"float", [](ManifestJson& doc) { doc["chunk_size"] = 4096.0; }},
      {"float dimension", [](ManifestJson& doc) { tensor(doc, 1, 0)["shape"][0] = 40.0; }},
      {"negative dimension", [](ManifestJson& doc) { tensor(doc, 1, 0)["shape"][0] = -40; }},
      {"string dimension", [](ManifestJson& doc) { tensor(doc, 1, 0)["shape"][0] = "40"; }},
      {"metadata value not a string", [](ManifestJson& doc) { doc["metadata"]["layers"] = 1; }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    expect_rule(with_json(c.edit), "manifest.schema");
  }
  // Spellings nlohmann would otherwise accept as numbers.
  for (const char* number : {"4096.0", "4.096e3", "4096e0", "-0", "18446744073709551616"}) {
    SCOPED_TRACE(number);
    expect_rule(with_text([&](std::string& t) {
                  t = replace_once(t, "\"chunk_size\":4096", std::string("\"chunk_size\":") + number);
                }),
                "manifest.schema");
  }
  // The largest 64-bit integer is an integer (and then a bad chunk size).
  expect_rule(with_text([](std::string& t) {
                t = replace_once(t, "\"chunk_size\":4096", "\"chunk_size\":18446744073709551615");
              }),
              "manifest.chunk_size");
}

TEST_F(ManifestTest, SchemaIsCheckedBeforeValues) {
  // A bad store id up front and a missing key at the very end: the document's shape comes first.
  expect_rule(with_json([](ManifestJson& doc) {
                doc["store_id"] = "nope";
                chunk(doc, 2, 0, 2).erase("xxh3");
              }),
              "manifest.schema");
}

// ---- §4 values ---------------------------------------------------------------------------------------------------

TEST_F(ManifestTest, Rule_manifest_store_id) {
  for (const std::string id : {"", "1011121314151617", "101112131415161718191A1B1C1D1E1F",
                               "101112131415161718191a1b1c1d1e1f00", "0x1112131415161718191a1b1c1d1e1f"}) {
    SCOPED_TRACE(id);
    expect_rule(with_json([&](ManifestJson& doc) { doc["store_id"] = id; }), "manifest.store_id");
  }
  SCOPED_TRACE("well-formed but another store's");
  expect_rule(with_json([](ManifestJson& doc) { doc["store_id"] = "101112131415161718191a1b1c1d1e1e"; }),
              "manifest.store_id");
  ManifestExpectations other = model_.expect;
  other.store_id[0] ^= 1;
  tensorstream::expect_rule(file(), "manifest.store_id", other);
}

TEST_F(ManifestTest, Rule_manifest_model_id) {
  for (const std::string& id :
       std::vector<std::string>{"", "../test-model", ".test-model", "-test-model", "test model", std::string(129, 'x')}) {
    SCOPED_TRACE(id);
    expect_rule(with_json([&](ManifestJson& doc) { doc["model_id"] = id; }), "manifest.model_id");
  }
  SCOPED_TRACE("valid but not the directory's name");
  expect_rule(with_json([](ManifestJson& doc) { doc["model_id"] = "other-model"; }), "manifest.model_id");
}

TEST_F(ManifestTest, Rule_manifest_fingerprint) {
  for (const std::string fp : {"", "0123456789abcdef", "0123456789ABCDEF0123456789ABCDEF",
                               "0123456789abcdef0123456789abcdef0", "0123456789abcdeg0123456789abcdef"}) {
    SCOPED_TRACE(fp);
    expect_rule(with_json([&](ManifestJson& doc) { doc["fingerprint"] = fp; }), "manifest.fingerprint");
  }
}

TEST_F(ManifestTest, Rule_manifest_chunk_size) {
  for (const uint64_t size : std::vector<uint64_t>{0, 1, 2048, 4097, 6144, (64ull << 20) + 4096, 1ull << 40,
                                                  UINT64_MAX}) {
    SCOPED_TRACE(size);
    expect_rule(with_json([&](ManifestJson& doc) { doc["chunk_size"] = size; }), "manifest.chunk_size");
  }
}

TEST_F(ManifestTest, Rule_manifest_metadata) {
  {
    SCOPED_TRACE("too many entries");
    expect_rule(with_json([](ManifestJson& doc) {
                  for (int i = 0; i < 1023; ++i) doc["metadata"]["key" + std::to_string(i)] = "v";
                }),
                "manifest.metadata");
  }
  {
    SCOPED_TRACE("empty key");
    expect_rule(with_json([](ManifestJson& doc) { doc["metadata"][""] = "v"; }), "manifest.metadata");
  }
  {
    SCOPED_TRACE("key too long");
    expect_rule(with_json([](ManifestJson& doc) { doc["metadata"][std::string(1025, 'k')] = "v"; }),
                "manifest.metadata");
  }
  {
    SCOPED_TRACE("value too long");
    expect_rule(with_json([](ManifestJson& doc) { doc["metadata"]["config"] = std::string(65537, 'v'); }),
                "manifest.metadata");
  }
  // 1024 entries are fine.
  const auto at_limit = with_json([](ManifestJson& doc) {
    for (int i = 0; i < 1022; ++i) doc["metadata"]["key" + std::to_string(i)] = "v";
  });
  EXPECT_EQ(parse_manifest(at_limit, model_.expect).metadata.size(), kMaxMetadataEntries);
}

// Only the block cap can be reached within the 64 MiB JSON limit: the smallest block object is 35 bytes, so
// 2^20 + 1 blocks fit (~38 MB), whereas the smallest tensor (45 bytes) and chunk (54 bytes) objects allow at most
// ~1.5M tensors and ~1.2M chunks, below the 2^22 and 2^24 caps. Those two caps are a second line of defence that
// no file within the JSON limit can reach, so no test can build one.
TEST_F(ManifestTest, Rule_manifest_counts) {
  std::string text = test_support::manifest_text(model_.manifest);
  const std::string blocks_key = "\"blocks\":[";
  const size_t at = text.find(blocks_key);
  ASSERT_NE(at, std::string::npos);
  std::string blocks;
  const std::string tiny = "{\"name\":\"\",\"offset\":0,\"tensors\":[]},";
  blocks.reserve(tiny.size() * (kMaxBlocks + 1));
  for (size_t i = 0; i < kMaxBlocks + 1; ++i) blocks += tiny;
  blocks.pop_back();
  text = text.substr(0, at + blocks_key.size()) + blocks + "]}";
  ASSERT_LE(text.size(), kMaxManifestJsonBytes);
  expect_rule(test_support::encode_manifest_text(text), "manifest.counts");

}

TEST_F(ManifestTest, Rule_block_name) {
  expect_rule(with_json([](ManifestJson& doc) { block(doc, 1)["name"] = ""; }), "block.name");
  expect_rule(with_json([](ManifestJson& doc) { block(doc, 1)["name"] = std::string(1025, 'b'); }), "block.name");
}

TEST_F(ManifestTest, Rule_block_duplicate_name) {
  expect_rule(with_json([](ManifestJson& doc) { block(doc, 2)["name"] = "embed"; }), "block.duplicate_name");
}

TEST_F(ManifestTest, Rule_block_empty) {
  expect_rule(with_json([](ManifestJson& doc) { block(doc, 1)["tensors"] = ManifestJson::array(); }), "block.empty");
}

TEST_F(ManifestTest, Rule_tensor_name) {
  expect_rule(with_json([](ManifestJson& doc) { tensor(doc, 2, 1)["name"] = ""; }), "tensor.name");
  expect_rule(with_json([](ManifestJson& doc) { tensor(doc, 2, 1)["name"] = std::string(1025, 't'); }),
              "tensor.name");
}

TEST_F(ManifestTest, Rule_tensor_duplicate_name) {
  // Unique across the model, not only within a block.
  expect_rule(with_json([](ManifestJson& doc) { tensor(doc, 2, 1)["name"] = "embed.scale"; }),
              "tensor.duplicate_name");
  expect_rule(with_json([](ManifestJson& doc) { tensor(doc, 1, 4)["name"] = "layers.0.w"; }),
              "tensor.duplicate_name");
}

TEST_F(ManifestTest, BlockAndTensorNamespacesAreSeparate) {
  const Manifest parsed =
      parse_manifest(with_json([](ManifestJson& doc) { tensor(doc, 2, 1)["name"] = "head"; }), model_.expect);
  EXPECT_EQ(parsed.tensors[8].name, "head");
}

TEST_F(ManifestTest, Rule_tensor_dtype) {
  for (const char* dtype : {"", "float", "torch.float32", "Float32", "float8_e4m3", "string"}) {
    SCOPED_TRACE(dtype);
    expect_rule(with_json([&](ManifestJson& doc) { tensor(doc, 2, 1)["dtype"] = dtype; }), "tensor.dtype");
  }
}

TEST_F(ManifestTest, Rule_tensor_rank) {
  expect_rule(with_json([](ManifestJson& doc) {
                ManifestJson shape = ManifestJson::array({5});
                for (int i = 0; i < 16; ++i) shape.push_back(1);  // 17 dimensions, still 5 elements
                tensor(doc, 2, 1)["shape"] = shape;
              }),
              "tensor.rank");
}

TEST_F(ManifestTest, Rule_tensor_size) {
  const std::vector<std::pair<const char*, ManifestJson>> shapes = {
      {"dimension above 2^48", ManifestJson::array({k2Pow48 + 1})},
      {"dimension far above 2^48", ManifestJson::array({UINT64_MAX})},
      {"product overflows 64 bits", ManifestJson::array({1ull << 40, 1ull << 40})},
      {"product overflows, each dimension at the limit", ManifestJson::array({k2Pow48, k2Pow48, k2Pow48})},
      {"product above 2^48 without overflow", ManifestJson::array({1ull << 47, 4})},
      {"element size pushes it above 2^48", ManifestJson::array({k2Pow48 / 2})},  // int32: 2^49 bytes
      {"element size overflows", ManifestJson::array({1ull << 31, 1ull << 31, 4})},
  };
  for (const auto& entry : shapes) {
    SCOPED_TRACE(entry.first);
    expect_rule(with_json([&](ManifestJson& doc) { tensor(doc, 2, 1)["shape"] = entry.second; }), "tensor.size");
  }
}

TEST_F(ManifestTest, Rule_tensor_chunk_count) {
  expect_rule(with_json([](ManifestJson& doc) { tensor(doc, 2, 0)["chunks"].erase(2); }), "tensor.chunk_count");
  expect_rule(with_json([](ManifestJson& doc) { tensor(doc, 2, 0)["chunks"].push_back(chunk(doc, 2, 0, 2)); }),
              "tensor.chunk_count");
  expect_rule(with_json([](ManifestJson& doc) { tensor(doc, 1, 2)["shape"] = ManifestJson::array({1}); }),
              "tensor.chunk_count");  // layers.0.empty becomes 4 bytes but has no chunk
  expect_rule(with_json([](ManifestJson& doc) { tensor(doc, 1, 0)["shape"] = ManifestJson::array({4000, 100}); }),
              "tensor.chunk_count");
}

// A tensor with its own, smaller chunk size: the key is written only then, and every chunk rule follows it.
class SmallChunkManifestTest : public ::testing::Test {
 protected:
  void expect_rule(const std::function<void(ManifestJson&)>& edit, const std::string& rule) const {
    tensorstream::expect_rule(test_support::mutate_manifest_json(model_.manifest, edit), rule, model_.expect);
  }
  static ManifestJson& table(ManifestJson& doc) { return doc["blocks"][0]["tensors"][0]; }

  BuiltModel model_ = test_support::build_model(test_support::small_chunk_model_spec());
};

TEST_F(SmallChunkManifestTest, RoundTripAndDerivedSizes) {
  const Manifest& m = model_.manifest;
  ASSERT_EQ(m.tensors.size(), 2u);
  EXPECT_EQ(m.tensors[0].chunk_size, 4096u);
  EXPECT_EQ(m.tensors[1].chunk_size, 16384u);  // resolved from the manifest's
  ASSERT_EQ(m.tensors[0].chunk_count, 7u);
  ASSERT_EQ(m.tensors[1].chunk_count, 3u);
  EXPECT_EQ(m.chunks[5].raw_size, 4096u);
  EXPECT_EQ(m.chunks[6].raw_size, 1024u);
  EXPECT_EQ(m.chunks[7].raw_size, 16384u);
  EXPECT_EQ(m.chunks[9].raw_size, 40000u - 2 * 16384u);
  EXPECT_TRUE(std::any_of(m.chunks.begin(), m.chunks.begin() + 7, [](const ChunkRecord& c) {
    return c.codec != Codec::kRaw;
  }));

  const ManifestJson doc = test_support::manifest_json(m);
  EXPECT_EQ(doc["blocks"][0]["tensors"][0]["chunk_size"], 4096u);
  EXPECT_FALSE(doc["blocks"][1]["tensors"][0].contains("chunk_size"));  // the manifest's: not written
  const Manifest parsed = parse_manifest(serialize_manifest(m), model_.expect);
  test_support::expect_manifests_equal(parsed, m);
  EXPECT_EQ(serialize_manifest(parsed), serialize_manifest(m));
}

TEST_F(SmallChunkManifestTest, Rule_tensor_chunk_size) {
  for (const uint64_t size : std::vector<uint64_t>{0, 1, 2048, 6144, 16384, 32768, 1ull << 40, UINT64_MAX}) {
    SCOPED_TRACE(size);
    expect_rule([&](ManifestJson& doc) { table(doc)["chunk_size"] = size; }, "tensor.chunk_size");
  }
  // Only a positive integer is a size at all; the shape of the document comes first.
  expect_rule([](ManifestJson& doc) { table(doc)["chunk_size"] = "4096"; }, "manifest.schema");
  expect_rule([](ManifestJson& doc) { table(doc)["chunk_size"] = -4096; }, "manifest.schema");
  expect_rule([](ManifestJson& doc) { table(doc)["chunk_size"] = 4096.0; }, "manifest.schema");
}

TEST_F(SmallChunkManifestTest, ChunkRulesFollowTheTensorsChunkSize) {
  // 8192-byte chunks would make 4 of them; the 7 stored ones no longer match.
  expect_rule([](ManifestJson& doc) { table(doc)["chunk_size"] = 8192; }, "tensor.chunk_count");
  // Without the key the manifest's 16384 applies: 2 chunks expected.
  expect_rule([](ManifestJson& doc) { table(doc).erase("chunk_size"); }, "tensor.chunk_count");
  // A compressed chunk must be smaller than its raw bytes: 4096 here (it would pass against the model's 16384).
  expect_rule([](ManifestJson& doc) {
    ManifestJson& chunks = table(doc)["chunks"];
    for (size_t c = 0; c + 1 < chunks.size(); ++c) {
      if (chunks[c]["codec"] != "raw") {
        chunks[c]["size"] = 5000;
        return;
      }
    }
    ADD_FAILURE() << "no compressed chunk of 4096 raw bytes in the table";
  }, "chunk.size");
}

TEST(ManifestDerived, TensorChunkSizeAboveTheModelsIsAWriterError) {
  test_support::ModelSpec spec = test_support::small_chunk_model_spec();
  test_support::BuiltModel model = test_support::build_model(spec);
  model.manifest.tensors[0].chunk_size = 32768;
  try {
    compute_derived_fields(model.manifest);
    ADD_FAILURE() << "a tensor chunk size above the model's was accepted";
  } catch (const FormatError& error) {
    EXPECT_EQ(error.rule(), "tensor.chunk_size");
  }
}

TEST_F(ManifestTest, Rule_chunk_codec) {
  for (const char* codec : {"", "gzip", "LZ4", "none", "zstd "}) {
    SCOPED_TRACE(codec);
    expect_rule(with_json([&](ManifestJson& doc) { chunk(doc, 2, 0, 1)["codec"] = codec; }), "chunk.codec");
  }
}

TEST_F(ManifestTest, Rule_chunk_shuffle) {
  {
    SCOPED_TRACE("shuffle on a raw chunk");
    expect_rule(with_json([](ManifestJson& doc) { chunk(doc, 0, 0, 1)["shuffle"] = 2; }), "chunk.shuffle");
  }
  {
    SCOPED_TRACE("shuffle that is not the dtype size");
    expect_rule(with_json([](ManifestJson& doc) { chunk(doc, 0, 0, 0)["shuffle"] = 4; }), "chunk.shuffle");
    expect_rule(with_json([](ManifestJson& doc) { chunk(doc, 0, 0, 0)["shuffle"] = 1; }), "chunk.shuffle");
    expect_rule(with_json([](ManifestJson& doc) { chunk(doc, 0, 0, 0)["shuffle"] = (1ull << 32) + 2; }),
                "chunk.shuffle");
  }
  {
    SCOPED_TRACE("shuffle on a dtype that is not a 16/32-bit float");
    expect_rule(with_json([](ManifestJson& doc) { tensor(doc, 0, 0)["dtype"] = "int16"; }), "chunk.shuffle");
  }
  {
    SCOPED_TRACE("an exponent chunk without shuffle (its element size)");
    expect_rule(with_json([](ManifestJson& doc) {
                  chunk(doc, 0, 0, 0)["codec"] = "exponent";
                  chunk(doc, 0, 0, 0)["shuffle"] = 0;
                }),
                "chunk.shuffle");
  }
}

TEST_F(ManifestTest, Rule_chunk_size) {
  {
    SCOPED_TRACE("raw chunk shorter than its raw size");
    expect_rule(with_json([](ManifestJson& doc) { chunk(doc, 2, 0, 0)["size"] = 4095; }), "chunk.size");
  }
  {
    SCOPED_TRACE("raw chunk longer than its raw size");
    expect_rule(with_json([](ManifestJson& doc) { chunk(doc, 2, 0, 2)["size"] = 809; }), "chunk.size");
  }
  {
    SCOPED_TRACE("compressed chunk that does not shrink");
    expect_rule(with_json([](ManifestJson& doc) { chunk(doc, 0, 0, 0)["size"] = 4096; }), "chunk.size");
  }
  {
    SCOPED_TRACE("empty compressed chunk");
    expect_rule(with_json([](ManifestJson& doc) { chunk(doc, 0, 0, 0)["size"] = 0; }), "chunk.size");
  }
}

TEST_F(ManifestTest, Rule_chunk_checksum) {
  for (const char* checksum : {"", "0123456789abcde", "0123456789abcdef0", "0123456789ABCDEF", "0x23456789abcdef",
                               "0123456789abcdeg"}) {
    SCOPED_TRACE(checksum);
    expect_rule(with_json([&](ManifestJson& doc) { chunk(doc, 1, 4, 0)["xxh3"] = checksum; }), "chunk.checksum");
  }
}

TEST_F(ManifestTest, Rule_block_offset) {
  expect_rule(with_json([](ManifestJson& doc) {
                block(doc, 1)["offset"] = block(doc, 1)["offset"].get<uint64_t>() + 4096;
              }),
              "block.offset");
  expect_rule(with_json([](ManifestJson& doc) {
                block(doc, 2)["offset"] = block(doc, 2)["offset"].get<uint64_t>() - 4096;
              }),
              "block.offset");
  expect_rule(with_json([](ManifestJson& doc) { block(doc, 0)["offset"] = 4096; }), "block.offset");
}

TEST_F(ManifestTest, Rule_chunk_offset) {
  const auto broken = with_json([](ManifestJson& doc) {
    chunk(doc, 1, 0, 1)["offset"] = chunk(doc, 1, 0, 1)["offset"].get<uint64_t>() + 256;
  });
  expect_rule(broken, "chunk.offset");
  try {
    (void)parse_manifest(broken, model_.expect);
  } catch (const FormatError& error) {
    const uint64_t expected = model_.manifest.chunks[model_.manifest.tensors[2].first_chunk + 1].offset;
    EXPECT_NE(std::string(error.what()).find("tensor 'layers.0.w' chunk 1 starts at " + std::to_string(expected + 256) +
                                             ", expected " + std::to_string(expected)),
              std::string::npos)
        << error.what();
  }
  // A tensor must start 256-aligned, not merely right after the previous one.
  expect_rule(with_json([](ManifestJson& doc) {
                chunk(doc, 1, 1, 0)["offset"] = chunk(doc, 1, 0, 1)["offset"].get<uint64_t>() + 3904;
              }),
              "chunk.offset");
  // Chunks are contiguous: a gap after a compressed chunk is refused too.
  expect_rule(with_json([](ManifestJson& doc) {
                chunk(doc, 0, 0, 1)["offset"] = chunk(doc, 0, 0, 1)["offset"].get<uint64_t>() + 1;
              }),
              "chunk.offset");
}

TEST_F(ManifestTest, Rule_chunk_bounds) {
  expect_rule(with_json([](ManifestJson& doc) { chunk(doc, 2, 0, 0)["offset"] = UINT64_MAX; }), "chunk.bounds");
  expect_rule(with_json([](ManifestJson& doc) {
                chunk(doc, 2, 0, 0)["offset"] = UINT64_MAX - 100;
                chunk(doc, 2, 0, 0)["size"] = 101;
              }),
              "chunk.bounds");
  expect_rule(with_json([](ManifestJson& doc) { chunk(doc, 1, 0, 0)["size"] = UINT64_MAX; }), "chunk.bounds");
}

TEST_F(ManifestTest, Rule_manifest_data_size) {
  const uint64_t data_size = model_.manifest.data_size;
  for (const uint64_t size : {data_size + 4096, data_size - 4096, data_size - 1, uint64_t{0}, UINT64_MAX}) {
    SCOPED_TRACE(size);
    expect_rule(with_json([&](ManifestJson& doc) { doc["data_size"] = size; }), "manifest.data_size");
  }
}

TEST_F(ManifestTest, Rule_data_size) {
  for (const uint64_t size : {model_.manifest.data_size + 1, model_.manifest.data_size - 1, uint64_t{0}}) {
    SCOPED_TRACE(size);
    ManifestExpectations expect = model_.expect;
    expect.data_file_size = size;
    tensorstream::expect_rule(file(), "data.size", expect);
  }
}

TEST(ManifestRules, EmptyModelMustHaveZeroDataSize) {
  test_support::ModelSpec spec;
  spec.store_id = test_support::test_store_id();
  const BuiltModel model = test_support::build_model(spec);
  expect_rule(test_support::mutate_manifest_json(model.manifest, [](ManifestJson& doc) { doc["data_size"] = 4096; }),
              "manifest.data_size", model.expect);
}

// Errors name what is wrong, so a user can find it.
TEST_F(ManifestTest, ErrorsNameTheOffendingRecord) {
  try {
    (void)parse_manifest(with_json([](ManifestJson& doc) { chunk(doc, 2, 0, 1)["codec"] = "gzip"; }), model_.expect);
    ADD_FAILURE();
  } catch (const FormatError& error) {
    const std::string what = error.what();
    EXPECT_NE(what.find("tensor 'head.w' chunk 1"), std::string::npos) << what;
    EXPECT_NE(what.find("'gzip'"), std::string::npos) << what;
    EXPECT_NE(what.find(model_.expect.path), std::string::npos) << what;
  }
  try {
    (void)parse_manifest(with_json([](ManifestJson& doc) { chunk(doc, 2, 0, 1).erase("size"); }), model_.expect);
    ADD_FAILURE();
  } catch (const FormatError& error) {
    EXPECT_NE(std::string(error.what()).find("blocks[2].tensors[0].chunks[1] lacks the key 'size'"),
              std::string::npos)
        << error.what();
  }
  try {
    (void)parse_manifest(with_text([](std::string& t) { t = replace_once(t, "{\"offset\":", "{\"size\":1,\"offset\":"); }),
                         model_.expect);
    ADD_FAILURE();
  } catch (const FormatError& error) {
    EXPECT_NE(std::string(error.what()).find("blocks[0].tensors[0].chunks[0]"), std::string::npos) << error.what();
  }
}

TEST_F(ManifestTest, HugeNamesAreCutInMessages) {
  try {
    (void)parse_manifest(with_json([](ManifestJson& doc) { tensor(doc, 0, 0)["name"] = std::string(100000, 'n'); }),
                         model_.expect);
    ADD_FAILURE();
  } catch (const FormatError& error) {
    EXPECT_EQ(error.rule(), "tensor.name");
    EXPECT_LT(std::string(error.what()).size(), 1000u);
  }
}

// Several rules broken at once: the first in document order is reported.
TEST_F(ManifestTest, FirstViolationInDocumentOrderWins) {
  expect_rule(with_json([](ManifestJson& doc) {
                doc["model_id"] = "other";
                doc["chunk_size"] = 1;
              }),
              "manifest.model_id");
  expect_rule(with_json([](ManifestJson& doc) {
                chunk(doc, 2, 0, 0)["codec"] = "gzip";  // head.w, later block
                tensor(doc, 1, 0)["dtype"] = "nope";    // layers.0.w, earlier block
              }),
              "tensor.dtype");
  expect_rule(with_json([](ManifestJson& doc) {
                doc["data_size"] = 1;
                chunk(doc, 2, 0, 0)["xxh3"] = "x";
              }),
              "chunk.checksum");
}

}  // namespace
}  // namespace tensorstream
