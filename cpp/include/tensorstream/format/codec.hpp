// Chunk compression: a closed set of codecs, byte grouping for 16- and 32-bit floats, and the mapping from the
// user's compression_level (1-9) to a codec and its level.
//
// Byte grouping ("shuffle") stores byte 0 of every element, then byte 1 of every element, and so on. For
// floats the sign/exponent bytes then sit together and compress well, while mantissa bytes (close to random)
// stay apart (docs/format.md, "Compression").
//
// Thread-safety: free functions; safe from any thread. Each call allocates its own codec context.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

namespace tensorstream {

enum class Codec : uint8_t { kRaw, kLz4, kZstd };

[[nodiscard]] std::string_view codec_name(Codec codec) noexcept;                  // "raw", "lz4", "zstd"
[[nodiscard]] std::optional<Codec> codec_from_name(std::string_view name) noexcept;

struct CompressionChoice {
  Codec codec = Codec::kRaw;
  int level = 0;  // codec-specific: lz4 acceleration (<0) / HC level (>0), zstd level
};

// compression_level 0 means off (kRaw); 1..9 per the table in docs/format.md. Throws ConfigError otherwise.
[[nodiscard]] CompressionChoice compression_for_level(int compression_level);

// Byte grouping of `in` (whose size is a multiple of element_size) into `out` (same size), and its inverse.
void shuffle_bytes(std::span<const std::byte> in, std::span<std::byte> out, uint32_t element_size) noexcept;
void unshuffle_bytes(std::span<const std::byte> in, std::span<std::byte> out, uint32_t element_size) noexcept;

// Compresses `raw` (optionally byte-grouped with `shuffle` = element size, 0 = none) into `out`, which is
// resized. Returns false when the result would not be smaller than raw: the caller then stores the chunk raw.
[[nodiscard]] bool compress_chunk(std::span<const std::byte> raw, CompressionChoice choice, uint32_t shuffle,
                                  std::vector<std::byte>& out, std::vector<std::byte>& scratch);

// Decodes `stored` into exactly out.size() bytes using only bounded APIs. Returns false (never writes past
// out) when the stored bytes do not decode to exactly that size. `scratch` is reused between calls.
[[nodiscard]] bool decompress_chunk(std::span<const std::byte> stored, Codec codec, uint32_t shuffle,
                                    std::span<std::byte> out, std::vector<std::byte>& scratch) noexcept;

}  // namespace tensorstream
