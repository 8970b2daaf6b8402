// Philox4x32-10 against the known-answer vectors published with Random123, and the dropout mask's statistics.
#include <gtest/gtest.h>

#include "core/philox.h"

namespace fap {
namespace {

void expect_words(const Philox4& got, unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
  EXPECT_EQ(got.x, x);
  EXPECT_EQ(got.y, y);
  EXPECT_EQ(got.z, z);
  EXPECT_EQ(got.w, w);
}

TEST(Philox, MatchesRandom123KnownAnswers) {
  expect_words(philox4x32_10({0, 0, 0, 0}, 0, 0), 0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u);
  expect_words(philox4x32_10({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, 0xffffffffu, 0xffffffffu),
               0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu);
  expect_words(philox4x32_10({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, 0xa4093822u, 0x299f31d0u),
               0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u);
}

TEST(Philox, DropoutThresholdCoversTheUnitInterval) {
  EXPECT_EQ(dropout_threshold(0.0f), 0u);
  EXPECT_EQ(dropout_threshold(0.5f), 0x80000000u);
  EXPECT_GT(dropout_threshold(0.999999f), 0xfff00000u);
}

TEST(Philox, DropFractionMatchesProbability) {
  for (const float p : {0.1f, 0.17f, 0.5f, 0.9f}) {
    int dropped = 0;
    const int rows = 64, cols = 1024;
    for (int row = 0; row < rows; ++row)
      for (int col = 0; col < cols; ++col) {
        const Philox4 words = dropout_words(42, 7, 3, static_cast<unsigned int>(row), static_cast<unsigned int>(col / 4));
        dropped += philox_word(words, static_cast<unsigned int>(col % 4)) < dropout_threshold(p);
      }
    EXPECT_NEAR(static_cast<double>(dropped) / (rows * cols), p, 0.01) << "p = " << p;
  }
}

TEST(Philox, EveryCoordinateChangesTheWords) {
  const Philox4 base = dropout_words(1, 2, 3, 4, 5);
  const Philox4 variants[] = {dropout_words(9, 2, 3, 4, 5), dropout_words(1, 9, 3, 4, 5),
                              dropout_words(1, 2, 9, 4, 5), dropout_words(1, 2, 3, 9, 5),
                              dropout_words(1, 2, 3, 4, 9), dropout_words(1, 2 + (1ull << 40), 3, 4, 5)};
  for (const Philox4& other : variants) EXPECT_NE(base.x, other.x);
}

}  // namespace
}  // namespace fap
