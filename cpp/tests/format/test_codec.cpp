// Tests for chunk compression (docs/format.md §5): byte grouping, codec round trips at every level, the level
// table, and — most important for a verified store — that decompress_chunk rejects every malformed input
// without writing outside the caller's buffer.
#include "tensorstream/format/codec.hpp"

#include <gtest/gtest.h>
#include <lz4.h>
#include <zstd.h>

#include <algorithm>
#include <bit>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "tensorstream/error.hpp"

namespace tensorstream {
namespace {

constexpr size_t kChunk = 64 * 1024;

std::vector<std::byte> random_bytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::byte> bytes(n);
  for (auto& b : bytes) b = static_cast<std::byte>(rng() & 0xff);
  return bytes;
}

// Round-to-nearest-even float -> bfloat16, as PyTorch does; NaN is not produced by a normal distribution.
uint16_t to_bf16(float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  const uint32_t rounding = 0x7fff + ((bits >> 16) & 1);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

// Weights of a trained layer look like N(0, 0.02): the high byte (sign + most of the exponent) takes few
// values, the low byte (mantissa) is close to uniform. That is the case byte grouping is designed for.
std::vector<std::byte> bf16_normal(size_t n_bytes, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, 0.02f);
  std::vector<std::byte> bytes(n_bytes);
  for (size_t i = 0; i + 1 < n_bytes; i += 2) {
    const uint16_t v = to_bf16(dist(rng));
    bytes[i] = static_cast<std::byte>(v & 0xff);  // little-endian, as the tensor sits in memory
    bytes[i + 1] = static_cast<std::byte>(v >> 8);
  }
  return bytes;
}

std::vector<std::byte> f32_normal(size_t n_bytes, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<std::byte> bytes(n_bytes);
  for (size_t i = 0; i + 3 < n_bytes; i += 4) {
    const float v = dist(rng);
    std::memcpy(bytes.data() + i, &v, 4);
  }
  return bytes;
}

// An output buffer with guard bytes on both sides: decompress_chunk gets only the middle, so any write outside
// it shows up as a changed guard byte (and, under ASan, a write past the whole allocation is reported too).
class GuardedBuffer {
 public:
  static constexpr size_t kGuard = 256;
  static constexpr std::byte kPattern{0xA5};

  explicit GuardedBuffer(size_t size) : size_(size), storage_(new std::byte[size + 2 * kGuard]) {
    std::fill_n(storage_.get(), size + 2 * kGuard, kPattern);
  }
  std::span<std::byte> span() { return {storage_.get() + kGuard, size_}; }
  [[nodiscard]] bool guards_intact() const {
    for (size_t i = 0; i < kGuard; ++i) {
      if (storage_[i] != kPattern || storage_[kGuard + size_ + i] != kPattern) return false;
    }
    return true;
  }

