// Tests for the dtype table: names and sizes are part of the manifest format (docs/format.md §4, tensor.dtype),
// so they are checked against a copy of the documented list rather than against the implementation's table.
#include "tensorstream/format/dtype.hpp"

#include <gtest/gtest.h>

#include <set>
#include <string>
#include <string_view>

namespace tensorstream {
namespace {

struct Expected {
  Dtype dtype;
  std::string_view name;
  uint32_t size;
};

// docs/format.md: "bool uint8 uint16 uint32 uint64 int8 int16 int32 int64 float16 bfloat16 float32 float64
// complex32 complex64 complex128 float8_e4m3fn float8_e4m3fnuz float8_e5m2 float8_e5m2fnuz float8_e8m0fnu",
// sizes "1, 1, 2, 4, 8, 1, 2, 4, 8, 2, 2, 4, 8, 4, 8, 16, 1, 1, 1, 1, 1".
constexpr Expected kDocumented[] = {
    {Dtype::kBool, "bool", 1},
    {Dtype::kUint8, "uint8", 1},
    {Dtype::kUint16, "uint16", 2},
    {Dtype::kUint32, "uint32", 4},
    {Dtype::kUint64, "uint64", 8},
    {Dtype::kInt8, "int8", 1},
    {Dtype::kInt16, "int16", 2},
    {Dtype::kInt32, "int32", 4},
    {Dtype::kInt64, "int64", 8},
    {Dtype::kFloat16, "float16", 2},
    {Dtype::kBfloat16, "bfloat16", 2},
    {Dtype::kFloat32, "float32", 4},
    {Dtype::kFloat64, "float64", 8},
    {Dtype::kComplex32, "complex32", 4},
    {Dtype::kComplex64, "complex64", 8},
    {Dtype::kComplex128, "complex128", 16},
    {Dtype::kFloat8E4M3Fn, "float8_e4m3fn", 1},
    {Dtype::kFloat8E4M3Fnuz, "float8_e4m3fnuz", 1},
    {Dtype::kFloat8E5M2, "float8_e5m2", 1},
    {Dtype::kFloat8E5M2Fnuz, "float8_e5m2fnuz", 1},
    {Dtype::kFloat8E8M0Fnu, "float8_e8m0fnu", 1},
};

TEST(Dtype, TableMatchesFormatDoc) {
  ASSERT_EQ(std::size(kDocumented), static_cast<size_t>(kDtypeCount));
  for (const Expected& e : kDocumented) {
    EXPECT_EQ(dtype_name(e.dtype), e.name);
    EXPECT_EQ(dtype_size(e.dtype), e.size) << e.name;
  }
}

TEST(Dtype, EveryEnumValueRoundTripsThroughItsName) {
  // Walk the enum by value, so a dtype added to the enum but missing from the lookup is caught too.
  std::set<std::string_view> names;
  for (int i = 0; i < kDtypeCount; ++i) {
    const auto dtype = static_cast<Dtype>(i);
    const std::string_view name = dtype_name(dtype);
    EXPECT_FALSE(name.empty()) << "dtype " << i;
    EXPECT_TRUE(names.insert(name).second) << "duplicate name " << name;
    const auto back = dtype_from_name(name);
    ASSERT_TRUE(back.has_value()) << name;
    EXPECT_EQ(*back, dtype) << name;
    EXPECT_GE(dtype_size(dtype), 1u) << name;
  }
}

TEST(Dtype, UnknownNamesAreRejected) {
  // Names are exact PyTorch spellings: no aliases ("float", "half"), no case folding, no "torch." prefix, no
  // whitespace, no NUL-terminated prefixes.
  const std::string_view bad[] = {
      "",
      "float",
      "Float32",
      "FLOAT32",
      "half",
      "double",
      "int",
      "long",
      "bf16",
      "fp16",
      "torch.float32",
      "float32 ",
      " float32",
      "float8",
      "float8_e4m3",
      "complex",
      "uint",
      "bool_",
      std::string_view("float32\0", 8),
      std::string_view("float3", 6),
  };
  for (std::string_view name : bad) {
    EXPECT_FALSE(dtype_from_name(name).has_value()) << "'" << std::string(name) << "'";
  }
}

TEST(Dtype, GroupableFloatsAreExactlyFloat16Bfloat16Float32) {
  // chunk.shuffle may be non-zero only for these (docs/format.md §4); float64 and the float8 types are
  // deliberately excluded.
  for (int i = 0; i < kDtypeCount; ++i) {
    const auto dtype = static_cast<Dtype>(i);
    const bool expected = dtype == Dtype::kFloat16 || dtype == Dtype::kBfloat16 || dtype == Dtype::kFloat32;
    EXPECT_EQ(dtype_is_groupable_float(dtype), expected) << dtype_name(dtype);
  }
}

}  // namespace
}  // namespace tensorstream
