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

// A strided A operand: element (i, k) at data[i * row_stride + k * col_stride] (a transposed view swaps them).
struct MatrixView {
  const float* data;
  int64_t row_stride, col_stride;
};

// A B operand in panels: element (k, j) at data[(j / kPanel) * panel_stride + k * kPanel + j % kPanel].
struct PanelMatrix {
  const float* data;
  int64_t panel_stride;
};

// C (m x round_up_to_panel(n), row-major, leading dimension ldc) = A (m x k) * B (k x n): C's columns up to
// the next panel boundary are written too (they come from B's padding). Added to C when accumulate.
void tile_gemm(int64_t m, int64_t n, int64_t k, MatrixView a, PanelMatrix b, float* c, int64_t ldc, bool accumulate);

}  // namespace fap::cpu
