#include "tensorstream/format/dtype.hpp"

#include <array>

namespace tensorstream {

namespace {
struct DtypeInfo {
  Dtype dtype;
  std::string_view name;
  uint32_t size;
  bool groupable_float;
};

// Order matches the enum so that lookup by value is an index.
constexpr std::array<DtypeInfo, kDtypeCount> kDtypes = {{
    {Dtype::kBool, "bool", 1, false},
    {Dtype::kUint8, "uint8", 1, false},
    {Dtype::kUint16, "uint16", 2, false},
    {Dtype::kUint32, "uint32", 4, false},
    {Dtype::kUint64, "uint64", 8, false},
    {Dtype::kInt8, "int8", 1, false},
    {Dtype::kInt16, "int16", 2, false},
    {Dtype::kInt32, "int32", 4, false},
    {Dtype::kInt64, "int64", 8, false},
    {Dtype::kFloat16, "float16", 2, true},
    {Dtype::kBfloat16, "bfloat16", 2, true},
    {Dtype::kFloat32, "float32", 4, true},
    {Dtype::kFloat64, "float64", 8, false},
    {Dtype::kComplex32, "complex32", 4, false},
    {Dtype::kComplex64, "complex64", 8, false},
    {Dtype::kComplex128, "complex128", 16, false},
    {Dtype::kFloat8E4M3Fn, "float8_e4m3fn", 1, false},
    {Dtype::kFloat8E4M3Fnuz, "float8_e4m3fnuz", 1, false},
    {Dtype::kFloat8E5M2, "float8_e5m2", 1, false},
    {Dtype::kFloat8E5M2Fnuz, "float8_e5m2fnuz", 1, false},
    {Dtype::kFloat8E8M0Fnu, "float8_e8m0fnu", 1, false},
}};

const DtypeInfo& info(Dtype dtype) noexcept { return kDtypes[static_cast<size_t>(dtype)]; }
}  // namespace

uint32_t dtype_size(Dtype dtype) noexcept { return info(dtype).size; }
std::string_view dtype_name(Dtype dtype) noexcept { return info(dtype).name; }
bool dtype_is_groupable_float(Dtype dtype) noexcept { return info(dtype).groupable_float; }

std::optional<Dtype> dtype_from_name(std::string_view name) noexcept {
  for (const auto& entry : kDtypes) {
    if (entry.name == name) return entry.dtype;
  }
  return std::nullopt;
}

}  // namespace tensorstream
