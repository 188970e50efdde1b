// The double must behave like CUDA where our code relies on it; otherwise the GPU-path tests prove nothing.
#include "tensorstream/cuda/cuda_double.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "support/fault_backend.hpp"
#include "support/sanitizers.hpp"

namespace tensorstream {
namespace {

using testing::Watchdog;

// Two checks below race on purpose (a source reused under a queued copy; a kernel that skips an event), to show the
// double exposes what CUDA would; they are skipped under ThreadSanitizer, which rightly reports those races.
using testing::kUnderTsan;

class CudaDoubleTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(api_.cuInit(0), kCudaSuccess);
    CuDevice device = 0;
    ASSERT_EQ(api_.cuDeviceGet(&device, 0), kCudaSuccess);
    ASSERT_EQ(api_.cuDevicePrimaryCtxRetain(&context_, device), kCudaSuccess);
    ASSERT_EQ(api_.cuCtxSetCurrent(context_), kCudaSuccess);
  }
  static CuDevicePtr device_pointer(void* host) { return static_cast<CuDevicePtr>(reinterpret_cast<uintptr_t>(host)); }

  // Long enough that a check made right after queuing a copy runs before it even on a loaded 2-core machine.
  CudaDouble api_{CudaDoubleOptions{1, std::chrono::microseconds(50000)}};
  CuContext context_ = nullptr;
};

TEST_F(CudaDoubleTest, CopiesRunLaterInStreamOrderAndReadTheirSourceThen) {
  if (kUnderTsan) GTEST_SKIP() << "races on purpose";
  const Watchdog dog("CudaDoubleTest.CopiesRunLaterInStreamOrderAndReadTheirSourceThen");
  CuStream stream = nullptr;
  ASSERT_EQ(api_.cuStreamCreate(&stream, kCuStreamNonBlocking), kCudaSuccess);
  std::vector<char> source(64, 'a');
  std::vector<char> slot(64, '.');
  ASSERT_EQ(api_.cuMemcpyHtoDAsync(device_pointer(slot.data()), source.data(), 64, stream), kCudaSuccess);
  EXPECT_EQ(slot[0], '.') << "an asynchronous copy must not have run yet (50 ms latency)";
  std::memset(source.data(), 'b', 64);  // reusing the source before the copy ran: the copy sees 'b'
  ASSERT_EQ(api_.cuStreamSynchronize(stream), kCudaSuccess);
  EXPECT_EQ(slot[0], 'b');
  EXPECT_EQ(api_.cuStreamDestroy(stream), kCudaSuccess);
}

TEST_F(CudaDoubleTest, EventsCompleteWhenTheirStreamReachesThemAndWaitsHoldOtherStreams) {
  const Watchdog dog("CudaDoubleTest.EventsCompleteWhenTheirStreamReachesThemAndWaitsHoldOtherStreams");
  CuStream copy = nullptr;
  CuStream compute = nullptr;
  ASSERT_EQ(api_.cuStreamCreate(&copy, 0), kCudaSuccess);
  ASSERT_EQ(api_.cuStreamCreate(&compute, 0), kCudaSuccess);
  CuEvent event = nullptr;
  ASSERT_EQ(api_.cuEventCreate(&event, kCuEventDisableTiming), kCudaSuccess);
  EXPECT_EQ(api_.cuEventQuery(event), kCudaSuccess) << "a never-recorded event is complete";
  std::vector<char> source(32, 'x');
  std::vector<char> slot(32, '.');
  ASSERT_EQ(api_.cuMemcpyHtoDAsync(device_pointer(slot.data()), source.data(), 32, copy), kCudaSuccess);
  ASSERT_EQ(api_.cuEventRecord(event, copy), kCudaSuccess);
  EXPECT_EQ(api_.cuEventQuery(event), kCudaErrorNotReady);
  ASSERT_EQ(api_.cuStreamWaitEvent(compute, event, 0), kCudaSuccess);
  char seen = '?';
  api_.enqueue(compute, [&] { seen = slot[0]; });  // a kernel that reads the slot
  ASSERT_EQ(api_.cuStreamSynchronize(compute), kCudaSuccess);
  EXPECT_EQ(seen, 'x') << "the kernel ran before the event it waited for";
  EXPECT_EQ(api_.cuEventQuery(event), kCudaSuccess);
  if (!kUnderTsan) {
    // Without the wait, a kernel on another stream runs at once and sees the slot before the copy.
    std::vector<char> later(32, '.');
    ASSERT_EQ(api_.cuMemcpyHtoDAsync(device_pointer(later.data()), source.data(), 32, copy), kCudaSuccess);
    char early = '?';
    api_.enqueue(compute, [&] { early = later[0]; });
    ASSERT_EQ(api_.cuStreamSynchronize(compute), kCudaSuccess);
    EXPECT_EQ(early, '.');
    ASSERT_EQ(api_.cuStreamSynchronize(copy), kCudaSuccess);
  }
  ASSERT_EQ(api_.cuEventSynchronize(event), kCudaSuccess);
  EXPECT_EQ(api_.cuEventDestroy(event), kCudaSuccess);
  EXPECT_EQ(api_.cuStreamDestroy(copy), kCudaSuccess);
  EXPECT_EQ(api_.cuStreamDestroy(compute), kCudaSuccess);
  EXPECT_EQ(api_.live_events(), 0u);
  EXPECT_EQ(api_.live_streams(), 0u);
}

