#include "src/cpu/tile_gemm.h"

// The micro-kernel keeps an MR x NV block of C vectors in registers: arrays of vectors, which scalable
// vector targets (SVE, RVV) cannot hold; those machines use the fixed-width targets Highway also builds.
#ifndef HWY_DISABLED_TARGETS
#define HWY_DISABLED_TARGETS (HWY_SVE | HWY_SVE2 | HWY_SVE_256 | HWY_SVE2_128 | HWY_RVV)
#endif

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/cpu/tile_gemm.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

HWY_BEFORE_NAMESPACE();
namespace fap::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using Tag = hn::ScalableTag<float>;
using Vector = hn::Vec<Tag>;

// One panel is NV vectors wide; MR rows keep MR * NV accumulators plus NV B vectors and a broadcast within
// the register file (16 registers below AVX-512, 32 with it).
constexpr int64_t kVectorsPerPanel = kPanel / static_cast<int64_t>(hn::MaxLanes(Tag()));
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
constexpr int64_t kRegisters = 32;
#else
constexpr int64_t kRegisters = 16;
#endif
constexpr int64_t kFittingRows = (kRegisters - 1 - kVectorsPerPanel) / kVectorsPerPanel;
constexpr int64_t kRows = kFittingRows < 1 ? 1 : kFittingRows > 12 ? 12 : kFittingRows;
static_assert(kVectorsPerPanel >= 1 && kPanel % hn::MaxLanes(Tag()) == 0, "a panel is whole vectors");

template <int64_t MR>
HWY_INLINE void MicroKernel(int64_t k, const float* a, int64_t a_row, int64_t a_col, const float* b, float* c,
                            int64_t ldc, bool accumulate) {
  constexpr int64_t NV = kVectorsPerPanel;
  const Tag d;
  constexpr int64_t lanes = kPanel / NV;
  Vector acc[MR][NV];
  for (int64_t r = 0; r < MR; ++r)
    for (int64_t v = 0; v < NV; ++v) acc[r][v] = hn::Zero(d);
  for (int64_t kk = 0; kk < k; ++kk) {
    Vector row[NV];
    for (int64_t v = 0; v < NV; ++v) row[v] = hn::LoadU(d, b + kk * kPanel + v * lanes);
    for (int64_t r = 0; r < MR; ++r) {
      const Vector scalar = hn::Set(d, a[r * a_row + kk * a_col]);
      for (int64_t v = 0; v < NV; ++v) acc[r][v] = hn::MulAdd(scalar, row[v], acc[r][v]);
    }
  }
  for (int64_t r = 0; r < MR; ++r)
    for (int64_t v = 0; v < NV; ++v) {
      float* target = c + r * ldc + v * lanes;
      hn::StoreU(accumulate ? hn::Add(acc[r][v], hn::LoadU(d, target)) : acc[r][v], d, target);
    }
}

// The rows left after the full kRows blocks, dispatched to a kernel of exactly that height.
template <int64_t MR>
HWY_INLINE void RemainderRows(int64_t rows, int64_t k, const float* a, int64_t a_row, int64_t a_col,
                              const float* b, float* c, int64_t ldc, bool accumulate) {
  if constexpr (MR > 0) {
    if (rows == MR) return MicroKernel<MR>(k, a, a_row, a_col, b, c, ldc, accumulate);
    RemainderRows<MR - 1>(rows, k, a, a_row, a_col, b, c, ldc, accumulate);
  }
}

void TileGemmImpl(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_row, int64_t a_col, const float* b,
                  int64_t panel_stride, float* c, int64_t ldc, bool accumulate) {
  for (int64_t j = 0; j < n; j += kPanel) {
    const float* panel = b + (j / kPanel) * panel_stride;
    int64_t i = 0;
    for (; i + kRows <= m; i += kRows) {
      MicroKernel<kRows>(k, a + i * a_row, a_row, a_col, panel, c + i * ldc + j, ldc, accumulate);
    }
    RemainderRows<kRows - 1>(m - i, k, a + i * a_row, a_row, a_col, panel, c + i * ldc + j, ldc, accumulate);
  }
}

}  // namespace fap::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <limits>
#include <stdexcept>

