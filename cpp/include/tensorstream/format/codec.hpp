// Chunk compression: a closed set of codecs, byte grouping for 16- and 32-bit floats, and the mapping from the
// user's compression_level (1-9) to a codec and its level.
//
// Byte grouping ("shuffle") stores byte 0 of every element, then byte 1 of every element, and so on. For
// floats the sign/exponent bytes then sit together and compress well, while mantissa bytes (close to random)
// stay apart (docs/format.md, "Compression").
//
// The exponent codec goes one step further for floats: each element is rotated left by one bit, so that its top
// byte is exactly the 8-bit exponent (bfloat16, float32) or the 5-bit exponent and 3 mantissa bits (float16) and
// the sign moves to bit 0; that top byte plane is entropy-coded (a Zstandard frame made of Huffman-coded literals
// only: no match search, which is what makes it fast) and the other planes are stored raw. Trained weights'
// exponents carry about 2.7 of their 8 bits while sign and mantissa are close to random, so this reaches within
// about 0.5 % of the order-0 bound (8 + H_exp) / 16 for bfloat16 and decodes several times faster than
// LZ-style codecs on the same planes (docs/format.md §5, docs/configuration.md "Compression").
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

enum class Codec : uint8_t { kRaw, kLz4, kZstd, kExponent };

[[nodiscard]] std::string_view codec_name(Codec codec) noexcept;  // "raw", "lz4", "zstd", "exponent"
[[nodiscard]] std::optional<Codec> codec_from_name(std::string_view name) noexcept;

// How chunks of floats (those with a shuffle) are coded.
enum class FloatCoding : uint8_t {
  kGrouped,   // `codec` on the byte-grouped chunk, as for other dtypes
  kExponent,  // the exponent codec; `codec` too when a probe of the chunk's middle shows it smaller
  kSmaller,   // both; the smaller result is kept (costs one extra encode per chunk)
};

struct CompressionChoice {
  Codec codec = Codec::kRaw;  // for chunks of other dtypes, and floats under kGrouped / kSmaller
  int level = 0;              // codec-specific: lz4 acceleration (<0) / HC level (>0), zstd level
  FloatCoding floats = FloatCoding::kGrouped;
};

// compression_level 0 means off (kRaw); 1..9 per the table in docs/format.md. Throws ConfigError otherwise.
[[nodiscard]] CompressionChoice compression_for_level(int compression_level);

// Byte grouping of `in` (whose size is a multiple of element_size) into `out` (same size), and its inverse.
void shuffle_bytes(std::span<const std::byte> in, std::span<std::byte> out, uint32_t element_size) noexcept;
void unshuffle_bytes(std::span<const std::byte> in, std::span<std::byte> out, uint32_t element_size) noexcept;

// Compresses `raw` into `out` (resized). `shuffle` is the element size of a float chunk (2 or 4; it enables byte
// grouping and the exponent codec) or 0. Returns the codec used, or kRaw when no result would be smaller than
// raw: the caller then stores the chunk raw. The chunk's manifest shuffle is `shuffle` for any codec but kRaw.
[[nodiscard]] Codec compress_chunk(std::span<const std::byte> raw, CompressionChoice choice, uint32_t shuffle,
                                   std::vector<std::byte>& out, std::vector<std::byte>& scratch);

// Decodes `stored` into exactly out.size() bytes using only bounded APIs. Returns false (never writes past
// out) when the stored bytes do not decode to exactly that size. `scratch` is reused between calls. kExponent
// needs `shuffle` 2 or 4.
[[nodiscard]] bool decompress_chunk(std::span<const std::byte> stored, Codec codec, uint32_t shuffle,
                                    std::span<std::byte> out, std::vector<std::byte>& scratch) noexcept;

}  // namespace tensorstream
