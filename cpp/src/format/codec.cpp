#include "tensorstream/format/codec.hpp"

#include <lz4.h>
#include <lz4hc.h>
#include <zstd.h>

#include <array>
#include <climits>
#include <cstring>

#include "tensorstream/error.hpp"

namespace tensorstream {

std::string_view codec_name(Codec codec) noexcept {
  switch (codec) {
    case Codec::kRaw: return "raw";
    case Codec::kLz4: return "lz4";
    case Codec::kZstd: return "zstd";
  }
  return "?";
}

std::optional<Codec> codec_from_name(std::string_view name) noexcept {
  if (name == "raw") return Codec::kRaw;
  if (name == "lz4") return Codec::kLz4;
  if (name == "zstd") return Codec::kZstd;
  return std::nullopt;
}

CompressionChoice compression_for_level(int compression_level) {
  // Levels 1-3 favour decode speed (lz4 decodes at several GB/s per core), 4-9 favour ratio (zstd). The table is
  // documented in docs/format.md §5; lz4 level 0 means LZ4_compress_default, > 0 means LZ4 HC at that level.
  static constexpr std::array<CompressionChoice, 10> kTable = {{
      {Codec::kRaw, 0},
      {Codec::kLz4, 0},
      {Codec::kLz4, 4},
      {Codec::kLz4, 9},
      {Codec::kZstd, 1},
      {Codec::kZstd, 3},
      {Codec::kZstd, 6},
      {Codec::kZstd, 9},
      {Codec::kZstd, 15},
      {Codec::kZstd, 19},
  }};
  if (compression_level < 0 || compression_level > 9) {
    throw ConfigError("compression_level",
                      std::to_string(compression_level) + " is outside 0..9 (0 = off, 1 = fastest, 9 = smallest)");
  }
  return kTable[static_cast<size_t>(compression_level)];
}

void shuffle_bytes(std::span<const std::byte> in, std::span<std::byte> out, uint32_t element_size) noexcept {
  const size_t count = in.size() / element_size;
  if (count == 0) return;  // empty spans may have null data(); offsetting a null pointer is UB
  for (size_t plane = 0; plane < element_size; ++plane) {
    std::byte* dst = out.data() + plane * count;
    const std::byte* src = in.data() + plane;
    for (size_t i = 0; i < count; ++i) dst[i] = src[i * element_size];
  }
}

void unshuffle_bytes(std::span<const std::byte> in, std::span<std::byte> out, uint32_t element_size) noexcept {
  const size_t count = in.size() / element_size;
  if (count == 0) return;  // empty spans may have null data(); offsetting a null pointer is UB
  for (size_t plane = 0; plane < element_size; ++plane) {
    const std::byte* src = in.data() + plane * count;
    std::byte* dst = out.data() + plane;
    for (size_t i = 0; i < count; ++i) dst[i * element_size] = src[i];
  }
}

bool compress_chunk(std::span<const std::byte> raw, CompressionChoice choice, uint32_t shuffle,
                    std::vector<std::byte>& out, std::vector<std::byte>& scratch) {
  if (choice.codec == Codec::kRaw || raw.empty() || raw.size() > static_cast<size_t>(INT_MAX)) return false;
  if (shuffle > 1 && raw.size() % shuffle != 0) return false;  // byte planes need whole elements
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
  } else {
    out.resize(ZSTD_compressBound(input.size()));
    const size_t result = ZSTD_compress(out.data(), out.size(), input.data(), input.size(), choice.level);
    if (ZSTD_isError(result)) return false;
    written = result;
  }
  if (written >= raw.size()) return false;  // does not pay: the caller stores the chunk raw
  out.resize(written);
  return true;
}

bool decompress_chunk(std::span<const std::byte> stored, Codec codec, uint32_t shuffle, std::span<std::byte> out,
                      std::vector<std::byte>& scratch) noexcept {
  try {
    if (codec == Codec::kRaw) {
      if (stored.size() != out.size()) return false;
      if (!out.empty()) std::memcpy(out.data(), stored.data(), out.size());  // memcpy(nullptr, ..., 0) is UB
      return true;
    }
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
      const size_t result = ZSTD_decompress(target.data(), target.size(), stored.data(), stored.size());
      if (ZSTD_isError(result) || result != target.size()) return false;
    } else {
      return false;
    }
    if (shuffle > 1) unshuffle_bytes(scratch, out, shuffle);
    return true;
  } catch (...) {  // scratch allocation failure
    return false;
  }
}

}  // namespace tensorstream
