// The backward's kernels around the main one, shared by the mma.sync (attention_bwd.cuh) and the wgmma
// (attention_bwd_sm90.cuh) main kernels:
//   attention_bwd_preprocess  D = rowsum(dO * O) and the LSE in base-2 units per (head, row), in the
//                             padded row layout below
//   attention_bwd_convert     dQ = scale * (sum of the accumulator slices), rounded to the storage type
// and the pieces both main kernels share. The preprocess clears the dQ accumulator for the main kernel. Uses
// FAP_HEAD_DIM, FAP_WARPS, FAP_SOFTCAP, FAP_ALIBI, FAP_WINDOW and FAP_DQ_TILES.
#pragma once

#include "core/philox.h"
#include "attention_core.cuh"
#include "tensor_core.cuh"


#define FAP_LOG2E 1.4426950408889634f

namespace fap {

// The workspace keeps per-row data in "padded rows": every sequence starts at a multiple of 128 (the
// largest query block) of its own, padded_row0 = (global_row0 / 128 + batch) * 128 (the host sizes the
// buffers for the rounding), so that a query block of a sequence's rows is contiguous and 16-byte aligned
// and never reaches the next sequence's rows.
struct SequenceRows : SequenceInfo<int> {
  int padded_row0;  // the sequence's first padded row
};

__device__ __forceinline__ SequenceRows sequence_rows(const AttentionBwdParams& p, int batch) {
  SequenceRows s;
  static_cast<SequenceInfo<int>&>(s) = sequence_info<int>(p, batch);
  s.padded_row0 = (s.global_row0 / 128 + batch) * 128;
  return s;
}


// The score of q.k in base-2 units as the forward's exponential saw it: plain scores as one product with
// scale * log2(e) (the forward folds the same product into its exponential's multiply-add).
__device__ __forceinline__ float backward_score_log2(float x, const AttentionBwdParams& p, float slope, int diagonal,
                                                     int key, float* cap_derivative) {
#if FAP_SOFTCAP || FAP_ALIBI
  return score_log2(x, p, slope, diagonal, key, cap_derivative);
#else
  *cap_derivative = 1.0f;
  return x * p.scale_log2;
#endif
}

// dsum and lse_log2 of (head, row of the sequence).
__device__ __forceinline__ long long softmax_row_offset(const AttentionBwdParams& p, const SequenceRows& s, int head,
                                                        int row) {
  return head * p.softmax_head_stride + s.padded_row0 + row;
}

// The d = 256 wgmma kernel's deterministic mode (DqOrder, attention_bwd_sm90_common.cuh): the counter of the dQ
// additions to the 64 rows from `row` (a multiple of 64) of `head`.
__device__ __forceinline__ int* dq_order_counter(const AttentionBwdParams& p, const SequenceRows& s, int head,
                                                 int row) {
  return p.dq_order + head * (p.softmax_head_stride / 64) + (s.padded_row0 + row) / 64;
}

// rowsum(dO * O) of one row, from the lanes of a group of kThreadsPerRow consecutive lanes (a power of two that
// divides 32): each a 16-byte chunk of 8 columns at a time where both rows are 16-byte aligned and head_dim % 8 == 0,
// else single elements. Every lane of the group returns the row's sum.
template <int kThreadsPerRow>
__device__ __forceinline__ float row_dot(const storage_t* out, const storage_t* dout, int head_dim, bool inside) {
  const int lane = threadIdx.x % kThreadsPerRow;
  float sum = 0.0f;
  if (inside && head_dim % 8 == 0 && (reinterpret_cast<unsigned long long>(out) | reinterpret_cast<unsigned long long>(dout)) % 16 == 0) {
    for (int col = lane * 8; col < head_dim; col += kThreadsPerRow * 8) {
      const uint4 o = *reinterpret_cast<const uint4*>(out + col), g = *reinterpret_cast<const uint4*>(dout + col);
      const unsigned int os[4] = {o.x, o.y, o.z, o.w}, gs[4] = {g.x, g.y, g.z, g.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        sum += to_float(static_cast<storage_t>(os[i])) * to_float(static_cast<storage_t>(gs[i]));
        sum += to_float(static_cast<storage_t>(os[i] >> 16)) * to_float(static_cast<storage_t>(gs[i] >> 16));
      }
    }
  } else if (inside) {
    for (int col = lane; col < head_dim; col += kThreadsPerRow) sum += to_float(out[col]) * to_float(dout[col]);
  }
#pragma unroll
  for (int step = kThreadsPerRow / 2; step > 0; step /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, step);
  return sum;
}

// Zeroes the dQ accumulator's rows row0 .. row0 + 127 of `head` in every slice, before the main kernel adds to them:
// in both layouts (dq_accum_offset below) the values of 16 (mma.sync) or 64 (wgmma) rows of one head are contiguous.
__device__ __forceinline__ void clear_dq_accum(const AttentionBwdParams& p, const SequenceRows& s, int batch, int head,
                                               int row0);

// Grid (ceil(seqlen_q / 128), batch, heads), 4 warps: the 128 padded rows from row0 = 128 blockIdx.x of one
// (sequence, head), a row per group of lanes (as many as a row has 16-byte chunks, to a warp). Rows from the
// sequence's end to the next multiple of 128 get D = 0 and LSE = +inf (P = 0), so that the main kernels load whole
// query blocks. Also zeroes those rows of the dQ accumulator, as FlashAttention-2's preprocess does (before: a
// separate clearing pass, then one row per warp in 2-byte loads, 1.2-2.4x FlashAttention-2's time for the two on
// an H200).
// Where the dQ additions are ordered (DqOrder), the first row of every 64 also starts its rows' counter of
// additions at twice the first key block that sees it.
extern "C" __global__ void __launch_bounds__(128) attention_bwd_preprocess(const AttentionBwdParams p) {
  constexpr int kChunks = FAP_HEAD_DIM / 8;
  constexpr int kThreadsPerRow = kChunks <= 8 ? 8 : kChunks <= 16 ? 16 : 32;
  const int batch = blockIdx.y, head = blockIdx.z, row0 = blockIdx.x * 128;
  const SequenceRows s = sequence_rows(p, batch);
  if (row0 >= s.len_q) return;
  clear_dq_accum(p, s, batch, head, row0);
  const int lane = threadIdx.x % kThreadsPerRow;
#pragma unroll 4
  for (int row = row0 + threadIdx.x / kThreadsPerRow; row < row0 + 128; row += 128 / kThreadsPerRow) {
    const bool inside = row < s.len_q;
    const storage_t* out = static_cast<const storage_t*>(p.out) + batch * p.out_batch_stride +
                           (s.q_start + row) * p.out_row_stride + head * p.out_head_stride;
    const storage_t* dout = static_cast<const storage_t*>(p.dout) + batch * p.dout_batch_stride +
                            (s.q_start + row) * p.dout_row_stride + head * p.dout_head_stride;
    const float sum = row_dot<kThreadsPerRow>(out, dout, p.head_dim, inside);
    if (lane != 0) continue;
    const long long slot = softmax_row_offset(p, s, head, row);
    if (!inside) {
      p.dsum[slot] = 0.0f, p.lse_log2[slot] = FAP_INFINITY;
      continue;
    }
    if (p.dq_order && row % 64 == 0) {
      *dq_order_counter(p, s, head, row) = 2 * key_blocks_of_rows<FAP_BLOCK_N>(p, s, row, row).first;
    }
    p.dsum[slot] = sum;
    const float lse = p.lse[batch * p.lse_batch_stride + head * p.lse_head_stride + (s.q_start + row) * p.lse_row_stride];
    // FlashAttention-2 shifts by 0 where the lse is -inf (its exponential's rule for a row max of -inf); NaN
    // stays NaN and makes the row's P NaN.
    p.lse_log2[slot] = lse == -FAP_INFINITY ? 0.0f : lse * FAP_LOG2E;
  }
}

// Where dQ's (row, head, col) sits in an accumulator slice (row: in the sequence). Both layouts follow an
// accumulator fragment's order in the registers, so that a warp's additions land on whole cache lines:
//  FAP_DQ_TILES = 0 (mma.sync): tiles of 16 rows x 8 columns per (16 padded rows, head, 8 columns), each the
//  m16n8 accumulator of a warp as value e of lane l at e * 32 + l: lane l holds columns 2 (l % 4) (+ 1) of rows
//  l / 4 and l / 4 + 8, e = 2 * (row % 16 / 8) + col % 2. One atomic per (e, lane) from the 32 lanes adds to 32
//  consecutive floats.
//  FAP_DQ_TILES = 1 (wgmma): tiles of 64 rows x FAP_HEAD_DIM per (64 padded rows, head), so that the wgmma kernel
//  adds a warpgroup's dQ in one bulk reduction. Inside a tile, each 64-column block is stored in the order a
//  warpgroup's m64 accumulator fragment lies in its registers: float4 i of thread t at (128 i + t) * 4, holding
//  columns 8 i + 2 (t % 4) (+ 1) of rows 16 (t / 32) + t % 32 / 4 and + 8.
__device__ __forceinline__ long long dq_accum_offset(const AttentionBwdParams& p, const SequenceRows& s, int batch,
                                                     int row, int head, int col) {
#if FAP_DQ_TILES
  const long long tile = ((long long)(s.padded_row0 + row) / 64 * p.heads_q + head) * 64 * FAP_HEAD_DIM;
  const int r = row % 64, c = col % 64;
  const int thread = r / 16 * 32 + r % 8 * 4 + c % 8 / 2;
  return tile + col / 64 * 64 * 64 + (c / 8 * 128 + thread) * 4 + r % 16 / 8 * 2 + c % 2;
#else
  const long long tile = ((long long)(s.padded_row0 + row) / 16 * p.heads_q + head) * (FAP_HEAD_DIM / 8) + col / 8;
  return tile * 128 + (row % 16 / 8 * 2 + col % 2) * 32 + row % 8 * 4 + col % 8 / 2;
#endif
}

__device__ __forceinline__ void clear_dq_accum(const AttentionBwdParams& p, const SequenceRows& s, int batch, int head,
                                               int row0) {
  constexpr int kContiguousRows = FAP_DQ_TILES ? 64 : 16;
  constexpr int kFloat4s = kContiguousRows * FAP_HEAD_DIM / 4;
  const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  for (int split = 0; split < p.splits; ++split)
#pragma unroll
    for (int rows = 0; rows < 128; rows += kContiguousRows) {
      float4* block = reinterpret_cast<float4*>(p.dq_accum + split * p.dq_accum_split_stride +
                                                dq_accum_offset(p, s, batch, row0 + rows, head, 0));
#pragma unroll 4
      for (int i = threadIdx.x; i < kFloat4s; i += 128) block[i] = zero;
    }
}

#if !FAP_DQ_TILES
// dq_accum_offset(.., row + rows, .., col) - dq_accum_offset(.., row, .., 0) for a row, a number of rows and a
// column that are multiples of 16, 16 and 8 (the layout is linear in whole tiles): the mma.sync backward computes
// the sequence's and head's part once per step and each work item's from it.
__device__ __forceinline__ long long dq_accum_offset_in_rows(const AttentionBwdParams& p, int rows, int col) {
  return ((long long)(rows / 16) * p.heads_q * (FAP_HEAD_DIM / 8) + col / 8) * 128;
}
#endif

// Row `row` of the sequence, head `head` of dq.
__device__ __forceinline__ storage_t* dq_row(const AttentionBwdParams& p, const SequenceRows& s, int batch, int row,
                                             int head) {
  return static_cast<storage_t*>(p.dq) + batch * p.dq_batch_stride + (s.q_start + row) * p.dq_row_stride +
         head * p.dq_head_stride;
}

#if FAP_DQ_TILES
// Grid (ceil(seqlen_q / 64), batch, heads), 4 warps: one 64-row tile, a 64-column block at a time through
// shared memory, read in the tile's fragment order (whole float4s) and written row by row.
extern "C" __global__ void __launch_bounds__(128) attention_bwd_convert(const AttentionBwdParams p) {
  __shared__ float block[64][64 + 8];  // +8: the fragment's row pairs land in different banks
  const int batch = blockIdx.y, head = blockIdx.z, row0 = blockIdx.x * 64;
  const SequenceRows s = sequence_rows(p, batch);
  if (row0 >= s.len_q) return;
  const int t = threadIdx.x, upper = t / 32 * 16 + t % 32 / 4, quad = t % 4, warp = t / 32, lane = t % 32;
  const float4* tile = reinterpret_cast<const float4*>(p.dq_accum + dq_accum_offset(p, s, batch, row0, head, 0));
  for (int column_block = 0; column_block < FAP_HEAD_DIM / 64; ++column_block) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      for (int split = 0; split < p.splits; ++split) {
        const float4 part = tile[split * p.dq_accum_split_stride / 4 + (column_block * 8 + i) * 128 + t];
        sum.x += part.x, sum.y += part.y, sum.z += part.z, sum.w += part.w;
      }
      *reinterpret_cast<float2*>(&block[upper][i * 8 + quad * 2]) = make_float2(sum.x, sum.y);
      *reinterpret_cast<float2*>(&block[upper + 8][i * 8 + quad * 2]) = make_float2(sum.z, sum.w);
    }
    __syncthreads();
    const int col = column_block * 64 + lane * 2;
    for (int r = warp; r < 64 && row0 + r < s.len_q; r += 4) {
      storage_t* dq = dq_row(p, s, batch, row0 + r, head);
      if (pairs_aligned(dq, p.head_dim)) {
        store_pair<true>(dq, col, block[r][lane * 2] * p.scale, block[r][lane * 2 + 1] * p.scale, p.head_dim);
      } else {
        store_pair<false>(dq, col, block[r][lane * 2] * p.scale, block[r][lane * 2 + 1] * p.scale, p.head_dim);
      }
    }
    __syncthreads();
  }
}
#else
// Grid (ceil(seqlen_q / 64), batch, heads), 4 warps: 64 rows, 16 at a time. A 16-row group's accumulator values
// (contiguous, in fragment order) are read as whole float4s, each 4 columns (2 apart) of one row, into shared memory
// in row order; then each thread writes 8 columns of a row in one 16-byte store where the row allows (before:
// 2-byte stores straight from the fragment order, 2.3-2.6x FlashAttention-2's conversion time on an H200).
extern "C" __global__ void __launch_bounds__(128) attention_bwd_convert(const AttentionBwdParams p) {
  constexpr int kChunks = FAP_HEAD_DIM / 8;
  // +2 floats per row: a warp's 32 stores of one float4 component (rows r and r + 8, columns c and c + 1) land
  // in 32 different banks.
  __shared__ float block[16][FAP_HEAD_DIM + 2];
  const int batch = blockIdx.y, head = blockIdx.z;
  const SequenceRows s = sequence_rows(p, batch);
  const int first_row = blockIdx.x * 64, end_row = min(first_row + 64, s.len_q);
  for (int row0 = first_row; row0 < end_row; row0 += 16) {
    const float4* group = reinterpret_cast<const float4*>(p.dq_accum + dq_accum_offset(p, s, batch, row0, head, 0));
    for (int i = threadIdx.x; i < 4 * FAP_HEAD_DIM; i += 128) {
      // Summed from zero: starting from slice 0's values, ptxas put the slices' base address through local memory
      // (fp16 at d = 96 and 160 on sm_80).
      float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      for (int split = 0; split < p.splits; ++split) {
        const float4 part = group[split * p.dq_accum_split_stride / 4 + i];
        sum.x += part.x, sum.y += part.y, sum.z += part.z, sum.w += part.w;
      }
      // Float i holds value e of lanes 4 l4 .. 4 l4 + 3 of the 16 x 8 tile `tile` (dq_accum_offset's layout).
      const int tile = i / 32, e = i % 32 / 8, l4 = i % 8;
      const int row = l4 + e / 2 * 8, col = tile * 8 + e % 2;
      block[row][col] = sum.x, block[row][col + 2] = sum.y, block[row][col + 4] = sum.z, block[row][col + 6] = sum.w;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 16 * kChunks; i += 128) {
      const int r = i / kChunks, col = i % kChunks * 8;
      if (row0 + r >= s.len_q || col >= p.head_dim) continue;
      storage_t* dq = dq_row(p, s, batch, row0 + r, head);
      float v[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = block[r][col + j] * p.scale;
      if (col + 8 <= p.head_dim && reinterpret_cast<unsigned long long>(dq + col) % 16 == 0) {
        *reinterpret_cast<uint4*>(dq + col) = make_uint4(pack2(v[0], v[1]), pack2(v[2], v[3]), pack2(v[4], v[5]),
                                                         pack2(v[6], v[7]));
      } else {
        for (int j = 0; j < 8 && col + j < p.head_dim; ++j) dq[col + j] = from_float(v[j]);
      }
    }
    __syncthreads();
  }
}
#endif

// Starts copying BLOCK_M floats of a per-query-row array (LSE in base-2 units, or D) from row q0 (a multiple of
// BLOCK_M, which divides 128) into shared memory with cp.async, 16 bytes by each of the threads `first_thread` to
// first_thread + BLOCK_M / 4 - 1: whole padded rows (rows past the sequence have P = 0).
template <int BLOCK_M>
__device__ __forceinline__ void load_query_rows(float* rows, const float* source, const AttentionBwdParams& p,
                                                const SequenceRows& s, int head, int q0, int first_thread) {
  constexpr int kChunks = BLOCK_M / 4;
  static_assert(2 * kChunks <= FAP_WARPS * 32, "LSE and D rows take a chunk per thread");
  const int i = static_cast<int>(threadIdx.x) - first_thread;
  if (i >= 0 && i < kChunks) cp_async_16(rows + i * 4, source + softmax_row_offset(p, s, head, q0) + i * 4);
}

// LSE and D of the step's rows, by different threads, a copy each (written as two load_query_rows calls, the
// wgmma kernels' fp16 d = 64 window configuration spilled a register).
template <int BLOCK_M>
__device__ __forceinline__ void load_softmax_rows(float* lse_rows, float* dsum_rows, const AttentionBwdParams& p,
                                                  const SequenceRows& s, int head, int q0) {
  constexpr int kChunks = BLOCK_M / 4;
  static_assert(2 * kChunks <= FAP_WARPS * 32, "a chunk per thread");
  const int i = threadIdx.x;
  if (i < 2 * kChunks) {
    const bool lse = i < kChunks;
    const int element = i % kChunks * 4;
    cp_async_16((lse ? lse_rows : dsum_rows) + element,
                (lse ? p.lse_log2 : p.dsum) + softmax_row_offset(p, s, head, q0) + element);
  }
}

// One key's dK (times the softmax scale: scores are scale * q.k) and dV from accumulator fragments: this
// thread's columns col0 + 8 i + 2 quad and + 1, of the fragment rows `half`.
template <int COLUMNS8>
__device__ __forceinline__ void store_key_gradients(const AttentionBwdParams& p, const SequenceRows& s, int batch,
                                                    int kv_head, int key, int half, int col0,
                                                    const float (&dk)[COLUMNS8][4], const float (&dv)[COLUMNS8][4]) {
  if (key >= s.len_k) return;
  storage_t* dk_row = static_cast<storage_t*>(p.dk) + batch * p.dk_batch_stride + (s.k_start + key) * p.dk_row_stride +
                      kv_head * p.dk_head_stride;
  storage_t* dv_row = static_cast<storage_t*>(p.dv) + batch * p.dv_batch_stride + (s.k_start + key) * p.dv_row_stride +
                      kv_head * p.dv_head_stride;
  const bool paired = pairs_aligned(dk_row, p.head_dim) && pairs_aligned(dv_row, p.head_dim);
#pragma unroll
  for (int i = 0; i < COLUMNS8; ++i) {
    const int col = col0 + i * 8 + threadIdx.x % 4 * 2;
    const float dk0 = dk[i][2 * half] * p.scale, dk1 = dk[i][2 * half + 1] * p.scale;
    if (paired) {
      store_pair<true>(dk_row, col, dk0, dk1, p.head_dim);
      store_pair<true>(dv_row, col, dv[i][2 * half], dv[i][2 * half + 1], p.head_dim);
    } else {
      store_pair<false>(dk_row, col, dk0, dk1, p.head_dim);
      store_pair<false>(dv_row, col, dv[i][2 * half], dv[i][2 * half + 1], p.head_dim);
    }
  }
}

// P for one (row, key) from the raw product q.k, the forward's LSE (base-2 units) and, when MASKED, the
// mask; `cap_derivative` gets the softcap's derivative (1 without softcap).
template <bool MASKED>
__device__ __forceinline__ float backward_probability(float x, const AttentionBwdParams& p, const SequenceRows& s,
                                                      float slope, int row, int key, float lse_log2,
                                                      float* cap_derivative) {
  const int diagonal = row + s.offset;
  float prob = fast_exp2(backward_score_log2(x, p, slope, diagonal, key, cap_derivative) - lse_log2);
  if (MASKED && !key_allowed(p, s, diagonal, key)) prob = 0.0f;
  return prob;
}

}  // namespace fap
