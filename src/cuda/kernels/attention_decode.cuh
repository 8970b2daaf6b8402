// Attention over a KV cache, for decoding and chunked prefill (sm_80+, mma.sync): FlashAttention-2's KV-cache
// forward and its varlen forward over a paged cache, with the keys read in place.
//
// One CTA per (key split, batch * kv head, block of 16 packed rows). Packed row r = i * group + g is query row i
// of query head kv_head * group + g, so the query heads that share a kv head share its K and V reads (GQA
// packing). The CTA's warps take the split's key tiles in turn (tile first + warp, + FAP_WARPS, ...), each warp
// with its own cp.async pipeline of FAP_STAGES tiles in shared memory: warps never wait on one another until the
// end, where their partial softmax states merge through shared memory. With one split the CTA writes out and
// lse; otherwise each split's normalised output and LSE go to the workspace and attention_decode_combine merges
// them in split order (deterministic). The split count is a launch parameter chosen from shapes only, and every
// length and index is read on the device (clamped to the cache), so a call is capturable in a CUDA graph.
//
// Defines: FAP_HEAD_DIM (multiple of 16), FAP_BLOCK_N (keys per warp tile: 16 or 32), FAP_STAGES, FAP_WARPS,
// FAP_BF16, FAP_SOFTCAP, FAP_ALIBI, FAP_WINDOW; FAP_DROPOUT is 0 (no dropout in these calls).
#pragma once

// sm_75's single decode warp above d = 208 has no register left for the softmax's huge-scale guard
// (attention_fwd_common.cuh): there the fused exponent stays, finite while |max * scale| < ~2^31.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800 && FAP_HEAD_DIM > 208
#define FAP_EXPONENT_GUARD 0
#endif

#include "cache_keys.cuh"
#include "kv_cache_append.cuh"
#include "tile_layouts.h"