TEST_F(CudaDoubleTest, TimedEventsMeasureTheTimeBetweenThem) {
  CuStream stream = nullptr;
  ASSERT_EQ(api_.cuStreamCreate(&stream, 0), kCudaSuccess);
  CuEvent start = nullptr;
  CuEvent end = nullptr;
  CuEvent untimed = nullptr;
  ASSERT_EQ(api_.cuEventCreate(&start, 0), kCudaSuccess);
  ASSERT_EQ(api_.cuEventCreate(&end, 0), kCudaSuccess);
  ASSERT_EQ(api_.cuEventCreate(&untimed, kCuEventDisableTiming), kCudaSuccess);
  std::vector<char> source(8, 'x');
  std::vector<char> slot(8, '.');
  ASSERT_EQ(api_.cuEventRecord(start, stream), kCudaSuccess);
  ASSERT_EQ(api_.cuMemcpyHtoDAsync(device_pointer(slot.data()), source.data(), 8, stream), kCudaSuccess);  // 50 ms
  ASSERT_EQ(api_.cuEventRecord(end, stream), kCudaSuccess);
  ASSERT_EQ(api_.cuEventRecord(untimed, stream), kCudaSuccess);
  float ms = 0;
  EXPECT_EQ(api_.cuEventElapsedTime(&ms, start, end), kCudaErrorNotReady);
  ASSERT_EQ(api_.cuStreamSynchronize(stream), kCudaSuccess);
  ASSERT_EQ(api_.cuEventElapsedTime(&ms, start, end), kCudaSuccess);
  EXPECT_GE(ms, 45.0f) << "the 50 ms copy lies between the two events";
  EXPECT_EQ(api_.cuEventElapsedTime(&ms, start, untimed), kCudaErrorInvalidHandle) << "timing disabled";
  for (CuEvent event : {start, end, untimed}) EXPECT_EQ(api_.cuEventDestroy(event), kCudaSuccess);
  EXPECT_EQ(api_.cuStreamDestroy(stream), kCudaSuccess);
}

TEST_F(CudaDoubleTest, ContextBoundCallsNeedTheContextOnTheCallingThread) {
  CuResult from_other_thread = kCudaSuccess;
  std::thread([&] {
    CuStream stream = nullptr;
    from_other_thread = api_.cuStreamCreate(&stream, 0);
  }).join();
  EXPECT_EQ(from_other_thread, kCudaErrorInvalidContext);
  CudaDouble fresh;
  CuStream stream = nullptr;
  EXPECT_EQ(fresh.cuStreamCreate(&stream, 0), 3) << "before cuInit: CUDA_ERROR_NOT_INITIALIZED";
}

TEST_F(CudaDoubleTest, FailNextFailsExactlyOneCall) {
  CuStream stream = nullptr;
  ASSERT_EQ(api_.cuStreamCreate(&stream, 0), kCudaSuccess);
  std::vector<char> source(8, 'x');
  std::vector<char> slot(8, '.');
  api_.fail_next("cuMemcpyHtoDAsync", kCudaErrorLaunchFailed);
  EXPECT_EQ(api_.cuMemcpyHtoDAsync(device_pointer(slot.data()), source.data(), 8, stream), kCudaErrorLaunchFailed);
  EXPECT_EQ(api_.cuMemcpyHtoDAsync(device_pointer(slot.data()), source.data(), 8, stream), kCudaSuccess);
  ASSERT_EQ(api_.cuStreamSynchronize(stream), kCudaSuccess);
  EXPECT_EQ(slot[0], 'x');
  const char* name = nullptr;
  ASSERT_EQ(api_.cuGetErrorName(kCudaErrorLaunchFailed, &name), kCudaSuccess);
  EXPECT_STREQ(name, "CUDA_ERROR_LAUNCH_FAILED");
  EXPECT_EQ(api_.cuStreamDestroy(stream), kCudaSuccess);
}

TEST_F(CudaDoubleTest, PinnedMemoryIsCountedUntilFreedAndHostFunctionsRunInOrder) {
  void* pinned = nullptr;
  ASSERT_EQ(api_.cuMemHostAlloc(&pinned, 10000, kCuMemHostAllocPortable), kCudaSuccess);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(pinned) % 4096, 0u);
  EXPECT_EQ(api_.pinned_bytes(), 10000u);
  EXPECT_EQ(api_.cuMemFreeHost(pinned), kCudaSuccess);
  EXPECT_EQ(api_.pinned_bytes(), 0u);
  EXPECT_EQ(api_.cuMemFreeHost(pinned), kCudaErrorInvalidValue);
  CuStream stream = nullptr;
  ASSERT_EQ(api_.cuStreamCreate(&stream, 0), kCudaSuccess);
  std::vector<int> order;
  std::vector<char> source(8, 'x');
  std::vector<char> slot(8, '.');
  ASSERT_EQ(api_.cuMemcpyHtoDAsync(device_pointer(slot.data()), source.data(), 8, stream), kCudaSuccess);
  struct Seen {
    std::vector<char>* slot;
    char value = '?';
  } seen{&slot};
  ASSERT_EQ(api_.cuLaunchHostFunc(stream, [](void* p) { static_cast<Seen*>(p)->value = (*static_cast<Seen*>(p)->slot)[0]; },
                                  &seen),
            kCudaSuccess);
  ASSERT_EQ(api_.cuStreamSynchronize(stream), kCudaSuccess);
  EXPECT_EQ(seen.value, 'x') << "a host function runs after the work queued before it";
  const auto log = api_.log();
  ASSERT_GE(log.size(), 2u);
  EXPECT_EQ(log[log.size() - 2].kind, "copy");
  EXPECT_EQ(log.back().kind, "host_func");
  EXPECT_EQ(api_.cuStreamDestroy(stream), kCudaSuccess);
}

}  // namespace
}  // namespace tensorstream
