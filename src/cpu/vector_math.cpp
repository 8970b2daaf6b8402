#include "src/cpu/vector_math.h"

#include <algorithm>
#include <cmath>
#include <limits>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/cpu/vector_math.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>  // Tanh

HWY_BEFORE_NAMESPACE();
namespace fap::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

float RowMaxImpl(const float* x, size_t n) {
  const hn::ScalableTag<float> d;
  const size_t lanes = hn::Lanes(d);
  const auto minus_inf = hn::Set(d, -std::numeric_limits<float>::infinity());
  auto best = minus_inf;
  size_t i = 0;
  // NaN is skipped (fmax's rule, as FlashAttention-2's row max): the NaN score still makes its exponential,
  // and so the row, NaN. Highway's Max leaves NaN operands to the instruction set, so they are replaced first.
  for (; i + lanes <= n; i += lanes) {
    const auto value = hn::LoadU(d, x + i);
    best = hn::Max(best, hn::IfThenElse(hn::IsNaN(value), minus_inf, value));
  }
  float result = hn::GetLane(hn::MaxOfLanes(d, best));
  for (; i < n; ++i) result = std::fmax(result, x[i]);
  return result;
}

// exp(x) for the softmax: 2^n * e^r with n = round(x / ln 2) and r = x - n ln 2 (Cody-Waite split), e^r by its
// degree-6 Taylor polynomial (|r| <= ln 2 / 2: relative error below 2e-7, about 2 fp32 ulp). About half the
// instructions of Highway's general Exp. IEEE at the edges, as the GPU's exp2 is: NaN stays NaN (Highway's
// Min/Max leave NaN to the instruction set, which may turn it into the clamp's bound), arguments below -87
// (results under FLT_MIN) and -inf give exactly 0, above 88 give +inf.
template <class D, class V>
HWY_INLINE V SoftmaxExp(D d, V x) {
  const hn::RebindToSigned<D> di;
  const V lowest = hn::Set(d, -87.0f), highest = hn::Set(d, 88.0f);
  const V clamped = hn::Max(hn::Min(x, highest), lowest);
  const V n = hn::Round(clamped * hn::Set(d, 1.44269504088896341f));
  V r = hn::NegMulAdd(n, hn::Set(d, 0.693145751953125f), clamped);
  r = hn::NegMulAdd(n, hn::Set(d, 1.428606765330187e-06f), r);
  V p = hn::Set(d, 1.0f / 720);
  p = hn::MulAdd(p, r, hn::Set(d, 1.0f / 120));
  p = hn::MulAdd(p, r, hn::Set(d, 1.0f / 24));
  p = hn::MulAdd(p, r, hn::Set(d, 1.0f / 6));
  p = hn::MulAdd(p, r, hn::Set(d, 0.5f));
  p = hn::MulAdd(p, r, hn::Set(d, 1.0f));
  p = hn::MulAdd(p, r, hn::Set(d, 1.0f));
  const auto exponent = hn::ShiftLeft<23>(hn::ConvertTo(di, n) + hn::Set(di, 127));
  V result = hn::IfThenZeroElse(hn::Lt(x, lowest), p * hn::BitCast(d, exponent));
  result = hn::IfThenElse(hn::Gt(x, highest), hn::Set(d, std::numeric_limits<float>::infinity()), result);
  return hn::IfThenElse(hn::IsNaN(x), x, result);
}

// x[i] = exp(argument) with exactly 0 where x[i] = -inf (a masked score, whatever its argument would be);
// returns the sum of the new x. The argument is (x - offset) * scale when kBelowMax (offset: the row max, so
// that the max itself gives exactly exp(0) however large the scale), else x * scale - offset.
template <bool kBelowMax>
HWY_INLINE float ExpSum(float* x, size_t n, float scale, float offset) {
  const hn::ScalableTag<float> d;
  const size_t lanes = hn::Lanes(d);
  const auto minus_inf = hn::Set(d, -std::numeric_limits<float>::infinity());
  const auto scale_v = hn::Set(d, scale), offset_v = hn::Set(d, offset);
  auto sum = hn::Zero(d);
  size_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    const auto value = hn::LoadU(d, x + i);
    const auto argument = kBelowMax ? (value - offset_v) * scale_v : hn::MulSub(value, scale_v, offset_v);
    const auto e = hn::IfThenZeroElse(hn::Eq(value, minus_inf), SoftmaxExp(d, argument));
    hn::StoreU(e, d, x + i);
    sum = sum + e;
  }
  float result = hn::GetLane(hn::SumOfLanes(d, sum));
  for (; i < n; ++i) {
    const float argument = kBelowMax ? (x[i] - offset) * scale : x[i] * scale - offset;
    x[i] = std::isinf(x[i]) && x[i] < 0 ? 0.0f : std::exp(argument);
    result += x[i];
  }
  return result;
}

