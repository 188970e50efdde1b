// Tests for chunk checksums, hex encoding and the model fingerprint (docs/format.md §6). The checksum and the
// fingerprint are on-disk contracts, so besides behavioural checks each has a known-answer test that rebuilds
// the value from the spec text with xxHash directly.
#include "tensorstream/format/checksum.hpp"

#include <gtest/gtest.h>
#include <xxhash.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace tensorstream {
namespace {

ChunkBinding sample_binding() {
  ChunkBinding binding;
  for (size_t i = 0; i < binding.store_id.size(); ++i) binding.store_id[i] = static_cast<uint8_t>(0x10 + i);
  binding.tensor_index = 3;
  binding.chunk_index = 5;
  binding.file_offset = 7 * 4096 + 256;
  return binding;
}

std::vector<std::byte> sample_bytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::byte> bytes(n);
  for (auto& b : bytes) b = static_cast<std::byte>(rng() & 0xff);
  return bytes;
}

std::span<const std::byte> text_bytes(std::string_view text) { return std::as_bytes(std::span(text)); }

void append_le64(std::vector<uint8_t>& out, uint64_t value) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(value >> (8 * i)));
}

// ---------------------------------------------------------------------------------------------------------
// Chunk checksums

TEST(ChunkChecksum, SeedMatchesSpecRecord) {
  // §6: seed = XXH3-64 (seed 0) of store id (16) | tensor index u64 | chunk index u64 | offset u64, all
  // little-endian. Built byte by byte here, independently of checksum.cpp.
  const ChunkBinding binding = sample_binding();
  std::vector<uint8_t> record(binding.store_id.begin(), binding.store_id.end());
  append_le64(record, binding.tensor_index);
  append_le64(record, binding.chunk_index);
  append_le64(record, binding.file_offset);
  ASSERT_EQ(record.size(), 40u);
  const uint64_t expected_seed = XXH3_64bits(record.data(), record.size());
  EXPECT_EQ(chunk_seed(binding), expected_seed);

  // Pinned value: a change here means existing stores no longer verify. XXH3's output is frozen since
  // xxHash 0.8.0, so this also catches a library that is not the real XXH3.
  EXPECT_EQ(hex64(chunk_seed(binding)), "9a838081e96355f4");

  const auto data = sample_bytes(1000, 1);
  EXPECT_EQ(chunk_checksum(binding, data), XXH3_64bits_withSeed(data.data(), data.size(), expected_seed));
}

TEST(ChunkChecksum, PlainChecksumIsUnseededXxh3) {
  // XXH3_64bits("") is a published reference value; pinning it guards the STORE / manifest header checksums.
  EXPECT_EQ(plain_checksum({}), 0x2D06800538D394C2ULL);
  const auto data = sample_bytes(333, 2);
  EXPECT_EQ(plain_checksum(data), XXH3_64bits(data.data(), data.size()));
}

TEST(ChunkChecksum, EveryBindingFieldChangesTheChecksum) {
  // The binding is what makes a chunk copied to another place fail verification; each field must matter.
  const ChunkBinding base = sample_binding();
  const auto data = sample_bytes(4096, 3);
  const uint64_t reference = chunk_checksum(base, data);

  for (size_t i = 0; i < base.store_id.size(); ++i) {
    for (uint8_t mask : {uint8_t{0x01}, uint8_t{0x80}}) {
      ChunkBinding other = base;
      other.store_id[i] ^= mask;
      EXPECT_NE(chunk_checksum(other, data), reference) << "store id byte " << i;
    }
  }
  for (uint64_t delta : {uint64_t{1}, uint64_t{256}, uint64_t{1} << 32, uint64_t{1} << 63}) {
    ChunkBinding t = base;
    t.tensor_index ^= delta;
    EXPECT_NE(chunk_checksum(t, data), reference) << "tensor index ^ " << delta;
    ChunkBinding c = base;
    c.chunk_index ^= delta;
    EXPECT_NE(chunk_checksum(c, data), reference) << "chunk index ^ " << delta;
    ChunkBinding o = base;
    o.file_offset ^= delta;
    EXPECT_NE(chunk_checksum(o, data), reference) << "offset ^ " << delta;
  }
  // Same numbers in different fields must not collide (each field has its own position in the record).
  ChunkBinding swapped = base;
  std::swap(swapped.tensor_index, swapped.chunk_index);
  EXPECT_NE(chunk_checksum(swapped, data), reference);
  // The chunk that follows in the file (next index, next offset) is the most likely misplacement.
  ChunkBinding next = base;
  next.chunk_index += 1;
  next.file_offset += data.size();
  EXPECT_NE(chunk_checksum(next, data), reference);
}

