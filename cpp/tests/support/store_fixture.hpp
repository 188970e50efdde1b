// Small in-memory models and a one-call writer, shared by the store tests.
#pragma once

#include <string>
#include <vector>

#include "tensorstream/store/store_writer.hpp"

namespace tensorstream::testing {

struct TestTensor {
  std::string name;
  Dtype dtype = Dtype::kUint8;
  std::vector<int64_t> shape;
  std::vector<std::byte> bytes;
  uint64_t chunk_size = 0;  // the tensor's own chunk size (StoreWriter::add_tensor); 0 = the model's
};

struct TestBlock {
  std::string name;
  std::vector<TestTensor> tensors;
};

// Three blocks with a mix of dtypes, sizes (empty, scalar, multi-chunk at 4 KiB chunks) and content
// (compressible float-like data and incompressible random bytes). Deterministic for a seed.
[[nodiscard]] std::vector<TestBlock> sample_model(uint64_t seed = 1);

// bf16 values of a normal distribution: realistic weights, compressible by byte grouping.
[[nodiscard]] std::vector<std::byte> normal_bf16_bytes(size_t count, uint64_t seed);

StoreWriteResult write_test_model(const StorageDirectory& storage, const std::string& model_id,
                                  const std::vector<TestBlock>& blocks, StoreWriteOptions options = {});

}  // namespace tensorstream::testing
