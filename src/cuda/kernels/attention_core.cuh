// What every attention kernel shares, whichever way it drives the tensor cores (mma.sync or wgmma), forward or
// backward: where a batch entry's sequence lies (SequenceInfo), which blocks of keys a block of rows sees and
// the converse (BlockInfo), and FlashAttention-2's score rule for one (row, key): the transform (scale,
// softcap, ALiBi) with its derivative, and the mask, whose rule is core/mask.h's.
//
// Positions are int (sequence lengths are int32, FlashAttention-2's limit): 64-bit index math costs registers
// the wgmma kernels need. Uses FAP_SOFTCAP, FAP_ALIBI and FAP_WINDOW.
#pragma once

#include "core/mask.h"
#include "attention_params.cuh"

namespace fap {

// One batch entry's sequence. Dense problems: starts 0 (the batch stride places the sequence) and the
// lengths of the tensors; varlen ones: from cu_seqlens. Start: the type of the starts, 64-bit in the forward
// and 32-bit in the backward, as each family's register budget compiles without spills.
template <typename Start>
struct SequenceInfo {
  Start q_start, k_start;  // first row of the sequence in q (out, lse) / k, v
  int global_row0;         // its first query row counted over all sequences (dense: batch * seqlen_q)
  int len_q, len_k;
  int offset;              // len_k - len_q: the key on row i's diagonal is i + offset (bottom-right alignment)
};

// cu_seqlens live in device memory, which the host does not read (that would synchronise): each offset is clamped
// into its tensor's rows and each end to at least its start, so corrupt offsets (decreasing, past the end) give
// wrong or empty sequences, never an access outside q, k, v or out.
template <typename Start>
__device__ __forceinline__ SequenceInfo<Start> sequence_info(const AttentionParams& p, int batch) {
  SequenceInfo<Start> s{0, 0, batch * p.seqlen_q, p.seqlen_q, p.seqlen_k, 0};
  if (p.cu_seqlens_q) {
    // As unsigned, a negative offset is past every total: min() clamps both ends of the range at once.
    const unsigned q_start = min((unsigned)p.cu_seqlens_q[batch], (unsigned)p.total_q);
    const unsigned k_start = min((unsigned)p.cu_seqlens_k[batch], (unsigned)p.total_k);
    s.q_start = q_start;
    s.k_start = k_start;
    s.global_row0 = (int)q_start;
    s.len_q = (int)(max(min((unsigned)p.cu_seqlens_q[batch + 1], (unsigned)p.total_q), q_start) - q_start);
    s.len_k = (int)(max(min((unsigned)p.cu_seqlens_k[batch + 1], (unsigned)p.total_k), k_start) - k_start);
  }
  s.offset = s.len_k - s.len_q;
  return s;
}

// Blocks [first, end).
struct BlockRange {
  int first, end;
};

// The blocks of BLOCK_N keys that any of the rows [first_row, last_row] may see (the mask is monotone in the row).
template <int BLOCK_N, typename Start>
__device__ __forceinline__ BlockRange key_blocks_of_rows(const AttentionParams& p, const SequenceInfo<Start>& s,
                                                         int first_row, int last_row) {
  long long key_begin = 0, key_end = s.len_k;
#if FAP_WINDOW
  const long long first = first_row + s.offset - p.window_left;
  const long long last = (long long)last_row + s.offset + p.window_right + 1;
  key_begin = first > 0 ? first : 0;
  key_end = last < s.len_k ? last : s.len_k;
#endif
  const int first_block = (int)(key_begin / BLOCK_N);
  return {first_block, key_end > key_begin ? (int)((key_end + BLOCK_N - 1) / BLOCK_N) : first_block};
}

// Blocks of BLOCK_M rows against blocks of BLOCK_N keys under the mask, which is monotone in the row.
template <int BLOCK_M, int BLOCK_N>
struct BlockInfo {
  // The key blocks that any row of the block starting at row0 may see.
  template <typename Start>
  static __device__ __forceinline__ BlockRange key_blocks(const AttentionParams& p, const SequenceInfo<Start>& s, int row0) {
    return key_blocks_of_rows<BLOCK_N>(p, s, row0, min(row0 + BLOCK_M, s.len_q) - 1);
  }

  // The row blocks that may see any key of the block starting at key0.
  template <typename Start>
  static __device__ __forceinline__ BlockRange query_blocks(const AttentionParams& p, const SequenceInfo<Start>& s,
                                                            int key0) {
    long long row_begin = 0, row_end = s.len_q;
#if FAP_WINDOW
    const long long last_key = (long long)min(key0 + BLOCK_N, s.len_k) - 1;
    const long long first = key0 - s.offset - p.window_right, last = last_key - s.offset + p.window_left;
    row_begin = first > 0 ? first : 0;
    row_end = last + 1 < s.len_q ? last + 1 : s.len_q;
#endif
    const int first_block = (int)(row_begin / BLOCK_M);
    return {first_block, row_end > row_begin ? (int)((row_end + BLOCK_M - 1) / BLOCK_M) : first_block};
  }