namespace fap {

constexpr int kDecodeRows = DecodeSharedLayout::kRows;  // packed rows per CTA
constexpr int kDecodeMaxSplits = 128;                    // attention_decode_combine's bound (the host's too)

// The block-table entry (paged caches) of key key0 + lane, for load_kv_tile: the loop loads it one step ahead of
// the copies, so that its latency passes under a tile's products instead of stalling the warp before its copies.
__device__ __forceinline__ int lane_key_block(const DecodeParams& p, const CacheSequence& d, int batch, int key0,
                                              int lane) {
  return lane < FAP_BLOCK_N && key0 + lane < d.seq.len_k ? key_block(p, d, batch, key0 + lane) : 0;
}

// Loads one warp's K and V tiles of FAP_BLOCK_N keys from key0 (zeros past the sequence's keys and head_dim), lane
// l holding key key0 + l's block-table entry (lane_key_block). Where the tile's rows are one run of rows (a dense
// cache, or pages of a multiple of FAP_BLOCK_N rows) and hold a power-of-two count of 16-byte chunks, each lane
// copies one column of every (32 / chunks)-th row, its addresses stepping by the row stride; else each lane finds
// its key's cache row and the warp's copies take each row's offsets from its lane (shuffles, per-chunk arithmetic).
__device__ __forceinline__ void load_kv_tile(storage_t* k_tile, storage_t* v_tile, const DecodeParams& p,
                                             const CacheSequence& d, int key0, int block, int lane) {
  constexpr int kChunks = FAP_HEAD_DIM / 8;  // 16-byte chunks per row; FAP_BLOCK_N * kChunks is a multiple of 32
  if constexpr (32 % kChunks == 0) {
    const bool one_run = !p.block_table || (p.page_size % FAP_BLOCK_N == 0 && d.seq.k_start % FAP_BLOCK_N == 0);
    if (one_run && p.vector_loads) {
      constexpr int kRowStep = 32 / kChunks;
      const KeyRowOffsets first =
          key_row_offsets(p, d, key0, p.block_table ? __shfl_sync(0xffffffffu, block, 0) : 0);
      const int row0 = lane / kChunks, col = (lane % kChunks) * 8;
      const storage_t* k = static_cast<const storage_t*>(p.k) + first.k + row0 * p.k_row_stride + col;
      const storage_t* v = static_cast<const storage_t*>(p.v) + first.v + row0 * p.v_row_stride + col;
      const bool inside = col < p.head_dim;
#pragma unroll
      for (int row = row0; row < FAP_BLOCK_N; row += kRowStep) {
        const bool valid = inside && key0 + row < d.seq.len_k;  // else no byte is read: zeros
        cp_async_16_or_zero_streaming(k_tile + row * FAP_STRIDE + col, valid ? k : static_cast<const storage_t*>(p.k),
                                      valid);
        cp_async_16_or_zero_streaming(v_tile + row * FAP_STRIDE + col, valid ? v : static_cast<const storage_t*>(p.v),
                                      valid);
        k += kRowStep * p.k_row_stride;
        v += kRowStep * p.v_row_stride;
      }
      return;
    }
  }
  KeyRowOffsets mine{d.k_base, d.v_base};
  if (lane < FAP_BLOCK_N && key0 + lane < d.seq.len_k) mine = key_row_offsets(p, d, key0 + lane, block);
#pragma unroll
  for (int chunk = lane; chunk < FAP_BLOCK_N * kChunks; chunk += 32) {
    const int row = chunk / kChunks, col = (chunk % kChunks) * 8;
    const KeyRowOffsets rows{__shfl_sync(0xffffffffu, mine.k, row), __shfl_sync(0xffffffffu, mine.v, row)};
    copy_key_chunk(k_tile + row * FAP_STRIDE + col, v_tile + row * FAP_STRIDE + col, p, rows, col,
                   key0 + row < d.seq.len_k);
  }
}

// The query row and head of packed row r of the CTA's block.
struct PackedRow {
  int row, head;
};
__device__ __forceinline__ PackedRow packed_row(const DecodeParams& p, int row_block, int kv_head, int r) {
  const int packed = row_block * kDecodeRows + r;
  return {packed / p.group_size, kv_head * p.group_size + packed % p.group_size};
}

// Launch bounds (threads, 1): every register may go to one CTA. With the default, ptxas (under NVRTC) spilled a
// few bytes around the key loop at small head dims on sm_80/86. Where two CTAs fit an SM's shared memory
// (d <= 64), ptxas stays near 110 registers, within two CTAs' share.
extern "C" __global__ void __launch_bounds__(FAP_WARPS * 32, 1) attention_decode(const DecodeParams p) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  constexpr DecodeSharedLayout kLayout{FAP_HEAD_DIM, FAP_BLOCK_N, FAP_STAGES, FAP_WARPS};
  static_assert(padded_row(FAP_HEAD_DIM) == FAP_STRIDE, "tiles are laid out with the kernel's row stride");
  constexpr int kKvTile = kLayout.kv_tile();  // elements of one K or V tile
  storage_t* q_tile = reinterpret_cast<storage_t*>(shared_bytes);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // This warp's stages: K then V tile per stage.
  storage_t* warp_tiles = q_tile + kLayout.stages_offset() + warp * kLayout.warp_stages();

  launch_dependents();  // the combine's CTAs may be scheduled while these run: they wait for this grid's end
  const int split = blockIdx.x, row_block = blockIdx.z;
  const int heads_kv = p.heads_q / p.group_size;
  const int batch = blockIdx.y / heads_kv, kv_head = blockIdx.y % heads_kv;
  const CacheSequence d = cache_sequence(p, batch, kv_head);
  const ForwardSequence& seq = d.seq;
  if (row_block * kDecodeRows >= seq.len_q * p.group_size) return;

  // The packed rows' query tile.
  for (int chunk = threadIdx.x; chunk < kDecodeRows * (FAP_HEAD_DIM / 8); chunk += FAP_WARPS * 32) {
    const int r = chunk / (FAP_HEAD_DIM / 8), col = (chunk % (FAP_HEAD_DIM / 8)) * 8;
    const PackedRow row = packed_row(p, row_block, kv_head, r);
    const bool valid = row.row < seq.len_q;
    const storage_t* source = static_cast<const storage_t*>(p.q) + batch * p.q_batch_stride +
                              (seq.q_start + (valid ? row.row : 0)) * p.q_row_stride + row.head * p.q_head_stride + col;
    storage_t* target = q_tile + r * FAP_STRIDE + col;
    if (p.vector_loads) {
      cp_async_16_or_zero(target, source, valid && col < p.head_dim);
    } else {
      for (int e = 0; e < 8; ++e) target[e] = valid && col + e < p.head_dim ? source[e] : (storage_t)0;
    }
  }
  cp_async_commit();

