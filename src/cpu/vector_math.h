// Row operations of the CPU backend's softmax, vectorised with Highway and dispatched at run time to the
// best instruction set of the machine (SSE4, AVX2, AVX-512, NEON, ...). The tile products themselves go to
// BLAS (gemm.h); these are the O(seqlen^2) element-wise passes between them.
#pragma once

#include <cstddef>

namespace fap::cpu {

// max(x[0..n)) skipping NaN (fmax); -inf for n == 0 or all NaN.
float row_max(const float* x, size_t n);
// x[i] = exp(scale * x[i] - shift); returns the sum of the new x. Exactly 0 where x[i] = -inf (masked) or
// the argument is -inf (shift = +inf: an empty row's lse); NaN stays NaN; +inf past exp's range.
float exp_affine_sum(float* x, size_t n, float scale, float shift);
// x[i] = exp(scale * (x[i] - max)) for the forward's softmax, scale > 0 and max the row max: exactly 1 at the
// max however large the scale (x * scale - max * scale would carry max * scale's rounding, which at scales
// like 1e10 is more than exp's range). Otherwise as exp_affine_sum; returns the sum of the new x.
float exp_below_max_sum(float* x, size_t n, float scale, float max);
// x[i] = softcap > 0 ? softcap * tanh(x[i] * scale / softcap) : x[i] * scale.
void scale_and_softcap(float* x, size_t n, float scale, float softcap);
// x[i] *= factor.
void scale_in_place(float* x, size_t n, float factor);
// sum of a[i] * b[i].
float dot(const float* a, const float* b, size_t n);
// Softmax backward for one row: ds[i] = p[i] * (dp[i] - row_dot) * d(score)/d(logit) * scale, written over dp.
// With softcap > 0, capped[i] is the capped score s = softcap * tanh(.) and d(score)/d(logit) = 1 - (s/softcap)^2.
void softmax_grad(float* dp, const float* p, const float* capped, size_t n, float row_dot, float scale,
                  float softcap);

}  // namespace fap::cpu
