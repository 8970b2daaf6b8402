// Backend listing and selection through the C and C++ APIs.
#include <gtest/gtest.h>

#include <string>

#include "flash_attn_plus/flash_attn_plus.hpp"

namespace {

TEST(BackendRegistry, ListsTheCpuBackendAsUsable) {
  bool found = false;
  for (const auto& backend : flash_attn_plus::backends()) {
    if (backend.name == "cpu") {
      found = true;
      EXPECT_TRUE(backend.usable);
      EXPECT_EQ(backend.reason, "");
      EXPECT_NE(backend.details.find("threads"), std::string::npos) << backend.details;
    }
    if (backend.name == "cuda") {
      EXPECT_NE(backend.details.find("kernel cache: "), std::string::npos) << backend.details;
    }
  }
  EXPECT_TRUE(found);
  fap_backend_info info{};
  EXPECT_EQ(fap_backend_get_info(fap_backend_count(), &info), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(fap_last_error()).find("index"), std::string::npos);
  EXPECT_EQ(fap_backend_get_info(0, nullptr), FAP_ERROR_INVALID_ARGUMENT);
}

TEST(BackendRegistry, AutoPicksCpuForHostTensors) {
  flash_attn_plus::ScopedBackend scoped("auto");
  EXPECT_EQ(flash_attn_plus::resolve_backend(FAP_DEVICE_CPU), "cpu");
}

TEST(BackendRegistry, UnknownNamesAreRejected) {
  EXPECT_EQ(fap_set_backend("tpu"), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(fap_last_error()).find("unknown name 'tpu'"), std::string::npos);
  EXPECT_EQ(fap_set_backend(nullptr), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(fap_set_backend("flaggems"), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(fap_last_error()).find("Python package"), std::string::npos);
}

TEST(BackendRegistry, IndexChecksSwitch) {
  const int32_t before = fap_index_checks();
  EXPECT_EQ(fap_set_index_checks(2), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(fap_last_error()).find("enabled: expected 0 or 1, got 2"), std::string::npos);
  EXPECT_EQ(fap_index_checks(), before);
  for (const int32_t enabled : {1, 0}) {
    EXPECT_EQ(fap_set_index_checks(enabled), FAP_SUCCESS);
    EXPECT_EQ(fap_index_checks(), enabled);
  }
  EXPECT_EQ(fap_set_index_checks(before), FAP_SUCCESS);
}

TEST(BackendRegistry, ExplicitCpuRefusesDeviceTensors) {
  flash_attn_plus::ScopedBackend scoped("cpu");
  EXPECT_EQ(flash_attn_plus::backend(), "cpu");
  const char* name = nullptr;
  EXPECT_EQ(fap_resolve_backend(FAP_DEVICE_CUDA, &name), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(fap_last_error()).find("backend 'cpu' cannot run on cuda tensors"), std::string::npos);
}

// Issue-18 regression: an out-of-range device type was loaded as an invalid enum (UB under the sanitizer).
TEST(BackendRegistry, UnknownDeviceTypesAreRejected) {
  const char* name = nullptr;
  EXPECT_EQ(fap_resolve_backend(7, &name), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(fap_last_error()).find("device_type: unknown value 7"), std::string::npos) << fap_last_error();
  EXPECT_EQ(name, nullptr);
}

TEST(BackendRegistry, ScopedSelectionIsRestored) {
  const std::string before = flash_attn_plus::backend();
  {
    flash_attn_plus::ScopedBackend scoped("cpu");
    EXPECT_EQ(flash_attn_plus::backend(), "cpu");
  }
  EXPECT_EQ(flash_attn_plus::backend(), before);
}

TEST(BackendRegistry, CppApiThrowsWithTheMessage) {
  try {
    flash_attn_plus::set_backend("nope");
    FAIL() << "expected an exception";
  } catch (const flash_attn_plus::Error& error) {
    EXPECT_EQ(error.status(), FAP_ERROR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(error.what()).find("unknown name 'nope'"), std::string::npos);
  }
}

}  // namespace
