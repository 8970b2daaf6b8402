// float16 / bfloat16 conversions: exhaustive round trips and round-to-nearest-even ties.
#include <gtest/gtest.h>

#include <cmath>

#include "core/half.h"

namespace fap {
namespace {

TEST(Half, EveryFloat16RoundTripsExactly) {
  for (uint32_t bits = 0; bits < 0x10000u; ++bits) {
    const auto half = static_cast<uint16_t>(bits);
    const float value = float16_to_float(half);
    if (std::isnan(value)) {
      EXPECT_TRUE(std::isnan(float16_to_float(float_to_float16(value))));
    } else {
      EXPECT_EQ(float_to_float16(value), half) << std::hex << bits;
    }
  }
}

TEST(Half, EveryBfloat16RoundTripsExactly) {
  for (uint32_t bits = 0; bits < 0x10000u; ++bits) {
    const auto half = static_cast<uint16_t>(bits);
    const float value = bfloat16_to_float(half);
    if (!std::isnan(value)) {
      EXPECT_EQ(float_to_bfloat16(value), half) << std::hex << bits;
    }
  }
}

TEST(Half, Float16RoundsToNearestEven) {
  EXPECT_EQ(float16_to_float(float_to_float16(1.0f + 1.0f / 2048)), 1.0f);              // tie, to even
  EXPECT_EQ(float16_to_float(float_to_float16(1.0f + 3.0f / 2048)), 1.0f + 2.0f / 1024);  // tie, to even (up)
  EXPECT_EQ(float16_to_float(float_to_float16(65519.0f)), 65504.0f);
  EXPECT_TRUE(std::isinf(float16_to_float(float_to_float16(65520.0f))));
  EXPECT_EQ(float16_to_float(float_to_float16(std::ldexp(1.0f, -25))), 0.0f);               // tie to 0
  EXPECT_EQ(float16_to_float(float_to_float16(std::ldexp(1.5f, -25))), std::ldexp(1.0f, -24));
}

TEST(Half, Bfloat16RoundsToNearestEven) {
  EXPECT_EQ(bfloat16_to_float(float_to_bfloat16(1.0f + 1.0f / 256)), 1.0f);
  EXPECT_EQ(bfloat16_to_float(float_to_bfloat16(1.0f + 3.0f / 256)), 1.0f + 1.0f / 64);
  EXPECT_TRUE(std::isnan(bfloat16_to_float(float_to_bfloat16(std::nanf("")))));
}

}  // namespace
}  // namespace fap
