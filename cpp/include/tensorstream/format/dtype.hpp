// Element types a store can hold: a closed enum with one stable name per type (the manifest's "dtype").
//
// Thread-safety: free functions over constants; safe from any thread.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace tensorstream {

enum class Dtype : uint8_t {
  kBool,
  kUint8,
  kUint16,
  kUint32,
  kUint64,
  kInt8,
  kInt16,
  kInt32,
  kInt64,
  kFloat16,
  kBfloat16,
  kFloat32,
  kFloat64,
  kComplex32,
  kComplex64,
  kComplex128,
  kFloat8E4M3Fn,
  kFloat8E4M3Fnuz,
  kFloat8E5M2,
  kFloat8E5M2Fnuz,
  kFloat8E8M0Fnu,
};

inline constexpr int kDtypeCount = 21;

// Bytes per element (complex types count both parts).
[[nodiscard]] uint32_t dtype_size(Dtype dtype) noexcept;
// Manifest name, identical to the PyTorch name without the "torch." prefix (e.g. "bfloat16").
[[nodiscard]] std::string_view dtype_name(Dtype dtype) noexcept;
// Inverse of dtype_name; nullopt for any other string.
[[nodiscard]] std::optional<Dtype> dtype_from_name(std::string_view name) noexcept;
// True for the real floating types whose bytes the writer may group by significance (16- and 32-bit floats).
[[nodiscard]] bool dtype_is_groupable_float(Dtype dtype) noexcept;

}  // namespace tensorstream