  // The split's key tiles: the tiles any of the block's rows may see, cut into p.splits equal parts.
  const int first_row = packed_row(p, row_block, kv_head, 0).row;
  const int last_row = min(packed_row(p, row_block, kv_head, kDecodeRows - 1).row, seq.len_q - 1);
  const BlockRange all = key_blocks_of_rows<FAP_BLOCK_N>(p, seq, first_row, last_row);
  const int per_split = (all.end - all.first + p.splits - 1) / p.splits;
  const int tiles_first = all.first + split * per_split;
  const int tiles_end = min(tiles_first + per_split, all.end);

  int tile = tiles_first + warp;
  // The block-table entries of the first FAP_STAGES tiles, loaded at once (their latencies overlap).
  int blocks[FAP_STAGES];
#pragma unroll
  for (int stage = 0; stage < FAP_STAGES; ++stage)
    blocks[stage] = lane_key_block(p, d, batch, (tile + stage * FAP_WARPS) * FAP_BLOCK_N, lane);
#pragma unroll
  for (int stage = 0; stage < FAP_STAGES - 1; ++stage) {
    const int ahead = tile + stage * FAP_WARPS;
    storage_t* k_tile = warp_tiles + stage * 2 * kKvTile;
    if (ahead < tiles_end) load_kv_tile(k_tile, k_tile + kKvTile, p, d, ahead * FAP_BLOCK_N, blocks[stage], lane);
    cp_async_commit();
  }
  cp_async_wait<FAP_STAGES - 1>();  // the query tile's group (the oldest) has landed
  __syncthreads();

  const int group = lane / 4;
  PackedRow mine[2] = {packed_row(p, row_block, kv_head, group), packed_row(p, row_block, kv_head, group + 8)};
  const int rows[2] = {mine[0].row, mine[1].row};
  RowSlopes slopes{0.0f, 0.0f};
#if FAP_ALIBI
  slopes = {p.alibi[batch * p.alibi_batch_stride + mine[0].head], p.alibi[batch * p.alibi_batch_stride + mine[1].head]};
#endif
  float acc[FAP_HEAD_DIM / 8][4];
  zero_fragments(acc);
  float row_max[2] = {-FAP_INFINITY, -FAP_INFINITY}, row_sum[2] = {0.0f, 0.0f};
  const int m = lane / 8, r = lane % 8;  // ldmatrix: this lane addresses row r of matrix m