TEST(ChunkChecksum, EveryDataBitFlipChangesTheChecksum) {
  const ChunkBinding binding = sample_binding();
  auto data = sample_bytes(1024, 4);
  const uint64_t reference = chunk_checksum(binding, data);
  for (size_t pos = 0; pos < data.size(); ++pos) {
    for (int bit = 0; bit < 8; ++bit) {
      const std::byte mask{static_cast<uint8_t>(1u << bit)};
      data[pos] ^= mask;
      EXPECT_NE(chunk_checksum(binding, data), reference) << "byte " << pos << " bit " << bit;
      data[pos] ^= mask;
    }
  }
  // Length is part of what is hashed: a truncated or extended chunk fails too.
  EXPECT_NE(chunk_checksum(binding, std::span(data).first(data.size() - 1)), reference);
  data.push_back(std::byte{0});
  EXPECT_NE(chunk_checksum(binding, data), reference);
}

TEST(ChunkChecksum, Deterministic) {
  const auto data = sample_bytes(5000, 5);
  EXPECT_EQ(chunk_checksum(sample_binding(), data), chunk_checksum(sample_binding(), data));
}

// ---------------------------------------------------------------------------------------------------------
// Hex encoding: one spelling per value (lowercase, fixed width), so manifests compare as text.

TEST(Hex64, KnownValues) {
  EXPECT_EQ(hex64(0), "0000000000000000");
  EXPECT_EQ(hex64(1), "0000000000000001");
  EXPECT_EQ(hex64(0x0123456789abcdefULL), "0123456789abcdef");
  EXPECT_EQ(hex64(UINT64_MAX), "ffffffffffffffff");
}

TEST(Hex64, RoundTrips) {
  std::mt19937_64 rng(6);
  std::vector<uint64_t> values = {0, 1, 0xf, 0x10, UINT64_MAX, uint64_t{1} << 63};
  for (int i = 0; i < 1000; ++i) values.push_back(rng());
  for (uint64_t value : values) {
    const std::string text = hex64(value);
    ASSERT_EQ(text.size(), 16u);
    uint64_t back = ~value;
    ASSERT_TRUE(parse_hex64(text, back)) << text;
    EXPECT_EQ(back, value);
  }
}

TEST(Hex64, RejectsAnythingElse) {
  const char* const bad[] = {
      "",
      "0",
      "000000000000000",    // 15 digits
      "00000000000000000",  // 17 digits
      "ABCDEF0123456789",   // uppercase: valid hex, but not the one spelling
      "abcdef012345678F",   // one uppercase digit
      "0123456789abcdeg",   // non-hex letter
      "0x0123456789abcd",   // prefix
      " 123456789abcdef",   // whitespace
      "123456789abcdef ",
      "-123456789abcdef",  // sign
      "+123456789abcdef",
      "0123456789abcd:f",  // ':' sits just after '9' in ASCII
      "0123456789abcd`f",  // '`' sits just before 'a'
      "0123456789abcd/f",  // '/' sits just before '0'
  };
  for (const char* text : bad) {
    uint64_t value = 0;
    EXPECT_FALSE(parse_hex64(text, value)) << "'" << text << "'";
  }
  // An embedded NUL must not end the string early.
  uint64_t value = 0;
  EXPECT_FALSE(parse_hex64(std::string_view("0123456789abcd\0f", 16), value));
}

