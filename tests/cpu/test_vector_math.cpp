// The vectorised row operations against plain scalar loops, at lengths around every vector width.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "src/cpu/vector_math.h"

namespace fap::cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

std::vector<float> random_row(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> row(n);
  for (float& x : row) x = normal(rng);
  return row;
}

TEST(VectorMath, RowMaxAndExpSumMatchScalarCode) {
  for (size_t n = 0; n < 70; ++n) {
    std::vector<float> row = random_row(n, static_cast<unsigned>(n));
    if (n > 3) row[2] = -kInf;  // a masked key
    float expected_max = -kInf;
    for (float x : row) expected_max = std::fmax(expected_max, x);
    EXPECT_EQ(row_max(row.data(), n), expected_max);
    if (n == 0) continue;
    std::vector<double> expected(n);
    double expected_sum = 0.0;
    for (size_t i = 0; i < n; ++i) expected_sum += expected[i] = std::exp(double{row[i]} - expected_max);
    const float sum = exp_affine_sum(row.data(), n, 1.0f, expected_max);
    EXPECT_NEAR(sum, expected_sum, 1e-6 * expected_sum);
    for (size_t i = 0; i < n; ++i) EXPECT_NEAR(row[i], expected[i], 2e-7 + 1e-6 * expected[i]);
    if (n > 3) {
      EXPECT_EQ(row[2], 0.0f);
    }
  }
}

TEST(VectorMath, ExpAffineSumAppliesTheScaleInside) {
  for (size_t n : {1u, 8u, 19u, 40u}) {
    std::vector<float> row = random_row(n, 9);
    const std::vector<float> original = row;
    double expected = 0.0;
    for (float x : original) expected += std::exp(0.3 * x - 1.25);
    EXPECT_NEAR(exp_affine_sum(row.data(), n, 0.3f, 1.25f), expected, 1e-6 * expected);
    for (size_t i = 0; i < n; ++i) EXPECT_NEAR(row[i], std::exp(0.3 * original[i] - 1.25), 1e-6 * row[i]);
  }
}

TEST(VectorMath, EmptyRowShiftGivesZeros) {
  std::vector<float> row = random_row(13, 1);
  EXPECT_EQ(exp_affine_sum(row.data(), row.size(), 0.5f, kInf), 0.0f);
  for (float x : row) EXPECT_EQ(x, 0.0f);
}

// Issue 18's NaN/Inf rules at the row level, at lengths that put the special value in a full vector and in
// the scalar tail: the max skips NaN (fmax); exp keeps NaN, gives exactly 0 below its range and for -inf
// arguments, +inf above it.
TEST(VectorMath, RowMaxSkipsNaN) {
  for (size_t n = 1; n < 70; n += 3) {
    for (size_t at : {size_t{0}, n / 2, n - 1}) {
      std::vector<float> row = random_row(n, static_cast<unsigned>(n + at));
      row[at] = std::nanf("");
      float expected = -kInf;
      for (size_t i = 0; i < n; ++i) expected = i == at ? expected : std::fmax(expected, row[i]);
      EXPECT_EQ(row_max(row.data(), n), expected) << n << " " << at;
    }
  }
}

TEST(VectorMath, ExpFollowsIeeeAtTheEdges) {
  const float nan = std::nanf("");
  for (size_t n = 1; n < 70; n += 5) {
    std::vector<float> row(n, 0.0f);
    for (size_t i = 0; i < n; ++i) row[i] = static_cast<float>(i % 5) * -40.0f;  // 0 .. -160: under -87 too
    row[n / 2] = 100.0f;  // argument 100: past exp's range
    row[n - 1] = nan;
    std::vector<float> result = row;
    const float sum = exp_affine_sum(result.data(), n, 1.0f, 0.0f);
    for (size_t i = 0; i + 1 < n; ++i) {
      if (i == n / 2) {
        EXPECT_EQ(result[i], kInf) << n;
      } else {
        const double expected = row[i] < -87.0f ? 0.0 : std::exp(double{row[i]});
        EXPECT_NEAR(result[i], expected, 1e-6 * expected) << n << " " << i;
      }
    }
    EXPECT_TRUE(std::isnan(result[n - 1])) << n;
    EXPECT_TRUE(std::isnan(sum)) << n;
  }
}

TEST(VectorMath, ExpBelowMaxIsOneAtTheMaxWhateverTheScale) {
  for (size_t n : {1u, 7u, 16u, 33u}) {
    std::vector<float> row = random_row(n, 11);
    float max = -kInf;
    for (float x : row) max = std::fmax(max, x);
    const float sum = exp_below_max_sum(row.data(), n, 1e10f, max);
    EXPECT_EQ(sum, 1.0f) << n;  // x * scale - max * scale would carry max * scale's rounding (~1e4 here)
    for (float x : row) EXPECT_TRUE(x == 0.0f || x == 1.0f);

    std::vector<float> special = random_row(n, 12);
    special[0] = kInf;  // a +inf score: its row is NaN (exp(inf - inf)), the others' exponentials 0
    special[n - 1] = n > 1 ? -kInf : kInf;  // masked
    EXPECT_TRUE(std::isnan(exp_below_max_sum(special.data(), n, 0.125f, kInf))) << n;
    for (size_t i = 1; i < n; ++i) EXPECT_EQ(special[i], 0.0f) << n << " " << i;
  }
}

TEST(VectorMath, SoftcapAndScale) {
  for (size_t n : {1u, 7u, 8u, 17u, 33u}) {
    std::vector<float> row = random_row(n, 3), capped = row;
    scale_and_softcap(capped.data(), n, 0.5f, 2.0f);
    for (size_t i = 0; i < n; ++i) EXPECT_NEAR(capped[i], 2.0 * std::tanh(row[i] * 0.25), 1e-6);
    std::vector<float> scaled = row;
    scale_in_place(scaled.data(), n, 3.0f);
    for (size_t i = 0; i < n; ++i) EXPECT_FLOAT_EQ(scaled[i], row[i] * 3.0f);
  }
}

TEST(VectorMath, DotAndSoftmaxGrad) {
  for (size_t n : {1u, 9u, 16u, 31u}) {
    const std::vector<float> a = random_row(n, 5), b = random_row(n, 6);
    double expected = 0.0;
    for (size_t i = 0; i < n; ++i) expected += double{a[i]} * b[i];
    EXPECT_NEAR(dot(a.data(), b.data(), n), expected, 1e-4);

    std::vector<float> p(n), capped = random_row(n, 7), dp = b;
    for (size_t i = 0; i < n; ++i) p[i] = i % 3 == 0 ? 0.0f : std::fabs(a[i]) / 10.0f;
    for (size_t i = 0; i < n; i += 3) capped[i] = -kInf;  // masked: p = 0 and capped = -inf
    softmax_grad(dp.data(), p.data(), capped.data(), n, 0.25f, 0.5f, 4.0f);
    for (size_t i = 0; i < n; ++i) {
      const double t = capped[i] / 4.0;
      const double want = p[i] == 0.0f ? 0.0 : p[i] * (b[i] - 0.25) * 0.5 * (1.0 - t * t);
      EXPECT_NEAR(dp[i], want, 1e-5) << i;
    }
  }
}

}  // namespace
}  // namespace fap::cpu