  int ahead_block = blocks[FAP_STAGES - 1];
  for (int step = 0; tile < tiles_end; ++step, tile += FAP_WARPS) {
    const int ahead = tile + (FAP_STAGES - 1) * FAP_WARPS;
    if (ahead < tiles_end) {
      storage_t* k_next = warp_tiles + (step + FAP_STAGES - 1) % FAP_STAGES * 2 * kKvTile;
      load_kv_tile(k_next, k_next + kKvTile, p, d, ahead * FAP_BLOCK_N, ahead_block, lane);
    }
    ahead_block = lane_key_block(p, d, batch, (ahead + FAP_WARPS) * FAP_BLOCK_N, lane);
    cp_async_commit();
    cp_async_wait<FAP_STAGES - 1>();
    __syncwarp();
    const storage_t* k_tile = warp_tiles + step % FAP_STAGES * 2 * kKvTile;
    const storage_t* v_tile = k_tile + kKvTile;

    float s[FAP_BLOCK_N / 8][4];
    zero_fragments(s);
#pragma unroll
    for (int kk = 0; kk < FAP_HEAD_DIM / 16; ++kk) {
      unsigned int a[4];
      ldmatrix_x4(a, q_tile + ((m % 2) * 8 + r) * FAP_STRIDE + kk * 16 + (m / 2) * 8);
#pragma unroll
      for (int j = 0; j < FAP_BLOCK_N / 16; ++j) {
        unsigned int b[4];
        ldmatrix_x4(b, k_tile + (j * 16 + (m / 2) * 8 + r) * FAP_STRIDE + kk * 16 + (m % 2) * 8);
        mma_16816(s[2 * j], a, b[0], b[1]);
        mma_16816(s[2 * j + 1], a, b[2], b[3]);
      }
    }

    const int key0 = tile * FAP_BLOCK_N;
    bool needs_mask = key0 + FAP_BLOCK_N > seq.len_k;
#if FAP_WINDOW
    needs_mask = needs_mask || key0 < (long long)last_row + seq.offset - p.window_left ||
                 key0 + FAP_BLOCK_N - 1 > (long long)first_row + seq.offset + p.window_right;
#endif
    float correction[2];
    softmax_tile(s, p, seq, batch, 0, rows, key0, needs_mask, slopes, row_max, row_sum, correction);
    // Once the rows' maxima settle most tiles leave them unchanged: the warp skips the multiplications by 1.
    if (__any_sync(0xffffffffu, correction[0] != 1.0f || correction[1] != 1.0f)) rescale_rows(acc, correction);

#pragma unroll
    for (int kk = 0; kk < FAP_BLOCK_N / 16; ++kk) {
      unsigned int a[4];
      pack_a_operand(a, s, kk);
#pragma unroll
      for (int i = 0; i < FAP_HEAD_DIM / 16; ++i) {
        unsigned int b[4];
        ldmatrix_x4_trans(b, v_tile + (kk * 16 + (m % 2) * 8 + r) * FAP_STRIDE + i * 16 + (m / 2) * 8);
        mma_16816(acc[2 * i], a, b[0], b[1]);
        mma_16816(acc[2 * i + 1], a, b[2], b[3]);
      }
    }
    __syncwarp();  // every lane has read this stage before a later step loads into it
  }
  cp_async_wait_all();
  __syncthreads();  // the stages become the merge buffer

  // Each warp's unnormalised output and its rows' (max, sum), then one merged row per 8 threads.
  float* merged_out = reinterpret_cast<float*>(q_tile + kLayout.stages_offset());  // [warp][row][FAP_HEAD_DIM]
  float* merged_max = merged_out + FAP_WARPS * kDecodeRows * FAP_HEAD_DIM;          // [warp][row]
  float* merged_sum = merged_max + FAP_WARPS * kDecodeRows;                          // [warp][row]
  const int quad = lane % 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    row_sum[half] += __shfl_xor_sync(0xffffffffu, row_sum[half], 1);
    row_sum[half] += __shfl_xor_sync(0xffffffffu, row_sum[half], 2);
    const int row = group + 8 * half;
    float* out_row = merged_out + (warp * kDecodeRows + row) * FAP_HEAD_DIM;
#pragma unroll
    for (int i = 0; i < FAP_HEAD_DIM / 8; ++i) {
      out_row[i * 8 + quad * 2] = acc[i][2 * half];
      out_row[i * 8 + quad * 2 + 1] = acc[i][2 * half + 1];
    }
    if (quad == 0) {
      merged_max[warp * kDecodeRows + row] = row_max[half];
      merged_sum[warp * kDecodeRows + row] = row_sum[half];
    }
  }
  __syncthreads();

  constexpr int kThreadsPerRow = FAP_WARPS * 32 / kDecodeRows;
  const int row = threadIdx.x / kThreadsPerRow, part = threadIdx.x % kThreadsPerRow;
  const PackedRow target = packed_row(p, row_block, kv_head, row);
  if (target.row >= seq.len_q) return;
  float max_all = -FAP_INFINITY;
#pragma unroll
  for (int w = 0; w < FAP_WARPS; ++w) max_all = fmaxf(max_all, merged_max[w * kDecodeRows + row]);
  const float shift = max_all == -FAP_INFINITY ? 0.0f : max_all;  // no key at all: exact zeros
  float weight[FAP_WARPS], sum = 0.0f;