float ExpAffineSumImpl(float* x, size_t n, float scale, float shift) { return ExpSum<false>(x, n, scale, shift); }
float ExpBelowMaxSumImpl(float* x, size_t n, float scale, float max) { return ExpSum<true>(x, n, scale, max); }

void ScaleAndSoftcapImpl(float* x, size_t n, float scale, float softcap) {
  const hn::ScalableTag<float> d;
  const size_t lanes = hn::Lanes(d);
  size_t i = 0;
  if (softcap > 0.0f) {
    const auto pre = hn::Set(d, scale / softcap), cap = hn::Set(d, softcap);
    for (; i + lanes <= n; i += lanes) hn::StoreU(cap * hn::Tanh(d, hn::LoadU(d, x + i) * pre), d, x + i);
    for (; i < n; ++i) x[i] = softcap * std::tanh(x[i] * (scale / softcap));
  } else {
    const auto factor = hn::Set(d, scale);
    for (; i + lanes <= n; i += lanes) hn::StoreU(hn::LoadU(d, x + i) * factor, d, x + i);
    for (; i < n; ++i) x[i] *= scale;
  }
}

float DotImpl(const float* a, const float* b, size_t n) {
  const hn::ScalableTag<float> d;
  const size_t lanes = hn::Lanes(d);
  auto sum = hn::Zero(d);
  size_t i = 0;
  for (; i + lanes <= n; i += lanes) sum = hn::MulAdd(hn::LoadU(d, a + i), hn::LoadU(d, b + i), sum);
  float result = hn::GetLane(hn::SumOfLanes(d, sum));
  for (; i < n; ++i) result += a[i] * b[i];
  return result;
}

void SoftmaxGradImpl(float* dp, const float* p, const float* capped, size_t n, float row_dot, float scale,
                     float softcap) {
  const hn::ScalableTag<float> d;
  const size_t lanes = hn::Lanes(d);
  const auto row_dot_v = hn::Set(d, row_dot), scale_v = hn::Set(d, scale), one = hn::Set(d, 1.0f);
  const auto inv_cap = hn::Set(d, softcap > 0.0f ? 1.0f / softcap : 0.0f);
  size_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    auto grad = hn::LoadU(d, p + i) * (hn::LoadU(d, dp + i) - row_dot_v) * scale_v;
    if (softcap > 0.0f) {
      const auto t = hn::LoadU(d, capped + i) * inv_cap;
      // Masked entries have p = 0 and no capped score: select 0 rather than multiply by it.
      grad = hn::IfThenZeroElse(hn::Eq(hn::LoadU(d, p + i), hn::Zero(d)), grad * hn::NegMulAdd(t, t, one));
    }
    hn::StoreU(grad, d, dp + i);
  }
  for (; i < n; ++i) {
    float grad = p[i] * (dp[i] - row_dot) * scale;
    if (softcap > 0.0f) {
      const float t = capped[i] / softcap;
      grad = p[i] == 0.0f ? 0.0f : grad * (1.0f - t * t);
    }
    dp[i] = grad;
  }
}

}  // namespace fap::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace fap::cpu {

HWY_EXPORT(RowMaxImpl);
HWY_EXPORT(ExpAffineSumImpl);
HWY_EXPORT(ExpBelowMaxSumImpl);
HWY_EXPORT(ScaleAndSoftcapImpl);
HWY_EXPORT(DotImpl);
HWY_EXPORT(SoftmaxGradImpl);

float row_max(const float* x, size_t n) { return HWY_DYNAMIC_DISPATCH(RowMaxImpl)(x, n); }
float exp_affine_sum(float* x, size_t n, float scale, float shift) {
  return HWY_DYNAMIC_DISPATCH(ExpAffineSumImpl)(x, n, scale, shift);
}
float exp_below_max_sum(float* x, size_t n, float scale, float max) {
  return HWY_DYNAMIC_DISPATCH(ExpBelowMaxSumImpl)(x, n, scale, max);
}
void scale_and_softcap(float* x, size_t n, float scale, float softcap) {
  HWY_DYNAMIC_DISPATCH(ScaleAndSoftcapImpl)(x, n, scale, softcap);
}
void scale_in_place(float* x, size_t n, float factor) { scale_and_softcap(x, n, factor, 0.0f); }
float dot(const float* a, const float* b, size_t n) { return HWY_DYNAMIC_DISPATCH(DotImpl)(a, b, n); }
void softmax_grad(float* dp, const float* p, const float* capped, size_t n, float row_dot, float scale,
                  float softcap) {
  HWY_DYNAMIC_DISPATCH(SoftmaxGradImpl)(dp, p, capped, n, row_dot, scale, softcap);
}

}  // namespace fap::cpu
#endif  // HWY_ONCE
