// Attention forward for sm_80+ (FlashAttention-2's algorithm on tensor cores): one CTA per (block of
// BLOCK_M query rows, batch, head), one warp per 16 * ROW_TILES rows (each K/V fragment read from shared
// memory serves ROW_TILES row tiles). Key/value tiles of BLOCK_N rows are brought into shared memory with
// cp.async, in one of two pipelines (FAP_STAGES): 2, K and V tiles double-buffered, the next pair loading while
// this one is computed; 1, FlashAttention-2's, one K and one V tile, V's copies running under S and the
// next K's under the softmax and P V (half the shared memory, so two CTAs fit an sm_80 SM with larger tiles).
// S = Q K^T and O += P V run on mma.sync.m16n8k16 with fp32 accumulation; the online softmax works in the
// base-2 domain on the accumulator registers.
//
// Compile-time configuration (defines, set by the host's KernelConfig):
//   FAP_HEAD_DIM  head dim rounded up to a multiple of 16     FAP_BLOCK_M, FAP_BLOCK_N, FAP_WARPS, FAP_ROW_TILES
//   FAP_BF16      1: bfloat16, 0: float16                      FAP_SOFTCAP, FAP_ALIBI, FAP_DROPOUT, FAP_WINDOW
//   FAP_MIN_BLOCKS  0 or 1 (see the launch bounds below)       FAP_STAGES  1 or 2 (above)
//   FAP_INDEXED_KEYS  1: keys found through device-resident indices (a paged cache's block table, used key
//                  counts, a KV cache's entries and left padding: cache_keys.cuh); the arguments are then a
//                  DecodeParams. For prefill chunks over a cache, which the decode kernel serves 16 rows at a time.
#pragma once

#include "attention_fwd_common.cuh"
#include "cache_keys.cuh"
#include "tile_layouts.h"


