// The run-time loading of the driver and NVRTC: failures are reported with the exact reason, never a crash.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "src/cuda/cuda_api.h"

namespace fap::cuda {
namespace {

TEST(CudaLoader, MissingDriverIsReportedNotFatal) {
  std::string reason;
  const DriverApi* api = driver(&reason);
  if (api) GTEST_SKIP() << "a CUDA driver is present (version " << api->version << ")";
  EXPECT_NE(reason.find("libcuda.so.1"), std::string::npos) << reason;
}

TEST(CudaLoader, NvrtcCandidatesFollowTheDocumentedOrder) {
  setenv("FLASH_ATTENTION_PLUS_NVRTC", "/opt/custom/libnvrtc.so.13", 1);
  setenv("FLASH_ATTENTION_PLUS_PYTHON_NVRTC_DIR", "/venv/nvidia/cuda_nvrtc/lib", 1);
  setenv("CUDA_HOME", "/opt/cuda-home", 1);
  const std::vector<std::string> candidates = nvrtc_candidates();
  unsetenv("FLASH_ATTENTION_PLUS_NVRTC");
  unsetenv("FLASH_ATTENTION_PLUS_PYTHON_NVRTC_DIR");
  unsetenv("CUDA_HOME");
  ASSERT_GE(candidates.size(), 5u);
  EXPECT_EQ(candidates[0], "/opt/custom/libnvrtc.so.13");
  EXPECT_EQ(candidates[1], "/venv/nvidia/cuda_nvrtc/lib/libnvrtc.so.13");
  EXPECT_EQ(candidates[4], "/opt/cuda-home/lib64/libnvrtc.so.13");
  EXPECT_EQ(candidates.back(), "libnvrtc.so");
}

TEST(CudaLoader, UnloadableNvrtcSaysWhatWasTried) {
  const LoadedNvrtc loaded = load_nvrtc({"/nonexistent/libnvrtc.so.13", "/etc/hostname"});
  EXPECT_FALSE(loaded.error.empty());
  EXPECT_NE(loaded.error.find("/nonexistent/libnvrtc.so.13"), std::string::npos) << loaded.error;
  EXPECT_NE(loaded.error.find("/etc/hostname"), std::string::npos) << loaded.error;
  EXPECT_NE(loaded.error.find("FLASH_ATTENTION_PLUS_NVRTC"), std::string::npos) << loaded.error;
}

TEST(CudaLoader, LibraryWithoutNvrtcSymbolsIsSkipped) {
  const LoadedNvrtc loaded = load_nvrtc({"libm.so.6"});
  EXPECT_NE(loaded.error.find("lacks nvrtcVersion"), std::string::npos) << loaded.error;
}

}  // namespace
}  // namespace fap::cuda
