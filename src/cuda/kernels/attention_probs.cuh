// FlashAttention-2's S_dmask (`return_attn_probs=True`), written after the forward by its own kernel:
//   attention_probs  for every (batch, head, row, column) of the (possibly padded) probs tensor,
//                    exp(score - row maximum) over the row's allowed keys, negated where the forward's dropout
//                    dropped the element (philox.h's mask, the one the forward applied), 0 elsewhere (masked keys,
//                    rows and columns past the sequence).
// The CPU backend writes the same values. S_dmask is a testing and debugging output, as in FA2: one warp per row
// computes the row's scores twice from global memory (for the maximum, then the values), with no tiling.
// Uses FAP_BF16, FAP_SOFTCAP, FAP_ALIBI, FAP_DROPOUT and FAP_WINDOW (and tensor_core.cuh's FAP_HEAD_DIM, FAP_WARPS).
#pragma once

#include "core/philox.h"
#include "attention_core.cuh"
#include "tensor_core.cuh"

namespace fap {

struct ProbsRow {
  const storage_t* q;
  const storage_t* k;  // the row's kv head, key 0
  long long key_stride;
  int head_dim;
  float slope;
  int diagonal;
};

__device__ __forceinline__ float probs_score_log2(const ProbsRow& row, const AttentionParams& p, int key) {
  const storage_t* k = row.k + key * row.key_stride;
  float dot = 0.0f;
  for (int c = 0; c < row.head_dim; ++c) dot += to_float(row.q[c]) * to_float(k[c]);
  float unused;
  return score_log2(dot, p, row.slope, row.diagonal, key, &unused);
}

extern "C" __global__ void __launch_bounds__(FAP_WARPS * 32) attention_probs(const AttentionProbsParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int batch = blockIdx.y, head = blockIdx.z;
  const int row = blockIdx.x * FAP_WARPS + warp;
  if (row >= p.probs_rows) return;
  const SequenceInfo<long long> s = sequence_info<long long>(p, batch);
  storage_t* out = static_cast<storage_t*>(p.probs) + batch * p.probs_batch_stride + head * p.probs_head_stride +
                   row * p.probs_row_stride;
  ProbsRow r;
  r.q = static_cast<const storage_t*>(p.q) + batch * p.q_batch_stride + (s.q_start + row) * p.q_row_stride +
        head * p.q_head_stride;
  r.k = static_cast<const storage_t*>(p.k) + batch * p.k_batch_stride + s.k_start * p.k_row_stride +
        (head / p.group_size) * p.k_head_stride;
  r.key_stride = p.k_row_stride;
  r.head_dim = p.head_dim;
  r.slope = FAP_ALIBI ? p.alibi[batch * p.alibi_batch_stride + head] : 0.0f;
  r.diagonal = row + s.offset;
  const bool live = row < s.len_q;

  float row_max = -FAP_INFINITY;
  for (int key = lane; live && key < s.len_k; key += 32) {
    if (key_allowed(p, s, r.diagonal, key)) row_max = fmaxf(row_max, probs_score_log2(r, p, key));
  }
  for (int step = 16; step > 0; step /= 2) row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, step));

  for (int key = lane; key < p.probs_cols; key += 32) {
    float value = 0.0f;
    if (live && row_max != -FAP_INFINITY && key < s.len_k && key_allowed(p, s, r.diagonal, key)) {
      value = exp2f(probs_score_log2(r, p, key) - row_max);
#if FAP_DROPOUT
      const Philox4 words = dropout_words(p.dropout_seed, p.dropout_offset, (unsigned int)(batch * p.heads_q + head),
                                          (unsigned int)row, (unsigned int)key / 4);
      if (philox_word(words, (unsigned int)key % 4) < p.dropout_threshold) value = -value;
#endif
    }
    out[key * p.probs_col_stride] = from_float(value);
  }
}

}  // namespace fap