namespace fap {

// FAP_MIN_BLOCKS = 1 lets ptxas use every register (dropout's Philox rounds need them); 0 leaves the
// default, which keeps two 8-warp CTAs per SM.
#if FAP_MIN_BLOCKS
#define FAP_FWD_LAUNCH_BOUNDS __launch_bounds__(FAP_WARPS * 32, FAP_MIN_BLOCKS)
#else
#define FAP_FWD_LAUNCH_BOUNDS __launch_bounds__(FAP_WARPS * 32)
#endif

// The contiguous keys of one (batch entry, kv head) and its sequence.
struct ContiguousKeys {
  ForwardSequence seq;
  const storage_t* k;
  const storage_t* v;
};

#if FAP_INDEXED_KEYS
typedef DecodeParams ForwardKernelParams;
typedef CacheSequence ForwardKeys;
#else
typedef AttentionFwdParams ForwardKernelParams;
typedef ContiguousKeys ForwardKeys;
#endif

// Where the S and O fragments of a warp take 176 registers or more (FlashAttention-2's tile shapes), the CTA's
// keys and sequence live in shared memory: in registers, ptxas spilled the key pointers and the sequence start
// that the loop keeps for its end; with fewer, registers (2-5 % faster at d = 128 and 256 on the H200).
#define FAP_KEYS_IN_SHARED (FAP_ROW_TILES * (FAP_HEAD_DIM + FAP_BLOCK_N) / 2 >= 176)

// What the CTA works on: its sequence and where its keys lie.
__device__ __forceinline__ ForwardKeys forward_keys(const ForwardKernelParams& p, int batch, int kv_head) {
#if FAP_INDEXED_KEYS
  return cache_sequence(p, batch, kv_head);
#else
  const ForwardSequence seq = sequence_info<long long>(p, batch);
  return {seq,
          static_cast<const storage_t*>(p.k) + batch * p.k_batch_stride + seq.k_start * p.k_row_stride + kv_head * p.k_head_stride,
          static_cast<const storage_t*>(p.v) + batch * p.v_batch_stride + seq.k_start * p.v_row_stride + kv_head * p.v_head_stride};
#endif
}

// The CTA's work: its row block (counted from the last: under a causal mask the last row blocks see the most keys,
// and the GPU starts CTAs in the order of their index, so the short ones fill the tail), batch entry, head and keys.
struct ForwardCta {
  ForwardKeys keys;
  int row_block, batch_entry, query_head;
  // Without a window these are the grid's own indices, which ptxas re-reads where it needs them rather than keeping
  // them in registers (at 255 registers that difference spilled).
  __device__ __forceinline__ int block() const { return FAP_WINDOW ? row_block : (int)(gridDim.x - 1 - blockIdx.x); }
  __device__ __forceinline__ int batch() const { return FAP_WINDOW ? batch_entry : (int)blockIdx.y; }
  __device__ __forceinline__ int head() const { return FAP_WINDOW ? query_head : (int)blockIdx.z; }
};
__device__ __forceinline__ ForwardCta forward_cta(const ForwardKernelParams& p) {
  const GridPlace place = forward_place_in_grid();
  return {forward_keys(p, place.batch, place.head / p.group_size), place.blocks - 1 - place.rank, place.batch,
          place.head};
}

#if FAP_INDEXED_KEYS
#if FAP_STAGES == 1
#error "keys found through indices load K and V rows together: two stages"
#endif
#else
// One tile of BLOCK_N contiguous K or V rows (rows: the sequence's first) from key0, zeros past the sequence's keys.
__device__ __forceinline__ void load_key_rows(storage_t* tile, const storage_t* rows, long long row_stride,
                                              const ForwardKernelParams& p, const ForwardKeys& keys, int key0) {
  load_tile<FAP_BLOCK_N>(tile, rows + key0 * row_stride, row_stride, keys.seq.len_k - key0, p.head_dim, p.vector_loads);
}
#endif

// Loads the K and V tiles of BLOCK_N keys from key0 (zeros past the sequence's keys): from contiguous rows, or
// with FAP_INDEXED_KEYS row by row through the cache's indices.
__device__ __forceinline__ void load_kv_tiles(storage_t* k_tile, storage_t* v_tile, const ForwardKernelParams& p,
                                              const ForwardKeys& keys, int batch, int key0) {
#if FAP_INDEXED_KEYS
  const int chunks_per_row = FAP_HEAD_DIM / 8;
  for (int chunk = threadIdx.x; chunk < FAP_BLOCK_N * chunks_per_row; chunk += FAP_WARPS * 32) {
    const int row = chunk / chunks_per_row, col = (chunk % chunks_per_row) * 8;
    const bool valid = key0 + row < keys.seq.len_k;
    const KeyRowOffsets rows =
        valid ? lookup_key_row_offsets(p, keys, batch, key0 + row) : KeyRowOffsets{keys.k_base, keys.v_base};
    copy_key_chunk(k_tile + row * FAP_STRIDE + col, v_tile + row * FAP_STRIDE + col, p, rows, col, valid);
  }
#else
  load_key_rows(k_tile, keys.k, p.k_row_stride, p, keys, key0);
  load_key_rows(v_tile, keys.v, p.v_row_stride, p, keys, key0);
#endif
}

#if FAP_STAGES == 1
// The single-buffered pipeline's second barrier: waits until this tile's V landed and every warp is done with its K,
// then starts the next K tile's copies (if there is a next tile) into the one K buffer.
__device__ __forceinline__ void start_next_key_tile(storage_t* k_tile, const ForwardKernelParams& p,
                                                    const ForwardKeys& keys, int tile, int end) {
  cp_async_wait_all();
  __syncthreads();
  if (tile + 1 < end) load_key_rows(k_tile, keys.k, p.k_row_stride, p, keys, (tile + 1) * FAP_BLOCK_N);
  cp_async_commit();
}

// Where that barrier goes: before the softmax, as in FlashAttention-2, so that no barrier separates the softmax from
// P V and ptxas interleaves the exponentials and the output's rescaling with P V's products (an H200 running the
// sm_80 tiles, bf16: d = 256 +8-14 %, d = 64 +0-8 %); after it for 64 < d <= 128, whose two row tiles per warp
// leave ptxas no registers for that overlap (there it measured 3-5 % slower at 4k-16k tokens; bench/RESULTS.md).
#define FAP_NEXT_KEYS_BEFORE_SOFTMAX (FAP_HEAD_DIM <= 64 || FAP_HEAD_DIM > 128)
#endif

extern "C" __global__ void FAP_FWD_LAUNCH_BOUNDS attention_fwd(const ForwardKernelParams p) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  constexpr ForwardSharedLayout kLayout{FAP_BLOCK_M, FAP_BLOCK_N, FAP_HEAD_DIM, FAP_STAGES, FAP_CTA_KEYS_BYTES};
  static_assert(padded_row(FAP_HEAD_DIM) == FAP_STRIDE, "tiles are laid out with the kernel's row stride");
  storage_t* q_tile = reinterpret_cast<storage_t*>(shared_bytes);
  storage_t* k_tiles = q_tile + kLayout.k_tiles();  // FAP_STAGES stages: key tile t in stage t % FAP_STAGES
  storage_t* v_tiles = q_tile + kLayout.v_tiles();
#if FAP_KEYS_IN_SHARED
  // The CTA's work, computed by one thread and read from shared memory where needed.
  ForwardCta& cta = *reinterpret_cast<ForwardCta*>(shared_bytes + kLayout.cta_keys_offset_bytes());
  static_assert(sizeof(ForwardCta) <= FAP_CTA_KEYS_BYTES, "the CTA's keys outgrow their shared-memory slot");
  if (threadIdx.x == 0) cta = forward_cta(p);
  __syncthreads();
  const ForwardKeys& keys = cta.keys;
#elif FAP_WINDOW
  const ForwardCta cta = forward_cta(p);
  const ForwardKeys& keys = cta.keys;
#else
  const ForwardCta cta{};  // without a window its place is the grid's own indices (ForwardCta's accessors)
  const ForwardKeys keys = forward_keys(p, cta.batch(), cta.head() / p.group_size);
#endif
  const ForwardSequence& seq = keys.seq;
  const int row_begin = cta.block() * FAP_BLOCK_M;
  if (row_begin >= seq.len_q) return;

