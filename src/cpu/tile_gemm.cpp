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
namespace fap::cpu {

HWY_EXPORT(TileGemmImpl);

void tile_gemm(int64_t m, int64_t n, int64_t k, MatrixView a, PanelMatrix b, float* c, int64_t ldc, bool accumulate) {
  HWY_DYNAMIC_DISPATCH(TileGemmImpl)(m, n, k, a.data, a.row_stride, a.col_stride, b.data, b.panel_stride, c, ldc,
                                     accumulate);
}

}  // namespace fap::cpu
#endif  // HWY_ONCE
