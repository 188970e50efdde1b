#include "support/store_fixture.hpp"

#include <cmath>
#include <cstring>
#include <random>

#include "support/temp_dir.hpp"

namespace tensorstream::testing {

std::vector<std::byte> normal_bf16_bytes(size_t count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<std::byte> out(count * 2);
  for (size_t i = 0; i < count; ++i) {
    const float value = normal(rng);
    uint32_t bits = 0;
    std::memcpy(&bits, &value, 4);
    const auto high = static_cast<uint16_t>(bits >> 16);  // bf16 = top half of the fp32 bits
    std::memcpy(out.data() + 2 * i, &high, 2);
  }
  return out;
}

std::vector<TestBlock> sample_model(uint64_t seed) {
  std::vector<TestBlock> blocks;
  blocks.push_back({"embed",
                    {{"embed.weight", Dtype::kBfloat16, {64, 80}, normal_bf16_bytes(64 * 80, seed)},
                     {"embed.scale", Dtype::kFloat32, {}, random_bytes(4, seed + 1)}}});
  blocks.push_back({"layers.0",
                    {{"layers.0.w", Dtype::kFloat16, {3000}, normal_bf16_bytes(3000, seed + 2)},
                     {"layers.0.empty", Dtype::kFloat32, {0, 7}, {}},
                     {"layers.0.ids", Dtype::kInt64, {5, 3}, random_bytes(5 * 3 * 8, seed + 3)},
                     {"layers.0.mask", Dtype::kBool, {17}, random_bytes(17, seed + 4)}}});
  blocks.push_back({"layers.1",
                    {{"layers.1.noise", Dtype::kUint8, {9001}, random_bytes(9001, seed + 5)},
                     {"layers.1.w", Dtype::kBfloat16, {4099}, normal_bf16_bytes(4099, seed + 6)}}});
  return blocks;
}

StoreWriteResult write_test_model(const StorageDirectory& storage, const std::string& model_id,
                                  const std::vector<TestBlock>& blocks, StoreWriteOptions options) {
  StoreWriter writer(storage, model_id, std::move(options));
  for (const TestBlock& block : blocks) {
    writer.begin_block(block.name);
    for (const TestTensor& tensor : block.tensors) {
      writer.add_tensor(tensor.name, tensor.dtype, tensor.shape, tensor.bytes, tensor.chunk_size);
    }
  }
  return writer.commit();
}

}  // namespace tensorstream::testing