TEST(HexBytes, RoundTripsAndKnownValue) {
  const std::vector<uint8_t> bytes = {0x00, 0x01, 0x7f, 0x80, 0xab, 0xff};
  EXPECT_EQ(hex_bytes(bytes), "00017f80abff");
  EXPECT_EQ(hex_bytes({}), "");

  StoreId id = sample_binding().store_id;
  const std::string text = hex_bytes(id);
  EXPECT_EQ(text, "101112131415161718191a1b1c1d1e1f");
  StoreId back{};
  ASSERT_TRUE(parse_hex_bytes(text, back));
  EXPECT_EQ(back, id);

  std::mt19937_64 rng(7);
  for (int i = 0; i < 200; ++i) {
    std::vector<uint8_t> random(static_cast<size_t>(rng() % 40));
    for (auto& b : random) b = static_cast<uint8_t>(rng());
    std::vector<uint8_t> parsed(random.size());
    ASSERT_TRUE(parse_hex_bytes(hex_bytes(random), parsed));
    EXPECT_EQ(parsed, random);
  }
  std::span<uint8_t> empty;
  EXPECT_TRUE(parse_hex_bytes("", empty));
}

TEST(HexBytes, RejectsAnythingElse) {
  const std::string good = "101112131415161718191a1b1c1d1e1f";
  const std::string bad[] = {
      "",
      good.substr(0, 31),                   // odd length
      good.substr(0, 30),                   // one byte short
      good + "00",                          // one byte long
      "101112131415161718191A1B1C1D1E1F",  // uppercase
      "101112131415161718191a1b1c1d1e1g",  // non-hex
      "10111213141516171819 a1b1c1d1e1f",  // space
      std::string("101112131415161718191a1b1c1d1e1\0", 32),
  };
  for (const std::string& text : bad) {
    StoreId id{};
    EXPECT_FALSE(parse_hex_bytes(text, id)) << "'" << text << "'";
  }
}

// ---------------------------------------------------------------------------------------------------------
// Fingerprint

struct TensorSpec {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<std::byte> bytes;
};
struct BlockSpec {
  std::string name;
  std::vector<TensorSpec> tensors;
};

// Feeds a model to a builder in manifest order; `piece` > 0 splits each tensor's bytes into pieces of that size,
// as a reader streaming chunks would.
std::string fingerprint(const std::vector<BlockSpec>& blocks, size_t piece = 0) {
  FingerprintBuilder builder;
  for (const BlockSpec& block : blocks) {
    builder.add_block(block.name);
    for (const TensorSpec& tensor : block.tensors) {
      builder.add_tensor(tensor.name, tensor.dtype, tensor.shape);
      std::span<const std::byte> rest = tensor.bytes;
      if (piece == 0) {
        builder.add_bytes(rest);
        continue;
      }
      while (!rest.empty()) {
        const size_t n = std::min(piece, rest.size());
        builder.add_bytes(rest.first(n));
        rest = rest.subspan(n);
      }
    }
  }
  return builder.finish();
}

// The fingerprint exactly as docs/format.md §6 words it, from XXH3_128bits over explicit byte strings.
std::string spec_fingerprint(const std::vector<BlockSpec>& blocks) {
  auto field = [](std::vector<uint8_t>& out, char tag, std::span<const std::byte> bytes) {
    out.push_back(static_cast<uint8_t>(tag));
    append_le64(out, bytes.size());
    for (std::byte b : bytes) out.push_back(static_cast<uint8_t>(b));
  };
  std::vector<std::pair<std::string, XXH128_hash_t>> digests;
  for (const BlockSpec& block : blocks) {
    std::vector<uint8_t> stream;
    for (const TensorSpec& tensor : block.tensors) {
      field(stream, 'T', text_bytes(tensor.name));
      field(stream, 'D', text_bytes(tensor.dtype));
      std::vector<uint8_t> dims;
      append_le64(dims, tensor.shape.size());
      for (int64_t d : tensor.shape) append_le64(dims, static_cast<uint64_t>(d));
      field(stream, 'S', std::as_bytes(std::span(dims)));
      for (std::byte b : tensor.bytes) stream.push_back(static_cast<uint8_t>(b));  // no prefix
    }
    digests.emplace_back(block.name, XXH3_128bits(stream.data(), stream.size()));
  }
  // "sorted by name (bytewise)": compare as unsigned bytes, like memcmp.
  std::sort(digests.begin(), digests.end(), [](const auto& a, const auto& b) {
    const int c = std::memcmp(a.first.data(), b.first.data(), std::min(a.first.size(), b.first.size()));
    return c != 0 ? c < 0 : a.first.size() < b.first.size();
  });
  std::vector<uint8_t> top;
  for (const auto& [name, digest] : digests) {
    field(top, 'B', text_bytes(name));
    append_le64(top, digest.high64);
    append_le64(top, digest.low64);
  }
  const XXH128_hash_t hash = XXH3_128bits(top.data(), top.size());
  return hex64(hash.high64) + hex64(hash.low64);
}

