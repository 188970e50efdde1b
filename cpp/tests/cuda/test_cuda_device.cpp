// The engine's CUDA path against a driver: the real one when this machine has a GPU (`ctest -L gpu`, run by
// tools/gpu_check.sh), and the CPU double everywhere else, so the test itself is exercised in every `make test`.
// Device memory comes from cuMemAlloc and is read back with cuMemcpyDtoH, as a C++ user without torch would.
#include <gtest/gtest.h>

#include <cstring>

#include "support/store_fixture.hpp"
#include "support/temp_dir.hpp"
#include "tensorstream/cuda/cuda_double.hpp"
#include "tensorstream/cuda/cuda_transfer.hpp"
#include "tensorstream/engine/engine.hpp"
#include "tensorstream/error.hpp"
#include "tensorstream/store/storage_directory.hpp"

namespace tensorstream {
namespace {

using testing::TestBlock;

class CudaDevice : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "double") {
      api_ = std::make_shared<CudaDouble>();
    } else {
      CudaAvailability found;
      api_ = load_cuda(&found);
      if (!api_) GTEST_SKIP() << "no CUDA driver: " << found.reason;
    }
    check_cuda(*api_, api_->cuInit(0), "cuInit");
    check_cuda(*api_, api_->cuDeviceGet(&device_, 0), "cuDeviceGet");
    check_cuda(*api_, api_->cuDevicePrimaryCtxRetain(&context_, device_), "cuDevicePrimaryCtxRetain");
    check_cuda(*api_, api_->cuCtxSetCurrent(context_), "cuCtxSetCurrent");
  }
  void TearDown() override {
    if (arena_ != 0) (void)api_->cuMemFree(arena_);
    if (context_ != nullptr) (void)api_->cuDevicePrimaryCtxRelease(device_);
  }

  void write(int compression_level) {
    for (size_t i = 0; i < 5; ++i) {
      const std::string name = "layers." + std::to_string(i);
      blocks_.push_back({name, {{name + ".w", Dtype::kBfloat16, {300000}, testing::normal_bf16_bytes(300000, 50 + i)},
                                {name + ".b", Dtype::kUint8, {1000}, testing::random_bytes(1000, 70 + i)}}});
    }
    storage_ = std::make_unique<StorageDirectory>(StorageDirectory::open_or_create(dir_.path()));
    StoreWriteOptions options;
    options.chunk_size = 65536;
    options.compression_level = compression_level;
    (void)testing::write_test_model(*storage_, "m", blocks_, options);
    store_ = std::make_shared<const StoreReader>(StoreReader::open(*storage_, "m"));
  }

  std::span<std::byte> device_arena(uint64_t bytes) {
    check_cuda(*api_, api_->cuMemAlloc(&arena_, bytes), "cuMemAlloc");
    return {reinterpret_cast<std::byte*>(static_cast<uintptr_t>(arena_)), static_cast<size_t>(bytes)};
  }

  // Copies the block's slot back to the host and compares it with what was written.
  void expect_block(size_t block, std::span<const std::byte> slot) {
    std::vector<std::byte> host(slot.size());
    check_cuda(*api_, api_->cuMemcpyDtoH(host.data(), reinterpret_cast<uintptr_t>(slot.data()), slot.size()),
               "cuMemcpyDtoH");
    const Manifest& manifest = store_->manifest();
    size_t t = 0;
    for (const TensorRecord& tensor : manifest.tensors_of(manifest.blocks[block])) {
      const auto& expected = blocks_[block].tensors[t++].bytes;
      ASSERT_TRUE(std::equal(expected.begin(), expected.end(), host.begin() + tensor.slot_offset))
          << "block " << block << " tensor " << tensor.name;
    }
  }

  std::shared_ptr<CudaApi> api_;
  CuDevice device_ = 0;
  CuContext context_ = nullptr;
  CuDevicePtr arena_ = 0;
  testing::TempDir dir_;
  std::vector<TestBlock> blocks_;
  std::unique_ptr<StorageDirectory> storage_;
  std::shared_ptr<const StoreReader> store_;
};

TEST_P(CudaDevice, BlocksStreamThroughTwoSlotsBitExactWithStreamOrdering) {
  for (const int level : {0, 5}) {
    blocks_.clear();
    write(level);
    uint64_t largest = 0;
    for (const auto& block : store_->manifest().blocks) largest = std::max(largest, block.slot_size);
    if (arena_ != 0) {
      (void)api_->cuMemFree(arena_);
      arena_ = 0;
    }
    const std::span<std::byte> arena = device_arena(2 * largest);
    CuStream compute = nullptr;
    check_cuda(*api_, api_->cuStreamCreate(&compute, kCuStreamNonBlocking), "cuStreamCreate");
    {
      Config config;
      config.backend = BackendKind::kCuda;
      config.num_io_threads = 2;
      config.budget_bytes = 2 * largest;  // every block streams through the two slots, twice
      Engine engine(store_, arena, config, nullptr, std::make_unique<CudaTransfer>(api_, 0));
      EXPECT_EQ(engine.slot_access(), SlotAccess::kDeviceByCopy);
      for (int pass = 0; pass < 2; ++pass) {
        for (size_t b = 0; b < blocks_.size(); ++b) {
          Ticket ticket = engine.acquire(b);
          ticket.wait_on_stream(reinterpret_cast<uintptr_t>(compute));
          ASSERT_NE(ticket.ready_event(), 0u);
          check_cuda(*api_, api_->cuStreamSynchronize(compute), "cuStreamSynchronize");
          expect_block(b, ticket.data());
          engine.release(b, reinterpret_cast<uintptr_t>(compute));
        }
      }
      EXPECT_GT(engine.stats().evictions, 0u) << "level " << level;
      EXPECT_GT(engine.stats().staging_bytes, 0u);
    }
    check_cuda(*api_, api_->cuStreamDestroy(compute), "cuStreamDestroy");
  }
}

INSTANTIATE_TEST_SUITE_P(Driver, CudaDevice, ::testing::Values("double", "driver"),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

}  // namespace
}  // namespace tensorstream