 private:
  size_t size_;
  std::unique_ptr<std::byte[]> storage_;
};

// Copies `bytes` into an allocation of exactly that size, so that ASan reports any read past the stored bytes
// (a std::vector may have spare capacity that hides an over-read).
std::unique_ptr<std::byte[]> exact_copy(std::span<const std::byte> bytes) {
  auto copy = std::make_unique<std::byte[]>(std::max<size_t>(bytes.size(), 1));
  if (!bytes.empty()) std::memcpy(copy.get(), bytes.data(), bytes.size());
  return copy;
}

// decompress_chunk on an exact-size copy of `stored`, into a guarded buffer of `out_size` bytes, with a fresh
// scratch so that its allocation is exactly the decode size too. Fails the test if a guard byte changed.
bool decode_guarded(std::span<const std::byte> stored, Codec codec, uint32_t shuffle, size_t out_size,
                    std::vector<std::byte>* result = nullptr) {
  auto input = exact_copy(stored);
  GuardedBuffer out(out_size);
  std::vector<std::byte> scratch;
  const bool ok = decompress_chunk({input.get(), stored.size()}, codec, shuffle, out.span(), scratch);
  EXPECT_TRUE(out.guards_intact()) << "decompress_chunk wrote outside its output (" << codec_name(codec)
                                   << ", shuffle " << shuffle << ", out " << out_size << ")";
  if (result != nullptr) result->assign(out.span().begin(), out.span().end());
  return ok;
}

std::vector<std::byte> compress_or_fail(std::span<const std::byte> raw, CompressionChoice choice, uint32_t shuffle) {
  std::vector<std::byte> out;
  std::vector<std::byte> scratch;
  const bool ok = compress_chunk(raw, choice, shuffle, out, scratch);
  EXPECT_TRUE(ok) << codec_name(choice.codec) << " level " << choice.level << " shuffle " << shuffle;
  if (!ok) out.clear();  // `out` is unspecified after a false return
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Byte grouping

TEST(Shuffle, PlanesHoldOneByteOfEveryElementAndRoundTrip) {
  // Odd counts catch loops that assume a multiple of a vector width; 0 and 1 are the degenerate cases.
  for (uint32_t element_size : {1u, 2u, 4u, 8u}) {
    for (size_t count : {size_t{0}, size_t{1}, size_t{3}, size_t{7}, size_t{13}, size_t{255}, size_t{1001}}) {
      SCOPED_TRACE("element_size " + std::to_string(element_size) + ", count " + std::to_string(count));
      const size_t n = count * element_size;
      const auto in = random_bytes(n, 1000 + n);
      std::vector<std::byte> shuffled(n);
      shuffle_bytes(in, shuffled, element_size);
      // The layout is part of the on-disk format: plane k, element i sits at k * count + i.
      for (size_t k = 0; k < element_size; ++k) {
        for (size_t i = 0; i < count; ++i) ASSERT_EQ(shuffled[k * count + i], in[i * element_size + k]);
      }
      std::vector<std::byte> back(n);
      unshuffle_bytes(shuffled, back, element_size);
      EXPECT_EQ(back, in);
    }
  }
}

TEST(Shuffle, ElementSizeOneIsIdentity) {
  const auto in = random_bytes(777, 7);
  std::vector<std::byte> out(in.size());
  shuffle_bytes(in, out, 1);
  EXPECT_EQ(out, in);
}

// ---------------------------------------------------------------------------------------------------------
// Codec names and the level table

TEST(CodecName, RoundTripsAndRejectsOthers) {
  for (Codec codec : {Codec::kRaw, Codec::kLz4, Codec::kZstd}) {
    const auto back = codec_from_name(codec_name(codec));
    ASSERT_TRUE(back.has_value());
    EXPECT_EQ(*back, codec);
  }
  EXPECT_EQ(codec_name(Codec::kRaw), "raw");
  EXPECT_EQ(codec_name(Codec::kLz4), "lz4");
  EXPECT_EQ(codec_name(Codec::kZstd), "zstd");
  // The manifest's codec names are exact: no case folding, no aliases.
  for (const char* name : {"", "RAW", "Lz4", "zstd ", "lz4hc", "zst", "none", "gzip"}) {
    EXPECT_FALSE(codec_from_name(name).has_value()) << name;
  }
}

TEST(CompressionLevel, TableMatchesFormatDoc) {
  // docs/format.md §5. lz4 "default" is level 0 here (LZ4_compress_default); > 0 selects LZ4 HC.
  struct Row {
    int level;
    Codec codec;
    int codec_level;
  };
  const Row table[] = {
      {0, Codec::kRaw, 0},  {1, Codec::kLz4, 0},   {2, Codec::kLz4, 4},   {3, Codec::kLz4, 9},
      {4, Codec::kZstd, 1}, {5, Codec::kZstd, 3},  {6, Codec::kZstd, 6},  {7, Codec::kZstd, 9},
      {8, Codec::kZstd, 15}, {9, Codec::kZstd, 19},
  };
  for (const Row& row : table) {
    const CompressionChoice choice = compression_for_level(row.level);
    EXPECT_EQ(choice.codec, row.codec) << "level " << row.level;
    EXPECT_EQ(choice.level, row.codec_level) << "level " << row.level;
  }
}

TEST(CompressionLevel, OutOfRangeThrowsConfigErrorNamingTheField) {
  for (int level : {-1, 10, INT_MIN, INT_MAX}) {
    try {
      (void)compression_for_level(level);
      ADD_FAILURE() << "no exception for level " << level;
    } catch (const ConfigError& error) {
      EXPECT_EQ(error.field(), "compression_level");
      EXPECT_NE(std::string(error.what()).find(std::to_string(level)), std::string::npos)
          << "the message should quote the bad value: " << error.what();
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Round trips

struct Dataset {
  const char* name;
  std::vector<std::byte> bytes;
  std::vector<uint32_t> shuffles;  // 0 = none, else the element size the writer would use
};

std::vector<Dataset> compressible_datasets() {
  return {
      {"bf16 normal", bf16_normal(kChunk, 11), {0, 2}},
      {"f32 normal", f32_normal(kChunk, 12), {0, 4}},
      {"zeros", std::vector<std::byte>(kChunk), {0, 2, 4}},
  };
}

TEST(CompressChunk, RoundTripsAtEveryLevel) {
  for (const Dataset& data : compressible_datasets()) {
    for (uint32_t shuffle : data.shuffles) {
      for (int level = 1; level <= 9; ++level) {
        SCOPED_TRACE(std::string(data.name) + ", shuffle " + std::to_string(shuffle) + ", level " +
                     std::to_string(level));
        const CompressionChoice choice = compression_for_level(level);
        std::vector<std::byte> stored;
        std::vector<std::byte> scratch;
        if (!compress_chunk(data.bytes, choice, shuffle, stored, scratch)) {
          // Plain lz4 has no entropy coder, so interleaved near-random mantissa bytes can leave it nothing to
          // gain; declining (the writer then stores raw) is correct there and only there.
          EXPECT_TRUE(choice.codec == Codec::kLz4 && shuffle == 0 && data.bytes != std::vector<std::byte>(kChunk))
              << "declined to compress";
          continue;
        }
        // chunk.size: a compressed chunk is non-empty and strictly smaller than its raw size.
        EXPECT_GT(stored.size(), 0u);
        EXPECT_LT(stored.size(), data.bytes.size());
        std::vector<std::byte> decoded;
        ASSERT_TRUE(decode_guarded(stored, choice.codec, shuffle, data.bytes.size(), &decoded));
        EXPECT_EQ(decoded, data.bytes);
      }
    }
  }
}

TEST(CompressChunk, ZstdOutputIsOneFrameDeclaringItsSize) {
  // The reader insists on exactly one frame with a content size; the writer must produce just that.
  const auto raw = bf16_normal(kChunk, 13);
  for (int level = 4; level <= 9; ++level) {
    const auto stored = compress_or_fail(raw, compression_for_level(level), 2);
    EXPECT_EQ(ZSTD_getFrameContentSize(stored.data(), stored.size()), raw.size()) << "level " << level;
    EXPECT_EQ(ZSTD_findFrameCompressedSize(stored.data(), stored.size()), stored.size()) << "level " << level;
  }
}

TEST(CompressChunk, ReusedBuffersDoNotLeakBetweenCalls) {
  // The writer reuses `out` and `scratch` across chunks; a larger earlier chunk must not affect a later one.
  std::vector<std::byte> stored;
  std::vector<std::byte> scratch;
  const auto big = bf16_normal(kChunk, 14);
  const auto small = bf16_normal(4096, 15);
  const CompressionChoice choice = compression_for_level(5);
  ASSERT_TRUE(compress_chunk(big, choice, 2, stored, scratch));
  ASSERT_TRUE(compress_chunk(small, choice, 2, stored, scratch));
  std::vector<std::byte> out(small.size());
  ASSERT_TRUE(decompress_chunk(stored, choice.codec, 2, out, scratch));
  EXPECT_EQ(out, small);
}

TEST(CompressChunk, IncompressibleDataIsStoredRaw) {
  // Random bytes cannot shrink; compress_chunk must say so (false) rather than hand back a bigger "compressed"
  // chunk, which chunk.size forbids.
  const auto raw = random_bytes(kChunk, 21);
  for (uint32_t shuffle : {0u, 2u, 4u}) {
    for (int level = 1; level <= 9; ++level) {
      std::vector<std::byte> stored;
      std::vector<std::byte> scratch;
      EXPECT_FALSE(compress_chunk(raw, compression_for_level(level), shuffle, stored, scratch))
          << "shuffle " << shuffle << ", level " << level;
    }
  }
}

TEST(CompressChunk, RawChoiceAndEmptyInputAreNotCompressed) {
  std::vector<std::byte> stored;
  std::vector<std::byte> scratch;
  const auto zeros = std::vector<std::byte>(kChunk);
  EXPECT_FALSE(compress_chunk(zeros, compression_for_level(0), 0, stored, scratch));
  EXPECT_FALSE(compress_chunk({}, compression_for_level(5), 0, stored, scratch));
  EXPECT_FALSE(compress_chunk({}, compression_for_level(1), 2, stored, scratch));
}

TEST(CompressChunk, ByteGroupingImprovesZstdOnBf16) {
  // The reason shuffle exists: on bf16 weights, grouping the exponent bytes together lets zstd's entropy
  // coder see their skewed distribution instead of one mixed with near-uniform mantissa bytes.
  const auto raw = bf16_normal(4 * kChunk, 31);
  const CompressionChoice choice = compression_for_level(5);  // zstd 3, the "balanced" default
  const auto plain = compress_or_fail(raw, choice, 0);
  const auto grouped = compress_or_fail(raw, choice, 2);
  const double ratio_plain = static_cast<double>(raw.size()) / static_cast<double>(plain.size());
  const double ratio_grouped = static_cast<double>(raw.size()) / static_cast<double>(grouped.size());
  std::printf("bf16 N(0,0.02), %zu bytes, zstd level 3: ratio %.3f without shuffle, %.3f with shuffle\n",
              raw.size(), ratio_plain, ratio_grouped);
  EXPECT_GT(ratio_grouped, ratio_plain);
  EXPECT_GE(ratio_grouped, 1.15) << "shuffle should cut bf16 weights by at least 1.15x";
}

// ---------------------------------------------------------------------------------------------------------
// Rejection of malformed stored bytes

struct CompressedCase {
  std::string label;
  Codec codec;
  uint32_t shuffle;
  std::vector<std::byte> raw;
  std::vector<std::byte> stored;
};

std::vector<CompressedCase> compressed_cases(size_t raw_size) {
  std::vector<CompressedCase> cases;
  const auto raw = bf16_normal(raw_size, 41);
  // lz4 fast, lz4 HC and zstd. lz4 (no entropy coder) does not reliably shrink ungrouped bf16 — see
  // RoundTripsAtEveryLevel — so lz4 runs on grouped bytes only; ungrouped lz4 is covered by the wordy sweep.
  const std::pair<int, uint32_t> configs[] = {{1, 2}, {3, 2}, {5, 0}, {5, 2}};
  for (const auto& [level, shuffle] : configs) {
    {
      const CompressionChoice choice = compression_for_level(level);
      CompressedCase c{std::string(codec_name(choice.codec)) + " level " + std::to_string(level) + " shuffle " +
                           std::to_string(shuffle),
                       choice.codec, shuffle, raw, {}};
      c.stored = compress_or_fail(raw, choice, shuffle);
      cases.push_back(std::move(c));
    }
  }
  return cases;
}

TEST(DecompressChunk, TruncatedStoredBytesAreRejected) {
  for (const CompressedCase& c : compressed_cases(kChunk)) {
    SCOPED_TRACE(c.label);
    // Every short prefix, then a stride through the rest, then every length near the end (where a decoder
    // is most likely to stop "successfully" with fewer bytes).
    std::vector<size_t> lengths;
    for (size_t n = 0; n < std::min<size_t>(64, c.stored.size()); ++n) lengths.push_back(n);
    for (size_t n = 64; n < c.stored.size(); n += 97) lengths.push_back(n);
    for (size_t n = c.stored.size() > 32 ? c.stored.size() - 32 : 0; n < c.stored.size(); ++n) lengths.push_back(n);
    for (size_t n : lengths) {
      EXPECT_FALSE(decode_guarded(std::span(c.stored).first(n), c.codec, c.shuffle, c.raw.size()))
          << "accepted a prefix of " << n << " of " << c.stored.size() << " bytes";
    }
  }
}

// Decodes `stored` with the codec's own bounded API into a buffer larger than `expected`, returning how many
// bytes it really produces (-1 on error). This is an independent check of "decodes to exactly raw_size".
long long independent_decoded_size(std::span<const std::byte> stored, Codec codec, size_t expected) {
  static std::vector<std::byte> big;  // reused: the sweeps call this tens of thousands of times
  big.resize(expected * 2 + 64);
  if (codec == Codec::kLz4) {
    const int n = LZ4_decompress_safe(reinterpret_cast<const char*>(stored.data()), reinterpret_cast<char*>(big.data()),
                                      static_cast<int>(stored.size()), static_cast<int>(big.size()));
    return n < 0 ? -1 : n;
  }
  const size_t n = ZSTD_decompress(big.data(), big.size(), stored.data(), stored.size());
  return ZSTD_isError(n) ? -1 : static_cast<long long>(n);
}

// Text-like data (words from a small vocabulary): unlike float weights it compresses mostly into lz4/zstd
// sequences (match lengths, offsets) rather than literals, so a flip sweep over it exercises the decoders'
// structural checks instead of just changing literal bytes.
std::vector<std::byte> wordy(size_t n, uint64_t seed) {
  static const char* const kWords[] = {"tensor ", "chunk ", "store ", "bfloat16 ", "layer.", "weight ",
                                       "bias ",   "0.",     "12",     "attn.",     "mlp.",   "\n"};
  std::mt19937_64 rng(seed);
  std::vector<std::byte> bytes;
  while (bytes.size() < n) {
    for (const char* c = kWords[rng() % std::size(kWords)]; *c != 0 && bytes.size() < n; ++c) {
      bytes.push_back(static_cast<std::byte>(*c));
    }
  }
  return bytes;
}

// One flipped bit at every position of `c.stored`. A checksum catches content changes; the codec layer's job
// is narrower: never crash, never write outside `out`, and only report success when the bytes really decode to
// exactly raw_size (a flip inside lz4 literals or zstd entropy-coded content may decode fine to different
// data — allowed here, caught by the chunk checksum).
void flip_sweep(const CompressedCase& c) {
  SCOPED_TRACE(c.label);
  ASSERT_FALSE(c.stored.empty());
  // Buffers are set up once (tens of thousands of decodes): the input is an exact-size allocation flipped in
  // place, the output keeps its guards (re-checked after every decode), and scratch is sized from empty so its
  // capacity equals the decode size and ASan sees any overrun of it.
  auto corrupt = exact_copy(c.stored);
  const std::span<std::byte> input(corrupt.get(), c.stored.size());
  GuardedBuffer out(c.raw.size());
  std::vector<std::byte> scratch;
  scratch.resize(c.raw.size());
  size_t accepted = 0;
  for (size_t pos = 0; pos < input.size(); ++pos) {
    const std::byte mask{static_cast<uint8_t>(1u << (pos % 8))};
    input[pos] ^= mask;
    const bool ok = decompress_chunk(input, c.codec, c.shuffle, out.span(), scratch);
    ASSERT_TRUE(out.guards_intact()) << "wrote outside out after a flip at byte " << pos;
    ASSERT_EQ(scratch.size(), c.raw.size());
    if (ok) {
      ++accepted;
      ASSERT_EQ(independent_decoded_size(input, c.codec, c.raw.size()), static_cast<long long>(c.raw.size()))
          << "accepted a flip at byte " << pos << " that does not decode to exactly raw_size";
    }
    input[pos] ^= mask;
  }
  std::printf("  %-28s %6zu raw, %6zu stored: %6zu flips decode to the right size, %6zu rejected\n", c.label.c_str(),
              c.raw.size(), input.size(), accepted, input.size() - accepted);
}

TEST(DecompressChunk, FlippedByteSweepOverBf16NeverCrashesOrMisreportsSize) {
  // 16 KiB keeps the sweep (every stored byte, four configurations) fast under sanitizers; weights mostly
  // become literals, so most flips here still decode.
  for (const CompressedCase& c : compressed_cases(16 * 1024)) flip_sweep(c);
}

TEST(DecompressChunk, FlippedByteSweepOverStructuredDataNeverCrashesOrMisreportsSize) {
  // A full 64 KiB chunk of match-heavy data, so that flips land in sequence headers, offsets and lengths.
  const auto raw = wordy(kChunk, 91);
  for (int level : {1, 3, 5}) {
    const CompressionChoice choice = compression_for_level(level);
    CompressedCase c{"wordy " + std::string(codec_name(choice.codec)) + " level " + std::to_string(level),
                     choice.codec, 0, raw, compress_or_fail(raw, choice, 0)};
    flip_sweep(c);
  }
}

TEST(DecompressChunk, WrongExpectedSizeIsRejected) {
  for (const CompressedCase& c : compressed_cases(kChunk)) {
    SCOPED_TRACE(c.label);
    // ±1 for every case; with shuffle 2 an odd size is rejected up front, so ±2 also reaches the decoder.
    for (long long delta : {-2LL, -1LL, 1LL, 2LL, -static_cast<long long>(c.raw.size()) / 2}) {
      const size_t size = static_cast<size_t>(static_cast<long long>(c.raw.size()) + delta);
      EXPECT_FALSE(decode_guarded(c.stored, c.codec, c.shuffle, size)) << "expected size off by " << delta;
    }
    EXPECT_FALSE(decode_guarded(c.stored, c.codec, c.shuffle, 0));
    EXPECT_TRUE(decode_guarded(c.stored, c.codec, c.shuffle, c.raw.size()));
  }
}

TEST(DecompressChunk, WrongShuffleOrCodecGivesWrongBytesOrFailure) {
  // Shuffle is not self-describing: decoding with the wrong value still "succeeds" with permuted bytes. The
  // manifest's shuffle field is covered by the chunk checksum's caller, so just check nothing breaks here.
  const auto raw = bf16_normal(kChunk, 51);
  const auto stored = compress_or_fail(raw, compression_for_level(5), 2);
  std::vector<std::byte> decoded;
  ASSERT_TRUE(decode_guarded(stored, Codec::kZstd, 0, raw.size(), &decoded));
  EXPECT_NE(decoded, raw);
  // zstd bytes handed to the lz4 decoder, and vice versa, must not pass.
  EXPECT_FALSE(decode_guarded(stored, Codec::kLz4, 2, raw.size()));
  const auto lz4_stored = compress_or_fail(raw, compression_for_level(1), 2);
  EXPECT_FALSE(decode_guarded(lz4_stored, Codec::kZstd, 2, raw.size()));
  // A codec value outside the enum (a corrupted in-memory manifest) fails instead of falling through.
  EXPECT_FALSE(decode_guarded(stored, static_cast<Codec>(7), 2, raw.size()));
}

TEST(DecompressChunk, EmptyStoredBytesAreRejected) {
  EXPECT_FALSE(decode_guarded({}, Codec::kLz4, 0, kChunk));
  EXPECT_FALSE(decode_guarded({}, Codec::kZstd, 0, kChunk));
  EXPECT_FALSE(decode_guarded({}, Codec::kZstd, 2, kChunk));
}

std::vector<std::byte> zstd_frame(std::span<const std::byte> src, bool with_content_size) {
  ZSTD_CCtx* cctx = ZSTD_createCCtx();
  ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, 3);
  ZSTD_CCtx_setParameter(cctx, ZSTD_c_contentSizeFlag, with_content_size ? 1 : 0);
  std::vector<std::byte> out(ZSTD_compressBound(src.size()));
  const size_t n = ZSTD_compress2(cctx, out.data(), out.size(), src.data(), src.size());
  ZSTD_freeCCtx(cctx);
  EXPECT_FALSE(ZSTD_isError(n));
  out.resize(ZSTD_isError(n) ? 0 : n);
  return out;
}

TEST(DecompressChunk, ZstdMustBeExactlyOneFrame) {
  // chunk.codec "zstd" means one frame. Extra frames or trailing bytes would let a chunk carry data the
  // reader never checks, or make two readers disagree on its contents.
  const auto raw = bf16_normal(kChunk, 61);
  const auto half = std::span(raw).first(raw.size() / 2);
  const auto rest = std::span(raw).subspan(raw.size() / 2);

  // Two halves in two frames: together they decode to raw, but the first frame declares only half.
  auto two = zstd_frame(half, true);
  const auto second = zstd_frame(rest, true);
  two.insert(two.end(), second.begin(), second.end());
  ASSERT_EQ(independent_decoded_size(two, Codec::kZstd, raw.size()), static_cast<long long>(raw.size()));
  EXPECT_FALSE(decode_guarded(two, Codec::kZstd, 0, raw.size()));

  // A complete, correctly sized frame followed by a second frame or by loose bytes.
  const auto whole = zstd_frame(raw, true);
  ASSERT_TRUE(decode_guarded(whole, Codec::kZstd, 0, raw.size()));
  auto with_frame = whole;
  const auto extra = zstd_frame(half, true);
  with_frame.insert(with_frame.end(), extra.begin(), extra.end());
  EXPECT_FALSE(decode_guarded(with_frame, Codec::kZstd, 0, raw.size()));
  auto with_tail = whole;
  with_tail.push_back(std::byte{0});
  EXPECT_FALSE(decode_guarded(with_tail, Codec::kZstd, 0, raw.size()));

  // A skippable frame (magic 0x184D2A50, 4-byte length, payload) in front of a good frame.
  std::vector<std::byte> skippable = {std::byte{0x50}, std::byte{0x2A}, std::byte{0x4D}, std::byte{0x18},
                                      std::byte{4},    std::byte{0},    std::byte{0},    std::byte{0},
                                      std::byte{1},    std::byte{2},    std::byte{3},    std::byte{4}};
  skippable.insert(skippable.end(), whole.begin(), whole.end());
  EXPECT_FALSE(decode_guarded(skippable, Codec::kZstd, 0, raw.size()));
}

TEST(DecompressChunk, ZstdFrameWithoutContentSizeIsRejected) {
  // Without a declared size the reader cannot tell "decoded exactly raw_size" from "stopped at the buffer
  // end", so such frames are refused even though they are otherwise valid.
  const auto raw = bf16_normal(kChunk, 71);
  const auto frame = zstd_frame(raw, false);
  ASSERT_EQ(ZSTD_getFrameContentSize(frame.data(), frame.size()), ZSTD_CONTENTSIZE_UNKNOWN);
  ASSERT_EQ(independent_decoded_size(frame, Codec::kZstd, raw.size()), static_cast<long long>(raw.size()));
  EXPECT_FALSE(decode_guarded(frame, Codec::kZstd, 0, raw.size()));
}

TEST(DecompressChunk, RawRequiresExactSize) {
  const auto raw = random_bytes(4096, 81);
  std::vector<std::byte> decoded;
  ASSERT_TRUE(decode_guarded(raw, Codec::kRaw, 0, raw.size(), &decoded));
  EXPECT_EQ(decoded, raw);
  EXPECT_FALSE(decode_guarded(raw, Codec::kRaw, 0, raw.size() - 1));
  EXPECT_FALSE(decode_guarded(raw, Codec::kRaw, 0, raw.size() + 1));
  EXPECT_FALSE(decode_guarded(std::span(raw).first(raw.size() - 1), Codec::kRaw, 0, raw.size()));
  // An empty raw chunk (null data pointers) is a valid, if degenerate, exact match.
  std::vector<std::byte> scratch;
  EXPECT_TRUE(decompress_chunk({}, Codec::kRaw, 0, {}, scratch));
}

}  // namespace
}  // namespace tensorstream