std::vector<BlockSpec> sample_model() {
  return {
      {"model.layers.1",
       {{"model.layers.1.q.weight", "bfloat16", {4, 8}, sample_bytes(64, 10)},
        {"model.layers.1.q.bias", "float32", {8}, sample_bytes(32, 11)}}},
      {"model.embed", {{"model.embed.weight", "float16", {16, 4}, sample_bytes(128, 12)}}},
      // A name with a byte >= 0x80 ("é"): bytewise order puts it after ASCII, signed-char order would not.
      {"\xc3\xa9tage", {{"scale", "float64", {}, sample_bytes(8, 13)}}},
      {"model.layers.0",
       {{"model.layers.0.q.weight", "bfloat16", {4, 8}, sample_bytes(64, 14)},
        {"empty", "int32", {0, 5}, {}}}},
  };
}

bool is_lower_hex(const std::string& text) {
  return std::all_of(text.begin(), text.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

TEST(Fingerprint, MatchesSpecComputation) {
  const auto model = sample_model();
  EXPECT_EQ(fingerprint(model), spec_fingerprint(model));
  // No blocks at all: XXH3-128 of the empty stream.
  EXPECT_EQ(fingerprint({}), spec_fingerprint({}));
  const XXH128_hash_t empty = XXH3_128bits(nullptr, 0);
  EXPECT_EQ(FingerprintBuilder().finish(), hex64(empty.high64) + hex64(empty.low64));
}

TEST(Fingerprint, IsThirtyTwoLowercaseHexDigits) {
  for (const std::string& fp : {fingerprint(sample_model()), fingerprint({}), FingerprintBuilder().finish()}) {
    EXPECT_EQ(fp.size(), 32u) << fp;
    EXPECT_TRUE(is_lower_hex(fp)) << fp;
  }
}

TEST(Fingerprint, SameInputsSameResult) {
  EXPECT_EQ(fingerprint(sample_model()), fingerprint(sample_model()));
  // finish() is const and may be called repeatedly.
  FingerprintBuilder builder;
  builder.add_block("b");
  builder.add_tensor("t", "uint8", std::vector<int64_t>{2});
  builder.add_bytes(text_bytes("xy"));
  EXPECT_EQ(builder.finish(), builder.finish());
}

TEST(Fingerprint, IndependentOfChunkingAndBlockOrder) {
  // Same weights, different chunk size or block order (defragmentation) => same identity.
  const auto model = sample_model();
  const std::string reference = fingerprint(model);
  for (size_t piece : {size_t{1}, size_t{3}, size_t{7}, size_t{64}}) {
    EXPECT_EQ(fingerprint(model, piece), reference) << "pieces of " << piece;
  }
  auto reordered = model;
  std::reverse(reordered.begin(), reordered.end());
  EXPECT_EQ(fingerprint(reordered), reference);
  std::rotate(reordered.begin(), reordered.begin() + 1, reordered.end());
  EXPECT_EQ(fingerprint(reordered), reference);
}

TEST(Fingerprint, ChangesWithAnyLogicalContent) {
  const auto model = sample_model();
  const std::string reference = fingerprint(model);
  auto expect_differs = [&](const std::vector<BlockSpec>& changed, const char* what) {
    EXPECT_NE(fingerprint(changed), reference) << what;
  };
  {
    auto m = model;
    m[0].name = "model.layers.9";
    expect_differs(m, "block name");
  }
  {
    auto m = model;
    m[0].tensors[0].name += "_";
    expect_differs(m, "tensor name");
  }
  {
    auto m = model;
    m[0].tensors[0].dtype = "float16";  // same size, so the bytes still fit
    expect_differs(m, "dtype");
  }
  {
    auto m = model;
    m[0].tensors[0].shape = {8, 4};
    expect_differs(m, "shape (same element count)");
  }
  {
    auto m = model;
    m[0].tensors[0].shape = {4, 8, 1};
    expect_differs(m, "shape (extra unit dimension)");
  }
  {
    auto m = model;
    m[2].tensors[0].shape = {1};
    expect_differs(m, "scalar vs one-element vector");
  }
  {
    auto m = model;
    std::swap(m[0].tensors[0], m[0].tensors[1]);
    expect_differs(m, "tensor order within a block");
  }
  {
    auto m = model;
    m[1].tensors.push_back(m[0].tensors[1]);
    m[0].tensors.pop_back();
    expect_differs(m, "tensor moved to another block");
  }
  {
    auto m = model;
    m.push_back({"extra", {}});
    expect_differs(m, "extra empty block");
  }
  // Every byte of every tensor matters.
  for (size_t b = 0; b < model.size(); ++b) {
    for (size_t t = 0; t < model[b].tensors.size(); ++t) {
      for (size_t i = 0; i < model[b].tensors[t].bytes.size(); ++i) {
        auto m = model;
        m[b].tensors[t].bytes[i] ^= std::byte{0x01};
        ASSERT_NE(fingerprint(m), reference) << m[b].tensors[t].name << " byte " << i;
      }
    }
  }
}

TEST(Fingerprint, FieldFramingPreventsAmbiguity) {
  // Without length prefixes these pairs would hash the same concatenated text.
  auto one = [](std::string block, std::string tensor, std::string dtype, std::vector<int64_t> shape) {
    return std::vector<BlockSpec>{{std::move(block), {{std::move(tensor), std::move(dtype), std::move(shape), {}}}}};
  };
  EXPECT_NE(fingerprint(one("ab", "c", "int8", {0})), fingerprint(one("a", "bc", "int8", {0})));
  EXPECT_NE(fingerprint(one("b", "xy", "int8", {0})), fingerprint(one("b", "x", "yint8", {0})));
  EXPECT_NE(fingerprint(one("b", "t", "int8", {0})), fingerprint(one("b", "t", "int", {0})));
  // Rank is framed too: {2, 3} is not {2} followed by something that reads as 3.
  EXPECT_NE(fingerprint(one("b", "t", "int8", {2, 3})), fingerprint(one("b", "t", "int8", {6})));
  // A tag byte inside a name must not be mistaken for a field boundary.
  EXPECT_NE(fingerprint(one("b", "tD", "int8", {0})), fingerprint(one("b", "t", "Dint8", {0})));
  // Block names are framed in the outer stream: "ab" + "c" vs "a" + "bc" across two blocks.
  const std::vector<BlockSpec> split_1 = {{"ab", {{"t", "int8", {0}, {}}}}, {"c", {{"u", "int8", {0}, {}}}}};
  const std::vector<BlockSpec> split_2 = {{"a", {{"t", "int8", {0}, {}}}}, {"bc", {{"u", "int8", {0}, {}}}}};
  EXPECT_NE(fingerprint(split_1), fingerprint(split_2));
}

TEST(Fingerprint, MovedBuilderKeepsItsState) {
  FingerprintBuilder builder;
  builder.add_block("b");
  builder.add_tensor("t", "uint8", std::vector<int64_t>{2});
  FingerprintBuilder moved = std::move(builder);
  moved.add_bytes(text_bytes("xy"));
  EXPECT_EQ(moved.finish(), fingerprint({{"b", {{"t", "uint8", {2}, {std::byte{'x'}, std::byte{'y'}}}}}}));
}

}  // namespace
}  // namespace tensorstream