#pragma unroll
  for (int w = 0; w < FAP_WARPS; ++w) {
    weight[w] = fast_exp2(merged_max[w * kDecodeRows + row] - shift);
    sum += weight[w] * merged_sum[w * kDecodeRows + row];
  }
  const float inverse = sum == 0.0f ? 0.0f : 1.0f / sum;
  // A split's partial lse keeps NaN (the combine makes the row NaN) and -inf for no key (weight 0).
  const float lse_log2 = sum == 0.0f ? -FAP_INFINITY : max_all + __log2f(sum);
  if (p.splits == 1) {
    storage_t* out = static_cast<storage_t*>(p.out) + batch * p.out_batch_stride +
                     (seq.q_start + target.row) * p.out_row_stride + target.head * p.out_head_stride;
    for (int col = part; col < p.head_dim; col += kThreadsPerRow) {
      float value = 0.0f;
#pragma unroll
      for (int w = 0; w < FAP_WARPS; ++w) value += weight[w] * merged_out[(w * kDecodeRows + row) * FAP_HEAD_DIM + col];
      out[col] = from_float(value * inverse);
    }
    if (p.lse && part == 0) {
      p.lse[batch * p.lse_batch_stride + target.head * p.lse_head_stride + (seq.q_start + target.row) * p.lse_row_stride] =
          row_lse_log2(max_all, sum) * 0.6931471805599453f;
    }
    return;
  }
  const long long partial = ((long long)split * p.heads_q + target.head) * p.split_rows + seq.global_row0 + target.row;
  for (int col = part; col < p.head_dim; col += kThreadsPerRow) {
    float value = 0.0f;
#pragma unroll
    for (int w = 0; w < FAP_WARPS; ++w) value += weight[w] * merged_out[(w * kDecodeRows + row) * FAP_HEAD_DIM + col];
    p.partial_out[partial * p.head_dim + col] = value * inverse;
  }
  if (part == 0) p.partial_lse[partial] = lse_log2;
}

// Merges the splits' partial results of one (row, head) per CTA: the first warp turns the splits' LSEs into
// weights exp2(lse_s - max) in shared memory, then each thread sums its columns over the splits in split order
// (deterministic), the loads of several splits in flight at once.
extern "C" __global__ void __launch_bounds__(128) attention_decode_combine(const DecodeParams p) {
  __shared__ float weights[kDecodeMaxSplits];
  __shared__ float total[2];  // the max and the sum of the weights
  const int row = blockIdx.x, head = blockIdx.y;
  wait_for_prerequisites();  // launched early (programmatic dependent launch): the splits' results land first
  if (p.cu_seqlens_q && row >= p.cu_seqlens_q[p.batch]) return;  // rows of no sequence
  const long long stride = (long long)p.heads_q * p.split_rows;  // between splits
  const long long first = (long long)head * p.split_rows + row;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    float max_all = -FAP_INFINITY;
    for (int s = lane; s < p.splits; s += 32) max_all = fmaxf(max_all, p.partial_lse[first + s * stride]);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) max_all = fmaxf(max_all, __shfl_xor_sync(0xffffffffu, max_all, offset));
    const float shift = max_all == -FAP_INFINITY ? 0.0f : max_all;
    float sum = 0.0f;
    for (int s = lane; s < p.splits; s += 32) {
      weights[s] = fast_exp2(p.partial_lse[first + s * stride] - shift);
      sum += weights[s];
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) total[0] = max_all, total[1] = sum;
  }
  __syncthreads();
  const float sum = total[1];
  const float inverse = sum == 0.0f ? 0.0f : 1.0f / sum;
  const int batch = p.cu_seqlens_q ? 0 : row / p.seqlen_q, i = p.cu_seqlens_q ? row : row % p.seqlen_q;
  storage_t* out = static_cast<storage_t*>(p.out) + batch * p.out_batch_stride + i * p.out_row_stride +
                   head * p.out_head_stride;
  for (int col = threadIdx.x; col < p.head_dim; col += blockDim.x) {
    const float* partial = p.partial_out + first * p.head_dim + col;
    float value = 0.0f;
#pragma unroll 8
    for (int s = 0; s < p.splits; ++s) value += weights[s] * partial[s * stride * p.head_dim];
    out[col] = from_float(value * inverse);
  }
  if (p.lse && threadIdx.x == 0) {
    p.lse[batch * p.lse_batch_stride + head * p.lse_head_stride + i * p.lse_row_stride] =
        row_lse_log2(total[0], sum) * 0.6931471805599453f;
  }
}

}  // namespace fap
