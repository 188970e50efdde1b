#include "engine/device_timing.hpp"

#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "tensorstream/cuda/cuda_double.hpp"
#include "tensorstream/cuda/cuda_transfer.hpp"

namespace tensorstream::detail {
namespace {

// Device time, on the double: a stream that sleeps between two timed events has spent that long there.
class DeviceTimingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    api_ = std::make_shared<CudaDouble>();
    transfer_ = std::make_unique<CudaTransfer>(api_, 0);
    ASSERT_EQ(api_->cuInit(0), kCudaSuccess);
    CuContext context = nullptr;
    ASSERT_EQ(api_->cuDevicePrimaryCtxRetain(&context, 0), kCudaSuccess);
    ASSERT_EQ(api_->cuCtxSetCurrent(context), kCudaSuccess);
    ASSERT_EQ(api_->cuStreamCreate(&stream_, 0), kCudaSuccess);
  }
  void TearDown() override { (void)api_->cuStreamDestroy(stream_); }

  // Two timed events on the stream with `ms` of (sleeping) work between them.
  std::pair<EventRef, EventRef> span(int ms) {
    std::exception_ptr error;
    EventRef start = transfer_->record_timed(handle(), &error);
    api_->enqueue(stream_, [ms] { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); });
    EventRef end = transfer_->record_timed(handle(), &error);
    return {start, end};
  }
  uintptr_t handle() const { return reinterpret_cast<uintptr_t>(stream_); }

  std::shared_ptr<CudaDouble> api_;
  std::unique_ptr<CudaTransfer> transfer_;
  CuStream stream_ = nullptr;
};

TEST_F(DeviceTimingTest, StallsCountOnceTheirEventsComplete) {
  Stats stats(2);
  Prefetcher prefetcher(PrefetchStrategy::kAdaptive, 2, 4);
  const std::vector<size_t> position = {0, 1};
  DeviceTiming timing(*transfer_, stats, prefetcher, position);
  auto [start, end] = span(20);
  timing.waited(1, start, end);
  timing.resolve();  // most likely not complete yet: nothing counted, nothing lost
  ASSERT_EQ(api_->cuStreamSynchronize(stream_), kCudaSuccess);
  timing.resolve();
  const StatsSnapshot snapshot = stats.snapshot();
  EXPECT_GE(snapshot.device_stall_ns, 15'000'000u);
  EXPECT_EQ(snapshot.wait_ns, snapshot.device_stall_ns);
  EXPECT_EQ(snapshot.blocks[1].wait_ns, snapshot.device_stall_ns);
  timing.resolve();
  EXPECT_EQ(stats.snapshot().device_stall_ns, snapshot.device_stall_ns) << "counted once";
}

TEST_F(DeviceTimingTest, LoadAndKernelTimesReachTheLookahead) {
  Stats stats(1);
  Prefetcher prefetcher(PrefetchStrategy::kAdaptive, 1, 4);
  const std::vector<size_t> position = {0};
  DeviceTiming timing(*transfer_, stats, prefetcher, position);
  // A 100 ms load and a 10 ms kernel: ten blocks of lookahead would hide the load; the cap is four. (The margin is
  // for a loaded machine: a 10 ms sleep that overruns to 24 ms still needs more than four.)
  auto [load_start, ready] = span(100);
  timing.loaded(0, load_start, ready);
  auto [wait_start, compute_start] = span(0);
  timing.waited(0, wait_start, compute_start);
  api_->enqueue(stream_, [] { std::this_thread::sleep_for(std::chrono::milliseconds(10)); });
  EXPECT_TRUE(timing.released(0, transfer_->record_on_stream(handle())));
  EXPECT_FALSE(timing.released(0, transfer_->record_on_stream(handle()))) << "one release per wait";
  ASSERT_EQ(api_->cuStreamSynchronize(stream_), kCudaSuccess);
  timing.resolve();
  EXPECT_EQ(prefetcher.lookahead(), 4u);
}

}  // namespace
}  // namespace tensorstream::detail
