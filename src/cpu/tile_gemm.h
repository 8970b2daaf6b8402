// The tile products of the CPU backend: a register-blocked micro-kernel (Highway, dispatched at run time)
// whose B operand is staged once per call in panels of kPanel columns, the layout the kernel streams
// through. General BLAS libraries pack B again for every small product; measured on the 2-core AVX2
// machine (docs/architecture.md), OpenBLAS ran 64x128 attention tiles at 14-37 GFLOP/s a core and BLIS
// at 25-44, depending on shape and transposition.
#pragma once

#include <cstdint>

namespace fap::cpu {

constexpr int64_t kPanel = 16;  // columns of a B panel

inline int64_t round_up_to_panel(int64_t n) { return (n + kPanel - 1) / kPanel * kPanel; }

// A bfloat16 value, by its bits: the element of the bf16 tile products.
struct Bf16 {
  uint16_t bits;
};

// A strided A operand: element (i, k) at data[i * row_stride + k * col_stride] (a transposed view swaps them).
template <typename T>
struct MatrixView {
  const T* data;
  int64_t row_stride, col_stride;
};

// A B operand in panels of kPanel columns. fp32: element (k, j) at data[(j / kPanel) * panel_stride + k * kPanel +
// j % kPanel]. bf16: pairs interleaved along k (the layout bf16 dot-product instructions read), element (k, j) at
// data[(j / kPanel) * panel_stride + (k / 2) * 2 * kPanel + (j % kPanel) * 2 + k % 2]; both place row k of a
// panel at offset k * kPanel for even k.
template <typename T>
struct PanelMatrix {
  const T* data;
  int64_t panel_stride;
};

// C (m x round_up_to_panel(n), row-major, leading dimension ldc) = A (m x k) * B (k x n): C's columns up to
// the next panel boundary are written too (they come from B's padding). Added to C when accumulate.
void tile_gemm(int64_t m, int64_t n, int64_t k, MatrixView<float> a, PanelMatrix<float> b, float* c, int64_t ldc,
               bool accumulate);

// Whether this machine multiplies bf16 tiles directly (libxsmm's kernels for AVX512-BF16 and AMX; fp32 products
// of staged copies elsewhere).
bool bf16_tile_products();
// The same product from bf16 operands with fp32 accumulation: A row-major (col_stride 1), k even (operands padded
// with a zero). Only where bf16_tile_products().
void tile_gemm(int64_t m, int64_t n, int64_t k, MatrixView<Bf16> a, PanelMatrix<Bf16> b, float* c, int64_t ldc,
               bool accumulate);

}  // namespace fap::cpu
