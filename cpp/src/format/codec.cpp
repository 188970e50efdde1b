#include "tensorstream/format/codec.hpp"

#include <lz4.h>
#include <lz4hc.h>
// ZSTD_compressSequences (a stable part of zstd's "experimental" section since 1.5.0; libzstd.so exports it) is
// how the exponent codec asks for literals only.
#define ZSTD_STATIC_LINKING_ONLY
#include <zstd.h>

#include <array>
#include <bit>
#include <climits>
#include <cmath>
#include <cstring>
#include <memory>

#include "tensorstream/error.hpp"

namespace tensorstream {

std::string_view codec_name(Codec codec) noexcept {
  switch (codec) {
    case Codec::kRaw: return "raw";
    case Codec::kLz4: return "lz4";
    case Codec::kZstd: return "zstd";
    case Codec::kExponent: return "exponent";
  }
  return "?";
}

std::optional<Codec> codec_from_name(std::string_view name) noexcept {
  if (name == "raw") return Codec::kRaw;
  if (name == "lz4") return Codec::kLz4;
  if (name == "zstd") return Codec::kZstd;
  if (name == "exponent") return Codec::kExponent;
  return std::nullopt;
}

CompressionChoice compression_for_level(int compression_level) {
  // Other dtypes: levels 1-3 favour decode speed (lz4), 4-9 ratio (zstd). Floats: the exponent codec at every
  // level, since on trained weights it is both smaller and faster than lz4/zstd on grouped bytes; from level 6 the
  // grouped zstd result is tried too and the smaller kept (it wins on weights with few distinct values, e.g.
  // dequantised ones). Measured figures: docs/configuration.md "Compression". lz4 level 0 means
  // LZ4_compress_default, > 0 means LZ4 HC at that level.
  static constexpr std::array<CompressionChoice, 10> kTable = {{
      {Codec::kRaw, 0, FloatCoding::kGrouped},
      {Codec::kLz4, 0, FloatCoding::kExponent},
      {Codec::kLz4, 4, FloatCoding::kExponent},
      {Codec::kLz4, 9, FloatCoding::kExponent},
      {Codec::kZstd, 1, FloatCoding::kExponent},
      {Codec::kZstd, 3, FloatCoding::kExponent},
      {Codec::kZstd, 6, FloatCoding::kSmaller},
      {Codec::kZstd, 9, FloatCoding::kSmaller},
      {Codec::kZstd, 15, FloatCoding::kSmaller},
      {Codec::kZstd, 19, FloatCoding::kSmaller},
  }};
  if (compression_level < 0 || compression_level > 9) {
    throw ConfigError("compression_level",
                      std::to_string(compression_level) + " is outside 0..9 (0 = off, 1 = fastest, 9 = smallest)");
  }
  return kTable[static_cast<size_t>(compression_level)];
}

namespace {

// One zstd context of each kind per thread (engine workers, writer threads): creating one costs an allocation
// of a few hundred KiB, too much per 4 MiB chunk.
struct ZstdContextFree {
  void operator()(ZSTD_CCtx* ctx) const noexcept { ZSTD_freeCCtx(ctx); }
  void operator()(ZSTD_DCtx* ctx) const noexcept { ZSTD_freeDCtx(ctx); }
};

ZSTD_CCtx* thread_cctx() {
  thread_local std::unique_ptr<ZSTD_CCtx, ZstdContextFree> ctx(ZSTD_createCCtx());
  if (!ctx) throw std::bad_alloc();
  return ctx.get();
}

ZSTD_DCtx* thread_dctx() {
  thread_local std::unique_ptr<ZSTD_DCtx, ZstdContextFree> ctx(ZSTD_createDCtx());
  if (!ctx) throw std::bad_alloc();
  return ctx.get();
}

// Byte grouping with the element size known at compile time, so that the compiler vectorises the loops (this
// file is built with -O3; the generic loop over a runtime size is several times slower).
template <size_t kSize>
void shuffle_fixed(const std::byte* in, std::byte* out, size_t count) noexcept {
  for (size_t i = 0; i < count; ++i) {
    for (size_t plane = 0; plane < kSize; ++plane) out[plane * count + i] = in[i * kSize + plane];
  }
}

template <size_t kSize>
void unshuffle_fixed(const std::byte* in, std::byte* out, size_t count) noexcept {
  for (size_t i = 0; i < count; ++i) {
    for (size_t plane = 0; plane < kSize; ++plane) out[i * kSize + plane] = in[plane * count + i];
  }
}

// The exponent codec's planes: element i rotated left by one bit, byte k of it in plane k (k = size - 1 is the
// top byte, the exponent). Word is uint16_t or uint32_t.
template <typename Word>
void split_rotated(const std::byte* in, std::byte* planes, size_t count) noexcept {
  constexpr size_t kSize = sizeof(Word);
  for (size_t i = 0; i < count; ++i) {
    Word value;
    std::memcpy(&value, in + i * kSize, kSize);
    value = std::rotl(value, 1);
    for (size_t plane = 0; plane < kSize; ++plane) {
      planes[plane * count + i] = static_cast<std::byte>(value >> (8 * plane));
    }
  }
}

// The inverse: `top` is the decoded exponent plane, `low` the size - 1 raw planes.
template <typename Word>
void merge_rotated(const uint8_t* top, const uint8_t* low, std::byte* out, size_t count) noexcept {
  constexpr size_t kSize = sizeof(Word);
  for (size_t i = 0; i < count; ++i) {
    Word value = static_cast<Word>(static_cast<Word>(top[i]) << (8 * (kSize - 1)));
    for (size_t plane = 0; plane + 1 < kSize; ++plane) {
      value = static_cast<Word>(value | static_cast<Word>(static_cast<Word>(low[plane * count + i]) << (8 * plane)));
    }
    value = std::rotr(value, 1);
    std::memcpy(out + i * kSize, &value, kSize);
  }
}

// A Zstandard frame holding `plane` as Huffman-coded literals, no matches: explicit block delimiters with one
// empty sequence per 128 KiB block. Returns the frame size, or 0 when zstd fails (the chunk then stays raw).
size_t compress_literals(std::span<const std::byte> plane, std::byte* dst, size_t capacity) {
  ZSTD_CCtx* ctx = thread_cctx();
  ZSTD_CCtx_reset(ctx, ZSTD_reset_session_and_parameters);
  if (ZSTD_isError(ZSTD_CCtx_setParameter(ctx, ZSTD_c_compressionLevel, 1)) ||
      ZSTD_isError(ZSTD_CCtx_setParameter(ctx, ZSTD_c_blockDelimiters, ZSTD_sf_explicitBlockDelimiters))) {
    return 0;
  }
  thread_local std::vector<ZSTD_Sequence> delimiters;
  delimiters.clear();
  for (size_t begin = 0; begin < plane.size(); begin += ZSTD_BLOCKSIZE_MAX) {
    ZSTD_Sequence block{};
    block.litLength = static_cast<unsigned>(std::min<size_t>(ZSTD_BLOCKSIZE_MAX, plane.size() - begin));
    delimiters.push_back(block);
  }
  const size_t result =
      ZSTD_compressSequences(ctx, dst, capacity, delimiters.data(), delimiters.size(), plane.data(), plane.size());
  return ZSTD_isError(result) ? 0 : result;
}

// The slice of a float chunk the grouped codec is tried on first, and the gain over the exponent codec that slice
// must show before the whole chunk is encoded again (below, the exponent result is kept).
constexpr size_t kProbeBytes = 64 * 1024;
constexpr double kProbeGain = 0.98;

// Stored form: the exponent plane's frame, then planes 0 .. size - 2 raw. Returns false when not smaller.
bool compress_exponent(std::span<const std::byte> raw, uint32_t size, std::vector<std::byte>& out,
                       std::vector<std::byte>& scratch) {
  const size_t count = raw.size() / size;
  scratch.resize(raw.size());
  if (size == 2) {
    split_rotated<uint16_t>(raw.data(), scratch.data(), count);
  } else {
    split_rotated<uint32_t>(raw.data(), scratch.data(), count);
  }
  const size_t low_bytes = count * (size - 1);
  const std::span<const std::byte> top(scratch.data() + low_bytes, count);
  out.resize(ZSTD_compressBound(count) + low_bytes);
  const size_t frame = compress_literals(top, out.data(), out.size() - low_bytes);
  if (frame == 0 || frame + low_bytes >= raw.size()) return false;
  std::memcpy(out.data() + frame, scratch.data(), low_bytes);
  out.resize(frame + low_bytes);
  return true;
}

bool compress_grouped(std::span<const std::byte> raw, CompressionChoice choice, uint32_t shuffle,
                      std::vector<std::byte>& out, std::vector<std::byte>& scratch) {
  std::span<const std::byte> input = raw;
  if (shuffle > 1) {
    scratch.resize(raw.size());
    shuffle_bytes(raw, scratch, shuffle);
    input = scratch;
  }
  size_t written = 0;
  if (choice.codec == Codec::kLz4) {
    const int src_size = static_cast<int>(input.size());
    out.resize(static_cast<size_t>(LZ4_compressBound(src_size)));
    const auto* src = reinterpret_cast<const char*>(input.data());
    auto* dst = reinterpret_cast<char*>(out.data());
    const int dst_capacity = static_cast<int>(out.size());
    const int result = choice.level > 0 ? LZ4_compress_HC(src, dst, src_size, dst_capacity, choice.level)
                                        : LZ4_compress_default(src, dst, src_size, dst_capacity);
    if (result <= 0) return false;
    written = static_cast<size_t>(result);
  } else if (choice.codec == Codec::kZstd) {
    out.resize(ZSTD_compressBound(input.size()));
    const size_t result = ZSTD_compressCCtx(thread_cctx(), out.data(), out.size(), input.data(), input.size(),
                                            choice.level);
    if (ZSTD_isError(result)) return false;
    written = result;
  } else {
    return false;
  }
  if (written >= raw.size()) return false;  // does not pay: the caller stores the chunk raw
  out.resize(written);
  return true;
}

bool decompress_exponent(std::span<const std::byte> stored, uint32_t size, std::span<std::byte> out,
                         std::vector<std::byte>& scratch) {
  if ((size != 2 && size != 4) || out.size() % size != 0) return false;
  const size_t count = out.size() / size;
  const size_t low_bytes = count * (size - 1);
  const size_t frame = ZSTD_findFrameCompressedSize(stored.data(), stored.size());
  if (ZSTD_isError(frame) || frame > stored.size() || stored.size() - frame != low_bytes) return false;
  if (ZSTD_getFrameContentSize(stored.data(), frame) != count) return false;
  scratch.resize(count);
  const size_t decoded = ZSTD_decompressDCtx(thread_dctx(), scratch.data(), count, stored.data(), frame);
  if (ZSTD_isError(decoded) || decoded != count) return false;
  const auto* top = reinterpret_cast<const uint8_t*>(scratch.data());
  const auto* low = reinterpret_cast<const uint8_t*>(stored.data() + frame);
  if (size == 2) {
    merge_rotated<uint16_t>(top, low, out.data(), count);
  } else {
    merge_rotated<uint32_t>(top, low, out.data(), count);
  }
  return true;
}

}  // namespace

void shuffle_bytes(std::span<const std::byte> in, std::span<std::byte> out, uint32_t element_size) noexcept {
  const size_t count = in.size() / element_size;
  if (count == 0) return;  // empty spans may have null data(); offsetting a null pointer is UB
  switch (element_size) {
    case 2: return shuffle_fixed<2>(in.data(), out.data(), count);
    case 4: return shuffle_fixed<4>(in.data(), out.data(), count);
    case 8: return shuffle_fixed<8>(in.data(), out.data(), count);
    default: break;
  }
  for (size_t plane = 0; plane < element_size; ++plane) {
    std::byte* dst = out.data() + plane * count;
    const std::byte* src = in.data() + plane;
    for (size_t i = 0; i < count; ++i) dst[i] = src[i * element_size];
  }
}

void unshuffle_bytes(std::span<const std::byte> in, std::span<std::byte> out, uint32_t element_size) noexcept {
  const size_t count = in.size() / element_size;
  if (count == 0) return;  // empty spans may have null data(); offsetting a null pointer is UB
  switch (element_size) {
    case 2: return unshuffle_fixed<2>(in.data(), out.data(), count);
    case 4: return unshuffle_fixed<4>(in.data(), out.data(), count);
    case 8: return unshuffle_fixed<8>(in.data(), out.data(), count);
    default: break;
  }
  for (size_t plane = 0; plane < element_size; ++plane) {
    const std::byte* src = in.data() + plane * count;
    std::byte* dst = out.data() + plane;
    for (size_t i = 0; i < count; ++i) dst[i * element_size] = src[i];
  }
}

Codec compress_chunk(std::span<const std::byte> raw, CompressionChoice choice, uint32_t shuffle,
                     std::vector<std::byte>& out, std::vector<std::byte>& scratch) {
  if (choice.codec == Codec::kRaw || raw.empty() || raw.size() > static_cast<size_t>(INT_MAX)) return Codec::kRaw;
  if (shuffle > 1 && raw.size() % shuffle != 0) return Codec::kRaw;  // byte planes need whole elements
  const bool exponent_only = choice.codec == Codec::kExponent;
  const bool exponent_fits = shuffle == 2 || shuffle == 4;
  if (!exponent_fits || (!exponent_only && choice.floats == FloatCoding::kGrouped)) {
    return !exponent_only && compress_grouped(raw, choice, shuffle, out, scratch) ? choice.codec : Codec::kRaw;
  }
  const bool exponent_shrinks = compress_exponent(raw, shuffle, out, scratch);
  const Codec exponent_result = exponent_shrinks ? Codec::kExponent : Codec::kRaw;
  if (exponent_only) return exponent_result;
  thread_local std::vector<std::byte> grouped;
  if (choice.floats == FloatCoding::kExponent) {
    // Trained weights' bytes under the exponent are close to random: only the exponent plane shrinks, and a second
    // encode would just cost time. Weights with few distinct values (dequantised ones) repeat whole byte groups,
    // which LZ matching finds and an order-0 coder cannot; a slice from the middle of the chunk tells which case
    // this is for a sixty-fourth of a 4 MiB chunk's encode.
    if (raw.size() <= 2 * kProbeBytes) return exponent_result;
    const size_t begin = (raw.size() / 2) / shuffle * shuffle;
    thread_local std::vector<std::byte> probe_scratch;
    const double exponent_ratio = exponent_shrinks ? static_cast<double>(out.size()) / raw.size() : 1.0;
    const bool probe_shrinks = compress_grouped(raw.subspan(begin, kProbeBytes), choice, shuffle, grouped,
                                                probe_scratch);
    const double probe_ratio = probe_shrinks ? static_cast<double>(grouped.size()) / kProbeBytes : 1.0;
    if (probe_ratio >= kProbeGain * exponent_ratio) return exponent_result;
  }
  if (!compress_grouped(raw, choice, shuffle, grouped, scratch)) return exponent_result;
  if (exponent_shrinks && out.size() <= grouped.size()) return Codec::kExponent;
  out.swap(grouped);
  return choice.codec;
}

bool decompress_chunk(std::span<const std::byte> stored, Codec codec, uint32_t shuffle, std::span<std::byte> out,
                      std::vector<std::byte>& scratch) noexcept {
  try {
    if (codec == Codec::kRaw) {
      if (stored.size() != out.size()) return false;
      if (!out.empty()) std::memcpy(out.data(), stored.data(), out.size());  // memcpy(nullptr, ..., 0) is UB
      return true;
    }
    if (codec == Codec::kExponent) return decompress_exponent(stored, shuffle, out, scratch);
    if (shuffle > 1 && out.size() % shuffle != 0) return false;
    std::span<std::byte> target = out;
    if (shuffle > 1) {
      scratch.resize(out.size());
      target = scratch;
    }
    if (codec == Codec::kLz4) {
      if (stored.size() > static_cast<size_t>(INT_MAX) || target.size() > static_cast<size_t>(INT_MAX)) return false;
      // LZ4_decompress_safe never writes past the capacity and fails on malformed input.
      const int result = LZ4_decompress_safe(reinterpret_cast<const char*>(stored.data()),
                                             reinterpret_cast<char*>(target.data()), static_cast<int>(stored.size()),
                                             static_cast<int>(target.size()));
      if (result < 0 || static_cast<size_t>(result) != target.size()) return false;
    } else if (codec == Codec::kZstd) {
      // The frame must declare exactly the expected size, and decode to it within the buffer.
      const unsigned long long declared = ZSTD_getFrameContentSize(stored.data(), stored.size());
      if (declared != target.size()) return false;
      if (ZSTD_findFrameCompressedSize(stored.data(), stored.size()) != stored.size()) return false;  // one frame
      const size_t result = ZSTD_decompressDCtx(thread_dctx(), target.data(), target.size(), stored.data(),
                                                stored.size());
      if (ZSTD_isError(result) || result != target.size()) return false;
    } else {
      return false;
    }
    if (shuffle > 1) unshuffle_bytes(scratch, out, shuffle);
    return true;
  } catch (...) {  // scratch or context allocation failure
    return false;
  }
}

}  // namespace tensorstream
