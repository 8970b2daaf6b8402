// The parts of the attention forward that do not depend on how the tensor cores are driven, shared by the
// mma.sync kernel (attention_fwd.cuh, sm_80+) and the warpgroup-MMA kernel (attention_fwd_sm90.cuh): a
// tile's scores (attention_core.cuh's rule, each case its own code), the online softmax, dropout, and the
// final normalisation and stores.
//
// Score and output fragments are in the accumulator layout of mma.sync.m16n8k16, which wgmma's m64 tiles
// share per warp: fragment [j][e] holds row `rows[e / 2]` and column 8 j + 2 quad + e % 2, quad = lane % 4.
// Uses FAP_SOFTCAP, FAP_ALIBI and FAP_WINDOW (through attention_core.cuh, which the sequence, block ranges
// and score rule come from).
#pragma once

#include "core/philox.h"
#include "attention_core.cuh"
#include "tensor_core.cuh"

namespace fap {

using ForwardSequence = SequenceInfo<long long>;

// The ALiBi slope of a thread's row `half` (0: row group, 1: row group + 8): one per CTA where a CTA is one
// head, one per row where the decode kernel packs a kv head's query heads into the rows.
// A select, not an indexed array: where ptxas leaves a loop rolled, an array index would go to local memory.
struct RowSlopes {
  float first, second;
};
__device__ __forceinline__ float row_slope(float slope, int) { return slope; }
__device__ __forceinline__ float row_slope(const RowSlopes& slopes, int half) { return half ? slopes.second : slopes.first; }

// Raw products -> scores for the softmax. SCALED: to base-2 units (scale, softcap, ALiBi, log2(e)); else
// they stay raw products and online_softmax folds the scale into its multiply-add, which needs a positive
// scale. MASKED: -inf outside the allowed keys (only tiles that cross a boundary pay for it). Positions are
// int arithmetic (sequence lengths are int32, FlashAttention-2's limit): 64-bit index math here costs
// registers the wgmma kernel needs.
template <bool MASKED, bool SCALED, int N8, typename Slope>
__device__ __forceinline__ void prepare_scores(float (&s)[N8][4], const AttentionFwdParams& p, const ForwardSequence& seq,
                                               const int (&rows)[2], int key0, const Slope& slope) {
  const int first_key = key0 + threadIdx.x % 4 * 2;
  const int diagonal[2] = {rows[0] + seq.offset, rows[1] + seq.offset};  // the key on each row's diagonal
#pragma unroll
  for (int j = 0; j < N8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = first_key + j * 8 + (e % 2);
      float x = s[j][e];
      if (SCALED) {
        float unused_derivative;
        x = score_log2(x, p, row_slope(slope, e / 2), diagonal[e / 2], key, &unused_derivative);
      }
      if (MASKED && !key_allowed(p, seq, diagonal[e / 2], key)) x = -FAP_INFINITY;
      s[j][e] = x;
    }
}

// prepare_scores for one tile, each case its own code (no per-element selects); returns the factor that
// takes the prepared scores to base-2 units.
template <int N8, typename Slope>
__device__ __forceinline__ float prepare_tile_scores(float (&s)[N8][4], const AttentionFwdParams& p,
                                                     const ForwardSequence& seq, const int (&rows)[2], int key0,
                                                     bool needs_mask, const Slope& slope) {
  const bool scaled = FAP_SOFTCAP || FAP_ALIBI || !(p.scale_log2 > 0.0f);  // zero or negative scales can't fold
  if (scaled) {
    if (needs_mask) {
      prepare_scores<true, true>(s, p, seq, rows, key0, slope);
    } else {
      prepare_scores<false, true>(s, p, seq, rows, key0, slope);
    }
    return 1.0f;
  }
  if (needs_mask) prepare_scores<true, false>(s, p, seq, rows, key0, slope);
  return p.scale_log2;
}

// The online softmax step for one tile of scores (scores * fold in base-2 units, fold > 0): updates the
// running row maxima (base-2 units) and per-thread partial sums, turns the scores into
// exp2(score * fold - max) in place, and returns in `correction` the factor by which the output
// accumulated so far must be multiplied. The max skips NaN (fmaxf); a NaN score still makes its exponential,
// and so its row, NaN.
template <int N8>
__device__ __forceinline__ void online_softmax(float (&s)[N8][4], float fold, float (&row_max)[2], float (&row_sum)[2],
                                               float (&correction)[2]) {
  float shift[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    // The thread's maximum as a tree (log2 of the chain's latency, which the softmax's critical path pays on every
    // tile); fmaxf skips NaN in any order, so the value is the chain's.
    float pair_max[N8];
#pragma unroll
    for (int j = 0; j < N8; ++j) pair_max[j] = fmaxf(s[j][2 * half], s[j][2 * half + 1]);
#pragma unroll
    for (int stride = 1; stride < N8; stride *= 2)
#pragma unroll
      for (int j = 0; j + stride < N8; j += 2 * stride) pair_max[j] = fmaxf(pair_max[j], pair_max[j + stride]);
    float tile_max = pair_max[0];
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    const float new_max = fmaxf(row_max[half], tile_max * fold);
    // A row with nothing allowed so far keeps max -inf: use 0 as the shift so exp2 gives exact zeros.
    shift[half] = new_max == -FAP_INFINITY ? 0.0f : new_max;
    correction[half] = fast_exp2(row_max[half] - shift[half]);
    row_max[half] = new_max;
    row_sum[half] *= correction[half];
  }
#ifndef FAP_EXPONENT_GUARD  // with softcap or ALiBi the scores come scaled (fold = 1): the products below are exact
#define FAP_EXPONENT_GUARD !(FAP_SOFTCAP || FAP_ALIBI)
#endif
#if FAP_EXPONENT_GUARD
  // The fused multiply-add score * fold - shift carries the rounding of shift = max * fold, up to half an ulp
  // of |shift|: the same factor on every exponential of the row, which the normalisation cancels, until it
  // leaves exp2's range near |shift| = 2^31 (scales like 1e10). A warp holding such a row rounds the products
  // first (the max is the same rounded product, so exponents are <= 0 and exactly 0 at the max); the usual
  // scales keep the single multiply-add.
  if (__any_sync(0xffffffffu, fmaxf(fabsf(shift[0]), fabsf(shift[1])) > 16777216.0f)) {
#pragma unroll
    for (int j = 0; j < N8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = __fmul_rn(s[j][e], fold);
    fold = 1.0f;
  }
#endif
#pragma unroll
  for (int half = 0; half < 2; ++half) {
#pragma unroll
    for (int j = 0; j < N8; ++j) {
      s[j][2 * half] = fast_exp2(s[j][2 * half] * fold - shift[half]);
      s[j][2 * half + 1] = fast_exp2(s[j][2 * half + 1] * fold - shift[half]);
      row_sum[half] += s[j][2 * half] + s[j][2 * half + 1];  // reduced over the quad at the end
    }
  }
}

#if FAP_DROPOUT
// Multiplies each probability by 1 / (1 - p) or 0 from philox.h's mask (the CPU backend's, bit for bit).
template <int N8>
__device__ __forceinline__ void apply_dropout(float (&s)[N8][4], const AttentionFwdParams& p, int batch, int head,
                                              const int (&rows)[2], int key0) {
  const int quad = threadIdx.x % 4;
#pragma unroll
  for (int j = 0; j < N8; ++j)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const unsigned int key = (unsigned int)(key0 + j * 8 + quad * 2);
      const Philox4 words = dropout_words(p.dropout_seed, p.dropout_offset, (unsigned int)(batch * p.heads_q + head),
                                          (unsigned int)rows[half], key / 4);
      const unsigned int w0 = philox_word(words, key % 4), w1 = philox_word(words, key % 4 + 1);
      s[j][2 * half] *= w0 >= p.dropout_threshold ? p.dropout_scale : 0.0f;
      s[j][2 * half + 1] *= w1 >= p.dropout_threshold ? p.dropout_scale : 0.0f;
    }
}
#endif

// One tile's softmax: scores (masked only where the tile crosses a boundary) -> probabilities, with the
// correction for the output accumulated so far. Dropout is applied after the row sums, which count every
// probability.
template <int N8, typename Slope>
__device__ __forceinline__ void softmax_tile(float (&s)[N8][4], const AttentionFwdParams& p, const ForwardSequence& seq,
                                             int batch, int head, const int (&rows)[2], int key0, bool needs_mask,
                                             const Slope& slope, float (&row_max)[2], float (&row_sum)[2],
                                             float (&correction)[2]) {
  const float fold = prepare_tile_scores(s, p, seq, rows, key0, needs_mask, slope);
  online_softmax(s, fold, row_max, row_sum, correction);
#if FAP_DROPOUT
  apply_dropout(s, p, batch, head, rows, key0);
#endif
}

template <int D8>
__device__ __forceinline__ void rescale_rows(float (&acc)[D8][4], const float (&correction)[2]) {
#pragma unroll
  for (int i = 0; i < D8; ++i) {
    acc[i][0] *= correction[0];
    acc[i][1] *= correction[0];
    acc[i][2] *= correction[1];
    acc[i][3] *= correction[1];
  }
}


// lse in base-2 units from a row's max and sum, FlashAttention-2's rule: +inf for an empty row (sum 0) and
// for a NaN one.
__device__ __forceinline__ float row_lse_log2(float row_max, float row_sum) {
  return row_sum > 0.0f ? row_max + __log2f(row_sum) : FAP_INFINITY;
}

// The end of a row block: reduces the row sums over the quad, normalises, stores out and lse. Rows with
// nothing to attend to get zeros and lse = +inf; a NaN sum gives a NaN row.
template <int D8>
__device__ __forceinline__ void store_rows(const AttentionFwdParams& p, const ForwardSequence& seq, int batch, int head,
                                           const int (&rows)[2], const float (&acc)[D8][4], float (&row_sum)[2],
                                           const float (&row_max)[2]) {
  const int quad = threadIdx.x % 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    row_sum[half] += __shfl_xor_sync(0xffffffffu, row_sum[half], 1);
    row_sum[half] += __shfl_xor_sync(0xffffffffu, row_sum[half], 2);
    const int row = rows[half];
    if (row >= seq.len_q) continue;
    const bool empty = row_sum[half] == 0.0f;
    const float inverse = empty ? 0.0f : 1.0f / row_sum[half];
    storage_t* out = static_cast<storage_t*>(p.out) + batch * p.out_batch_stride +
                     (seq.q_start + row) * p.out_row_stride + head * p.out_head_stride;
    if (pairs_aligned(out, p.head_dim)) {
#pragma unroll
      for (int i = 0; i < D8; ++i)
        store_pair<true>(out, i * 8 + quad * 2, acc[i][2 * half] * inverse, acc[i][2 * half + 1] * inverse, p.head_dim);
    } else {
#pragma unroll
      for (int i = 0; i < D8; ++i)
        store_pair<false>(out, i * 8 + quad * 2, acc[i][2 * half] * inverse, acc[i][2 * half + 1] * inverse, p.head_dim);
    }
    if (p.lse && quad == 0) {
      p.lse[batch * p.lse_batch_stride + head * p.lse_head_stride + (seq.q_start + row) * p.lse_row_stride] =
          row_lse_log2(row_max[half], row_sum[half]) * 0.6931471805599453f;
    }
  }
}

}  // namespace fap