  // Whether some (row, key) of the tile (row0, key0) is outside the allowed keys: most tiles lie wholly inside,
  // and only the others pay for the per-element mask.
  template <typename Start>
  static __device__ __forceinline__ bool needs_mask(const AttentionParams& p, const SequenceInfo<Start>& s, int row0,
                                                    int key0) {
    bool needs = key0 + BLOCK_N > s.len_k;
#if FAP_WINDOW
    needs = needs || key0 < (long long)row0 + BLOCK_M - 1 + s.offset - p.window_left ||
            key0 + BLOCK_N - 1 > (long long)row0 + s.offset + p.window_right;
#endif
    return needs;
  }
};

// The score of one raw product x = q.k in base-2 units: scale, softcap, ALiBi (by the distance of the key
// from the row's diagonal key), times log2(e). *cap_derivative gets d(softcap(y))/dy at y = scale * x (1 without
// softcap), which the backward's dS needs (the forward's is dead code).
__device__ __forceinline__ float score_log2(float x, const AttentionParams& p, float slope, int diagonal, int key,
                                            float* cap_derivative) {
  *cap_derivative = 1.0f;
  x *= p.scale;
#if FAP_SOFTCAP
  const float capped = tanhf(x / p.softcap);
  x = p.softcap * capped;
  *cap_derivative = 1.0f - capped * capped;
#endif
#if FAP_ALIBI
  x += alibi_bias_at(slope, diagonal, key);
#endif
  return x * 1.4426950408889634f;
}

// Whether key may be seen by the row whose diagonal key is `diagonal`: mask.h's window_allows (windows are
// normalised to at most max_seqlen_k, so they fit in int), written out so that the window's bounds are read only
// where the key passes the first test: as a call's arguments they live longer, and the wgmma backward at d = 64
// spilled (ptxas, sm_90a). tests/core/test_mask.cpp checks window_allows against allowed_keys.
template <typename Start>
__device__ __forceinline__ bool key_allowed(const AttentionParams& p, const SequenceInfo<Start>& s, int diagonal,
                                            int key) {
  bool allowed = key < s.len_k;
#if FAP_WINDOW
  allowed = allowed && key >= diagonal - (int)p.window_left && key <= diagonal + (int)p.window_right;
#endif
  return allowed;
}

// Where a CTA of the forward and backward main kernels works: block rank `rank` (of `blocks` on the grid's axis)
// of (batch, head), a head being a kv head in the backward. The GPU starts CTAs in the order of their linear
// index. Without a mask every block costs the same: the grid is (blocks, batch, heads), one (batch, head) after
// the other, so that the CTAs running at a time share their keys in L2. Under a mask, chiefly a causal one, a
// block costs more the lower its rank (the kernels number row blocks from the last, key blocks from the first),
// and one (batch, head) after the other leaves the last ones' costliest blocks to start last, with little to fill
// the SMs beside them (simulated for 132 SMs: the last wave adds 3-13 % to the work at 1k-4k tokens per sequence,
// under 1 % at 16k). There the grid is (batch, blocks, heads): each head's blocks rank by rank across the batch,
// longest first (FlashAttention-3's LPT order, in sections of one head); the CTAs running at a time read one
// head's keys (queries) of the whole batch, for up to ~64k tokens of d = 128 within Hopper's L2. The host's
// launches follow the same rule (forward_grid, backward_grid in attention_config.cpp); past 65535 blocks, a grid's y extent, the
// backward's CTAs loop over their blocks and the forward's grid stays (blocks, batch, heads), which it tells by
// its x extent.
struct GridPlace {
  int rank, blocks, batch, head;
};
__device__ __forceinline__ GridPlace place_in_grid() {
#if FAP_WINDOW
  return {(int)blockIdx.y, (int)gridDim.y, (int)blockIdx.x, (int)blockIdx.z};
#else
  return {(int)blockIdx.x, (int)gridDim.x, (int)blockIdx.y, (int)blockIdx.z};
#endif
}
// The forward's, whose fallback grid past 65535 row blocks is (blocks, batch, heads): its x extent is then
// above 65535, which the batch-first grid's never is (batch sizes are at most 65535).
__device__ __forceinline__ GridPlace forward_place_in_grid() {
#if FAP_WINDOW
  if (gridDim.x > 65535u) return {(int)blockIdx.x, (int)gridDim.x, (int)blockIdx.y, (int)blockIdx.z};
#endif
  return place_in_grid();
}

}  // namespace fap
