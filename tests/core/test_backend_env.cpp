// Run by ctest with FLASH_ATTENTION_PLUS_BACKEND set (see tests/CMakeLists.txt): the variable sets the
// initial selection.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "flash_attn_plus/flash_attn_plus.h"

TEST(BackendEnvironment, VariableSetsTheInitialChoice) {
  const char* expected = std::getenv("FAP_EXPECTED_BACKEND");
  ASSERT_NE(expected, nullptr) << "run through ctest";
  EXPECT_EQ(std::string(fap_get_backend()), expected);
}
