// The tile products against float64 sums, in both element types and at the shapes' edges (one row, a single
// panel, contractions of 2 and of the attention's sizes, a transposed A for the fp32 path, accumulation).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "core/half.h"
#include "src/cpu/tile_gemm.h"

namespace fap::cpu {
namespace {

struct Shape {
  int64_t m, n, k;
};

const Shape kShapes[] = {{1, 16, 2}, {5, 16, 80}, {64, 256, 64}, {64, 48, 128}, {13, 32, 256}, {256, 64, 64}};

// Random values exactly representable in bf16, so that both paths see the same operands.
std::vector<float> random_bf16_values(size_t count, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> values(count);
  for (float& x : values) x = bfloat16_to_float(float_to_bfloat16(normal(rng)));
  return values;
}

// Checks C (m x n, leading dimension ldc) against initial + A B, relative to the sum of the terms' magnitudes.
void expect_product(const Shape& s, const std::vector<float>& a, const std::vector<float>& b,
                    const std::vector<float>& initial, const std::vector<float>& c, int64_t ldc) {
  for (int64_t i = 0; i < s.m; ++i)
    for (int64_t j = 0; j < s.n; ++j) {
      double sum = initial[i * ldc + j], magnitude = std::fabs(sum);
      for (int64_t kk = 0; kk < s.k; ++kk) {
        sum += double{a[i * s.k + kk]} * b[kk * s.n + j];
        magnitude += std::fabs(double{a[i * s.k + kk]} * b[kk * s.n + j]);
      }
      ASSERT_NEAR(c[i * ldc + j], sum, 1e-6 * magnitude) << s.m << "x" << s.n << "x" << s.k << " at " << i << "," << j;
    }
}

TEST(TileGemm, Float32PanelsPlainAndTransposedA) {
  for (const Shape& s : kShapes) {
    const std::vector<float> a = random_bf16_values(s.m * s.k, 1), b = random_bf16_values(s.k * s.n, 2);
    const int64_t ldc = round_up_to_panel(s.n);
    std::vector<float> panels(ldc * s.k, 0.0f), transposed(s.k * s.m);
    for (int64_t kk = 0; kk < s.k; ++kk)
      for (int64_t j = 0; j < s.n; ++j) panels[(j / kPanel) * kPanel * s.k + kk * kPanel + j % kPanel] = b[kk * s.n + j];
    for (int64_t i = 0; i < s.m; ++i)
      for (int64_t kk = 0; kk < s.k; ++kk) transposed[kk * s.m + i] = a[i * s.k + kk];
    const std::vector<float> initial = random_bf16_values(s.m * ldc, 3);
    for (bool accumulate : {false, true}) {
      std::vector<float> c = initial, c_transposed = initial;
      tile_gemm(s.m, s.n, s.k, MatrixView<float>{a.data(), s.k, 1}, PanelMatrix<float>{panels.data(), kPanel * s.k},
                c.data(), ldc, accumulate);
      tile_gemm(s.m, s.n, s.k, MatrixView<float>{transposed.data(), 1, s.m},
                PanelMatrix<float>{panels.data(), kPanel * s.k}, c_transposed.data(), ldc, accumulate);
      const std::vector<float> start = accumulate ? initial : std::vector<float>(initial.size(), 0.0f);
      expect_product(s, a, b, start, c, ldc);
      expect_product(s, a, b, start, c_transposed, ldc);
    }
  }
}

TEST(TileGemm, Bf16PairPanels) {
  if (!bf16_tile_products()) GTEST_SKIP() << "this machine does not multiply bf16 tiles (no AVX512-BF16 or libxsmm)";
  for (const Shape& s : kShapes) {
    const std::vector<float> a = random_bf16_values(s.m * s.k, 4), b = random_bf16_values(s.k * s.n, 5);
    const int64_t ldc = round_up_to_panel(s.n);
    std::vector<Bf16> a_bits(s.m * s.k), panels(ldc * s.k, Bf16{0});
    for (int64_t i = 0; i < s.m * s.k; ++i) a_bits[i] = {float_to_bfloat16(a[i])};
    for (int64_t kk = 0; kk < s.k; ++kk)
      for (int64_t j = 0; j < s.n; ++j) {
        panels[(j / kPanel) * kPanel * s.k + (kk / 2) * 2 * kPanel + (j % kPanel) * 2 + kk % 2] =
            {float_to_bfloat16(b[kk * s.n + j])};
      }
    const std::vector<float> initial = random_bf16_values(s.m * ldc, 6);
    for (bool accumulate : {false, true}) {
      std::vector<float> c = initial;
      tile_gemm(s.m, s.n, s.k, MatrixView<Bf16>{a_bits.data(), s.k, 1}, PanelMatrix<Bf16>{panels.data(), kPanel * s.k},
                c.data(), ldc, accumulate);
      expect_product(s, a, b, accumulate ? initial : std::vector<float>(initial.size(), 0.0f), c, ldc);
    }
  }
}

}  // namespace
}  // namespace fap::cpu