  const storage_t* q = static_cast<const storage_t*>(p.q) + cta.batch() * p.q_batch_stride + (seq.q_start + row_begin) * p.q_row_stride + cta.head() * p.q_head_stride;
  const BlockRange tiles = BlockInfo<FAP_BLOCK_M, FAP_BLOCK_N>::key_blocks(p, seq, row_begin);

  load_tile<FAP_BLOCK_M>(q_tile, q, p.q_row_stride, seq.len_q - row_begin, p.head_dim, p.vector_loads);
#if FAP_STAGES == 1
  if (tiles.first < tiles.end) load_key_rows(k_tiles, keys.k, p.k_row_stride, p, keys, tiles.first * FAP_BLOCK_N);
#else
  if (tiles.first < tiles.end) {
    const int first_stage = tiles.first & 1;
    load_kv_tiles(k_tiles + first_stage * FAP_BLOCK_N * FAP_STRIDE, v_tiles + first_stage * FAP_BLOCK_N * FAP_STRIDE,
                  p, keys, cta.batch(), tiles.first * FAP_BLOCK_N);
  }
#endif
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4;
  // Row tile t of this warp covers block rows warp_row + 16 t .. + 15; this thread holds rows group and
  // group + 8 of each tile.
  const int warp_row = warp * 16 * FAP_ROW_TILES;
  int rows[FAP_ROW_TILES][2];
#pragma unroll
  for (int t = 0; t < FAP_ROW_TILES; ++t) {
    rows[t][0] = row_begin + warp_row + 16 * t + group;
    rows[t][1] = rows[t][0] + 8;
  }

  float acc[FAP_ROW_TILES][FAP_HEAD_DIM / 8][4];
  float row_max[FAP_ROW_TILES][2], row_sum[FAP_ROW_TILES][2];
#pragma unroll
  for (int t = 0; t < FAP_ROW_TILES; ++t) {
    zero_fragments(acc[t]);
    row_max[t][0] = row_max[t][1] = -FAP_INFINITY;
    row_sum[t][0] = row_sum[t][1] = 0.0f;
  }
  const float slope = FAP_ALIBI ? p.alibi[cta.batch() * p.alibi_batch_stride + cta.head()] : 0.0f;

