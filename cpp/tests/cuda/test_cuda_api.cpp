#include "tensorstream/cuda/cuda_api.hpp"

#include <gtest/gtest.h>

#include "tensorstream/cuda/cuda_double.hpp"
#include "tensorstream/error.hpp"

namespace tensorstream {
namespace {

TEST(CudaApi, LoadingAnswersWithAReasonAndNeverThrows) {
  CudaAvailability found;
  std::shared_ptr<CudaApi> api;
  EXPECT_NO_THROW(api = load_cuda(&found, {"/nonexistent/libcufile.so.0"}));
  if (found.available) {
    // A machine with a driver and a device (the GPU check runs this too).
    ASSERT_NE(api, nullptr);
    EXPECT_TRUE(found.reason.empty());
    EXPECT_GT(found.device_count, 0);
    EXPECT_GT(found.driver_version, 0);
    EXPECT_EQ(found.cufile, found.cufile_reason.empty());
  } else {
    EXPECT_EQ(api, nullptr);
    EXPECT_FALSE(found.reason.empty());
    EXPECT_FALSE(found.cufile);
  }
  // The second call answers the same without loading again.
  CudaAvailability again;
  EXPECT_EQ(load_cuda(&again), api);
  EXPECT_EQ(again.reason, found.reason);
  EXPECT_EQ(again.available, found.available);
}

TEST(CudaApi, WithoutADriverTheReasonNamesTheLibrary) {
  CudaAvailability found;
  (void)load_cuda(&found);
  if (found.available) GTEST_SKIP() << "this machine has a CUDA driver";
  EXPECT_NE(found.reason.find("libcuda.so.1"), std::string::npos) << found.reason;
}

TEST(CudaApi, CheckCudaNamesTheCallAndTheDriversError) {
  CudaDouble api;
  EXPECT_NO_THROW(check_cuda(api, kCudaSuccess, "cuInit"));
  try {
    check_cuda(api, kCudaErrorLaunchFailed, "cuMemcpyHtoDAsync");
    ADD_FAILURE() << "no CudaError";
  } catch (const CudaError& error) {
    EXPECT_EQ(error.code(), kCudaErrorLaunchFailed);
    const std::string what = error.what();
    EXPECT_NE(what.find("cuMemcpyHtoDAsync"), std::string::npos) << what;
    EXPECT_NE(what.find("CUDA_ERROR_LAUNCH_FAILED"), std::string::npos) << what;
    EXPECT_NE(what.find("unspecified launch failure"), std::string::npos) << what;
  }
  // An error code the driver does not know still makes a message.
  EXPECT_NE(cuda_error_text(api, 12345, "cuX").find("12345"), std::string::npos);
}

}  // namespace
}  // namespace tensorstream