#if FAP_WITH_LIBXSMM
#include <libxsmm.h>
#endif

namespace fap::cpu {

HWY_EXPORT(TileGemmImpl);

void tile_gemm(int64_t m, int64_t n, int64_t k, MatrixView<float> a, PanelMatrix<float> b, float* c, int64_t ldc,
               bool accumulate) {
  HWY_DYNAMIC_DISPATCH(TileGemmImpl)(m, n, k, a.data, a.row_stride, a.col_stride, b.data, b.panel_stride, c, ldc,
                                     accumulate);
}

#if FAP_WITH_LIBXSMM
namespace {

// libxsmm's kernel for one bf16 B panel, generated for this machine on first use and found in libxsmm's registry
// afterwards (nullptr where libxsmm has none). libxsmm is column-major: the row-major C panel (m x kPanel) =
// A (m x k) * panel (k x kPanel) is its C^T = panel^T A^T, whose first operand is the panel as staged (pairs
// interleaved along k: libxsmm's VNNI layout, leading dimension kPanel) and whose second is A read in place.
libxsmm_bsmmfunction bf16_panel_kernel(int64_t m, int64_t k, int64_t a_row_stride, int64_t ldc, bool accumulate) {
  constexpr int64_t kLargest = std::numeric_limits<libxsmm_blasint>::max();  // libxsmm's sizes are int
  if (m <= 0 || k <= 0 || m > kLargest || k > kLargest || a_row_stride > kLargest || ldc > kLargest) return nullptr;
  const auto blas = [](int64_t x) { return static_cast<libxsmm_blasint>(x); };
  const libxsmm_blasint lda = kPanel, ldb = blas(a_row_stride), ldc_panel = blas(ldc);
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  const int flags = LIBXSMM_GEMM_FLAG_VNNI_A;
  return libxsmm_bsmmdispatch(kPanel, blas(m), blas(k), &lda, &ldb, &ldc_panel, &alpha, &beta, &flags, nullptr);
}

bool machine_multiplies_bf16() {
  // libxsmm generates bf16 kernels that multiply in bf16 from AVX512-BF16 (Cooper Lake, Zen 4) on; below that
  // its bf16 kernels convert to fp32, no faster than the fp32 path.
  return libxsmm_get_target_archid() >= LIBXSMM_X86_AVX512_CPX && bf16_panel_kernel(64, 64, 64, kPanel, false);
}

}  // namespace

bool bf16_tile_products() {
  static const bool available = machine_multiplies_bf16();
  return available;
}

void tile_gemm(int64_t m, int64_t n, int64_t k, MatrixView<Bf16> a, PanelMatrix<Bf16> b, float* c, int64_t ldc,
               bool accumulate) {
  if (m == 0) return;
  const libxsmm_bsmmfunction kernel = bf16_panel_kernel(m, k, a.row_stride, ldc, accumulate);
  if (!kernel || a.col_stride != 1 || k % 2 != 0) throw std::logic_error("bf16 tile product without a kernel");
  const auto* a_bits = reinterpret_cast<const libxsmm_bfloat16*>(a.data);
  for (int64_t j = 0; j < n; j += kPanel) {
    kernel(reinterpret_cast<const libxsmm_bfloat16*>(b.data + (j / kPanel) * b.panel_stride), a_bits, c + j);
  }
}
#else
bool bf16_tile_products() { return false; }

void tile_gemm(int64_t, int64_t, int64_t, MatrixView<Bf16>, PanelMatrix<Bf16>, float*, int64_t, bool) {
  throw std::logic_error("bf16 tile product without libxsmm");
}
#endif

}  // namespace fap::cpu
#endif  // HWY_ONCE