  for (int tile = tiles.first; tile < tiles.end; ++tile) {
    const int key0 = tile * FAP_BLOCK_N;
#if FAP_STAGES == 1
    // The K tile landed and every warp is done with the last V tile: V's copies run under S and the softmax.
    cp_async_wait_all();
    __syncthreads();
    load_key_rows(v_tiles, keys.v, p.v_row_stride, p, keys, key0);
    cp_async_commit();
    const storage_t* k_tile = k_tiles;
    const storage_t* v_tile = v_tiles;
#else
    const int stage = tile & 1;
    cp_async_wait_all();
    __syncthreads();
    if (tile + 1 < tiles.end) {  // prefetch the next tile into the other stage
      load_kv_tiles(k_tiles + (stage ^ 1) * FAP_BLOCK_N * FAP_STRIDE, v_tiles + (stage ^ 1) * FAP_BLOCK_N * FAP_STRIDE,
                    p, keys, cta.batch(), key0 + FAP_BLOCK_N);
    }
    cp_async_commit();
    const storage_t* k_tile = k_tiles + stage * FAP_BLOCK_N * FAP_STRIDE;
    const storage_t* v_tile = v_tiles + stage * FAP_BLOCK_N * FAP_STRIDE;
#endif
    const int m = lane / 8, r = lane % 8;  // ldmatrix: this lane addresses row r of matrix m

    // S = Q K^T: BLOCK_N / 8 accumulator tiles of 16x8 per row tile.
    float s[FAP_ROW_TILES][FAP_BLOCK_N / 8][4];
#pragma unroll
    for (int t = 0; t < FAP_ROW_TILES; ++t) zero_fragments(s[t]);
    // Fragment addresses as generic pointers, not SharedFragments' one address plus immediate steps: with those,
    // ptxas ordered this loop's loads differently and the d = 128 forward ran 7-9 % slower on the H200.
    warp_mma_shared<FAP_HEAD_DIM / 16>(
        s,
        [&](unsigned int* a, int t, int kk) {
          ldmatrix_x4(a, q_tile + (warp_row + 16 * t + (m % 2) * 8 + r) * FAP_STRIDE + kk * 16 + (m / 2) * 8);
        },
        [&](unsigned int* b, int j, int kk) {
          ldmatrix_x4(b, k_tile + (j * 16 + (m / 2) * 8 + r) * FAP_STRIDE + kk * 16 + (m % 2) * 8);
        });

#if FAP_STAGES == 1 && FAP_NEXT_KEYS_BEFORE_SOFTMAX
    start_next_key_tile(k_tiles, p, keys, tile, tiles.end);
#endif
    const bool needs_mask = BlockInfo<FAP_BLOCK_M, FAP_BLOCK_N>::needs_mask(p, seq, row_begin, key0);
#pragma unroll
    for (int t = 0; t < FAP_ROW_TILES; ++t) {
      float correction[2];
      softmax_tile(s[t], p, seq, cta.batch(), cta.head(), rows[t], key0, needs_mask, slope, row_max[t], row_sum[t], correction);
      rescale_rows(acc[t], correction);
    }
    // P rounded to the A operands of P V (16 keys per k-step) at once: packed, it holds half the registers of the
    // fp32 scores while the next K tile's copies are issued.
    unsigned int p_operands[FAP_ROW_TILES][FAP_BLOCK_N / 16][4];
#pragma unroll
    for (int t = 0; t < FAP_ROW_TILES; ++t)
#pragma unroll
      for (int kk = 0; kk < FAP_BLOCK_N / 16; ++kk) pack_a_operand(p_operands[t][kk], s[t], kk);

#if FAP_STAGES == 1 && !FAP_NEXT_KEYS_BEFORE_SOFTMAX
    start_next_key_tile(k_tiles, p, keys, tile, tiles.end);
#endif
    // O += P V, V through ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < FAP_BLOCK_N / 16; ++kk) {
#pragma unroll
      for (int i = 0; i < FAP_HEAD_DIM / 16; ++i) {
        unsigned int b[4];
        ldmatrix_x4_trans(b, v_tile + (kk * 16 + (m % 2) * 8 + r) * FAP_STRIDE + i * 16 + (m / 2) * 8);
#pragma unroll
        for (int t = 0; t < FAP_ROW_TILES; ++t) {
          mma_16816(acc[t][2 * i], p_operands[t][kk], b[0], b[1]);
          mma_16816(acc[t][2 * i + 1], p_operands[t][kk], b[2], b[3]);
        }
      }
    }
  }
  cp_async_wait_all();

#pragma unroll
  for (int t = 0; t < FAP_ROW_TILES; ++t) store_rows(p, seq, cta.batch(), cta.head(), rows[t], acc[t], row_sum[t], row_max[t]);
}

}  // namespace fap
