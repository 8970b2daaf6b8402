// The pieces both Hopper (sm_90a) backward main kernels share: attention_bwd_sm90.cuh (d <= 128, the
// warpgroups split the keys) and attention_bwd_sm90_wide.cuh (d = 256, they split the head dim). Loads into
// the 128-byte-swizzled tiles wgmma reads (hopper.cuh), the walk over a CTA's (query head, query block)
// steps, the softmax gradients and the staging of dQ for the bulk reductions.
#pragma once

#include "hopper.cuh"
#include "attention_bwd_common.cuh"
#include "tile_layouts.h"


namespace fap {

// Copies `count` rows x head_dim of a (row, dim) operand into a swizzled tile of ROWS x FAP_HEAD_DIM,
// zero-filling the rest; all threads of the CTA, each a fixed 16-byte column chunk of every few rows.
template <int ROWS>
__device__ __forceinline__ void load_swizzled_tile(unsigned char* tile, const storage_t* source, long long row_stride,
                                                   int count, int head_dim, int vector_loads) {
  if (copy_whole_tile<ROWS, FAP_WARPS * 32>(tile, source, row_stride, count, head_dim, vector_loads)) return;
  constexpr int kChunksPerRow = FAP_HEAD_DIM / 8, kRowsPerPass = FAP_WARPS * 32 / kChunksPerRow;
  const int col = threadIdx.x % kChunksPerRow * 8;
  const storage_t* from = source + threadIdx.x / kChunksPerRow * row_stride + col;
#pragma unroll 4
  for (int row = threadIdx.x / kChunksPerRow; row < ROWS; row += kRowsPerPass, from += kRowsPerPass * row_stride) {
    unsigned char* target = tile + swizzled_offset<ROWS>(row, col);
    if (vector_loads) {
      const bool inside = row < count && col < head_dim;
      cp_async_16_or_zero(target, inside ? from : source, inside);
    } else {
      store_chunk_of_elements(target, from, row < count ? head_dim - col : 0);
    }
  }
}

// Row `row` of the sequence, head `head` of a (batch, row, head, dim) operand.
__device__ __forceinline__ const storage_t* operand_row(const void* base, long long batch_stride, long long row_stride,
                                                        long long head_stride, int batch, int row, int head) {
  return static_cast<const storage_t*>(base) + batch * batch_stride + row * row_stride + head * head_stride;
}

// Starts the loads of the CTA's BLOCK_N keys: K and V tiles.
template <int BLOCK_N>
__device__ __forceinline__ void load_key_tiles(unsigned char* k_tile, unsigned char* v_tile, const AttentionBwdParams& p,
                                               const SequenceRows& s, int batch, int kv_head, int key0) {
  const int row = s.k_start + key0;
  load_swizzled_tile<BLOCK_N>(k_tile, operand_row(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, batch, row, kv_head),
                              p.k_row_stride, s.len_k - key0, p.head_dim, p.vector_loads);
  load_swizzled_tile<BLOCK_N>(v_tile, operand_row(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, batch, row, kv_head),
                              p.v_row_stride, s.len_k - key0, p.head_dim, p.vector_loads);
}

// Starts the loads of a step's BLOCK_M queries from q0 of one head: Q and dO tiles, LSE and D.
template <int BLOCK_M>
__device__ __forceinline__ void load_query_step(unsigned char* q_tile, unsigned char* do_tile, float* lse_rows,
                                                float* dsum_rows, const AttentionBwdParams& p, const SequenceRows& s,
                                                int batch, int head, int q0) {
  const int row = s.q_start + q0;
  load_swizzled_tile<BLOCK_M>(q_tile, operand_row(p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, batch, row, head),
                              p.q_row_stride, s.len_q - q0, p.head_dim, p.vector_loads);
  load_swizzled_tile<BLOCK_M>(do_tile,
                              operand_row(p.dout, p.dout_batch_stride, p.dout_row_stride, p.dout_head_stride, batch, row, head),
                              p.dout_row_stride, s.len_q - q0, p.head_dim, p.vector_loads);
  load_softmax_rows<BLOCK_M>(lse_rows, dsum_rows, p, s, head, q0);
}

// The kernels' shared memory (HopperBackwardSharedLayout), from its first 1024-byte boundary.
struct BackwardTiles {
  unsigned char* k;
  unsigned char* v;
  unsigned char* q_stages;
  unsigned char* do_stages;
  unsigned char* score_tiles;
  float* dq_staging;
  float* lse_rows;   // 2 stages, base 2
  float* dsum_rows;  // 2 stages
  float* stage_ring;
};
__device__ __forceinline__ BackwardTiles backward_tiles(const HopperBackwardSharedLayout& layout) {
  extern __shared__ __align__(1024) unsigned char shared_raw[];
  unsigned char* base = swizzle_aligned(shared_raw);
  return {base + layout.k_tile(),
          base + layout.v_tile(),
          base + layout.q_tiles(),
          base + layout.do_tiles(),
          base + layout.score_tiles_offset(),
          reinterpret_cast<float*>(base + layout.dq_staging()),
          reinterpret_cast<float*>(base + layout.lse_rows()),
          reinterpret_cast<float*>(base + layout.dsum_rows()),
          reinterpret_cast<float*>(base + layout.stage_ring())};
}

// A CTA's place in the grid and its thread's roles. The grid is place_in_grid's, over key blocks or in the
// deterministic mode either over slices (the rank), each CTA adding into an accumulator slice of its own one
// key block after the other (a fixed order of the additions), or, where the kernel orders its additions
// (ORDERED: DqOrder), (kv heads, batch, key blocks): CTAs start in the order of their linear index, so there
// the key block that waits for the one before it starts one kv head x batch round later, not next to it. The
// CTA takes the key blocks from first_key_block, every key_block_stride-th (the grid's extent on that axis).
struct BackwardCta {
  int batch, kv_head, first_key_block, key_block_stride;
  SequenceRows s;
  int warpgroup;    // broadcast from lane 0, so that the compiler knows it is uniform in each warp
  bool reduces_dq;  // the thread of each warpgroup that issues its dQ reductions
  float* dq_slice;  // where this CTA adds its dQ
};
template <bool ORDERED>
__device__ __forceinline__ BackwardCta backward_cta(const AttentionBwdParams& p) {
  const bool ordered = ORDERED && p.dq_order != nullptr;
  const GridPlace place = place_in_grid();
  const int batch = ordered ? (int)blockIdx.y : place.batch;
  return {batch,
          ordered ? (int)blockIdx.x : place.head,
          ordered ? (int)blockIdx.z : place.rank,
          ordered ? (int)gridDim.z : place.blocks,
          sequence_rows(p, batch),
          __shfl_sync(0xffffffffu, (int)threadIdx.x / 128, 0),
          threadIdx.x % 128 == 0,
          p.dq_accum + (p.deterministic && !ordered ? place.rank * p.dq_accum_split_stride : 0)};
}

// A CTA's steps: the query blocks of [first_q0, end_q0) of one query head in order, then the next head of
// the group (counted along, not divided out: integer division is a long instruction sequence).
struct QueryStep {
  int head, q0;
};
template <int BLOCK_M>
__device__ __forceinline__ QueryStep following_step(QueryStep at, int first_q0, int end_q0) {
  at.q0 += BLOCK_M;
  if (at.q0 == end_q0) at.q0 = first_q0, ++at.head;
  return at;
}

// The double-buffered tiles of a step: Q and dO (swizzled, tile_bytes each), LSE and D rows.
template <int BLOCK_M>
struct QueryStages {
  unsigned char* q_tiles;
  unsigned char* do_tiles;
  float* lse_rows;
  float* dsum_rows;
  int tile_bytes;

  // Starts the loads of a step into `stage`.
  __device__ __forceinline__ void load(const AttentionBwdParams& p, const SequenceRows& s, int batch, QueryStep at,
                                       int stage) const {
    load_query_step<BLOCK_M>(q_tiles + stage * tile_bytes, do_tiles + stage * tile_bytes, lse_rows + stage * BLOCK_M,
                             dsum_rows + stage * BLOCK_M, p, s, batch, at.head, at.q0);
  }
};

// The Q/dO stage ring's hand-offs. Uses are counted over the CTA's whole life (every thread counts alike): use u
// reads stage u % 2, filled by fill u, which may start once use u - 2 released the stage. FULL_MBARRIER: a fill
// lands for every thread once every thread's copies landed (an mbarrier), else at a CTA barrier that opens the
// use. EMPTY_MBARRIER: a fill waits until all warps released the stage's use before (an mbarrier), else the
// kernel orders it after that use by its own CTA barriers.
template <bool FULL_MBARRIER, bool EMPTY_MBARRIER>
struct StageRing {
  unsigned int barriers;  // full[2] then empty[2], 8 bytes each
  unsigned int uses = 0;

  // The ring whose barriers are the 32 bytes at `where` in shared memory, by every thread of the CTA (thread 0
  // initialises the barriers).
  static __device__ __forceinline__ StageRing at(const void* where) {
    const StageRing ring = {shared_address(where)};
    if (threadIdx.x == 0) {
      for (int stage = 0; stage < 2; ++stage) {
        mbarrier_init(ring.barriers + 8 * stage, FAP_WARPS * 32);  // full: every thread's copies landed
        mbarrier_init(ring.barriers + 16 + 8 * stage, FAP_WARPS);  // empty: every warp is done with it
      }
      mbarrier_init_fence();
    }
    __syncthreads();
    return ring;
  }

  // Fill `index`: waits for its stage to be free, issues the loads and (full mbarrier) arrives when they land.
  template <int BLOCK_M>
  __device__ __forceinline__ void fill(const QueryStages<BLOCK_M>& stages, const AttentionBwdParams& p,
                                       const SequenceRows& s, int batch, QueryStep at, unsigned int index) const {
    const unsigned int full = barriers + 8 * (index % 2), empty = full + 16;
    // A fresh barrier is in phase 0: waiting for parity 1 returns at once.
    if constexpr (EMPTY_MBARRIER) mbarrier_wait(empty, ((index / 2) & 1) ^ 1u);
    stages.load(p, s, batch, at, index % 2);
    if constexpr (!FULL_MBARRIER) {
      cp_async_commit();
    } else if (p.vector_loads) {
      mbarrier_arrive_after_copies(full);
    } else {  // tiles copied element by element: a plain arrival releases them (and the landed LSE, D copies)
      cp_async_commit();
      cp_async_wait_all();
      mbarrier_arrive(full);
    }
  }
  // Waits for the stage of the next use to be filled; returns it.
  __device__ __forceinline__ int acquire() const {
    if constexpr (FULL_MBARRIER) {
      mbarrier_wait(barriers + 8 * (uses % 2), (uses / 2) & 1);
    } else {
      cp_async_wait_all();
      __syncthreads();
    }
    fence_proxy_async();  // the copies, made through the generic proxy, are read next by wgmma
    return uses % 2;
  }
  // This warp is done with the stage (its warpgroup's products that read it completed).
  __device__ __forceinline__ void release() {
    if constexpr (EMPTY_MBARRIER) {
      __syncwarp();
      if (threadIdx.x % 32 == 0) mbarrier_arrive(barriers + 16 + 8 * (uses % 2));
    }
    ++uses;
  }
};

// A key block's steps: `count` (query head of the group, query block) pairs, the blocks from first_q0 to
// end_q0 of each head.
struct KeyBlockSteps {
  int count, first_q0, end_q0;
};

template <int BLOCK_M, int BLOCK_N>
__device__ __forceinline__ KeyBlockSteps key_block_steps(const AttentionBwdParams& p, const SequenceRows& s,
                                                         int kv_head, int key0) {
  const BlockRange blocks = BlockInfo<BLOCK_M, BLOCK_N>::query_blocks(p, s, key0);
  return {(blocks.end - blocks.first) * p.group_size, blocks.first * BLOCK_M, blocks.end * BLOCK_M};
}

// Starts a key block's loads: its K and V tiles, then its first step's into the ring (that fill's arrival covers
// the key tiles' copies too).
template <int BLOCK_M, int BLOCK_N, typename Ring>
__device__ __forceinline__ void load_key_block(unsigned char* k_tile, unsigned char* v_tile,
                                               const QueryStages<BLOCK_M>& stages, const Ring& ring,
                                               const AttentionBwdParams& p, const SequenceRows& s, int batch,
                                               int kv_head, int key0, const KeyBlockSteps& steps, QueryStep first) {
  load_key_tiles<BLOCK_N>(k_tile, v_tile, p, s, batch, kv_head, key0);
  if (steps.count > 0) ring.fill(stages, p, s, batch, first, ring.uses);
}

// The d = 256 kernel's deterministic mode: its dQ additions into the one fp32 accumulator in a fixed order. For
// every (query head, block of 64 rows) a counter in the workspace of the additions to it that completed, two per
// CTA (one per warpgroup), which the preprocess starts at twice the first key block that sees the rows. The CTA
// of key block n adds once the counter reached 2 n (all key blocks before it that see the rows added), and
// counts its own once it completed, which its reducing thread checks a step later (after the next addition is
// issued), so that no warp waits for a reduction's round trip. The CTAs are started in key-block order
// (backward_cta): the one waited for is running or done. A wait longer than about a second, which that order
// rules out, ends anyway: the sum stays right, only its order is no longer fixed; a kernel never hangs. Nothing
// is kept across steps (the step counted is found again from the current one). Against accumulator slices
// (which the d <= 128 kernel keeps) the additions land on lines other CTAs just added to, in L2, instead of
// missing: on an H200 the deterministic d = 256 backward went from 0.52-0.67x to 0.63-0.82x the default mode's
// speed; at d <= 128 the reducing thread's poll, once a step, held its warpgroup back more than that gained
// (bench/RESULTS.md).
template <int BLOCK_M, int BLOCK_N>
struct DqOrder {
  // Before the reducing thread adds to step `at`'s query block from key block key0.
  static __device__ __forceinline__ void wait_turn(const AttentionBwdParams& p, const SequenceRows& s, QueryStep at,
                                                  int key0) {
    const int* made = dq_order_counter(p, s, at.head, at.q0);
    for (int polls = 0; load_acquire(made) < 2 * (key0 / BLOCK_N) && polls < (1 << 22); ++polls) __nanosleep(256);
    fence_proxy_async_global();  // the additions waited for come before this thread's (async proxy)
  }
  // Counts the addition of the step before `at` once at most PENDING of the thread's later ones are incomplete.
  template <int PENDING>
  static __device__ __forceinline__ void count_before(const AttentionBwdParams& p, const SequenceRows& s, QueryStep at,
                                                     const KeyBlockSteps& steps) {
    const QueryStep before = at.q0 == steps.first_q0 ? QueryStep{at.head - 1, steps.end_q0 - BLOCK_M}
                                                     : QueryStep{at.head, at.q0 - BLOCK_M};
    bulk_wait<PENDING>();
    fence_proxy_async_global();
    add_release(dq_order_counter(p, s, before.head, before.q0), 1);
  }
};

// Ends a key block's steps: its loads landed (a key block no query sees still has them in flight) and, for
// the threads that issued them, its dQ reductions complete, so that the staging buffers may be reused.
__device__ __forceinline__ void finish_key_block(bool reduces_dq) {
  cp_async_wait_all();
  if (reduces_dq) bulk_wait<0>();
}

// S^T -> P^T and dP^T -> dS^T = P^T (dP^T - D) (times the softcap's derivative) in place, for a
// warpgroup's 64 keys x 8 QUERIES8 queries from query_offset in the step's block; MASKED tiles cross a mask
// boundary (separate code, so that the others pay nothing for it).
template <bool MASKED, int QUERIES8>
__device__ __forceinline__ void softmax_gradients(float (&st)[QUERIES8][4], float (&dpt)[QUERIES8][4],
                                                  const AttentionBwdParams& p, const SequenceRows& s, float slope,
                                                  int q0, int query_offset, int key0, const int (&key_local)[2],
                                                  const float* lse, const float* dsum) {
  const int quad = threadIdx.x % 4;
#pragma unroll
  for (int j = 0; j < QUERIES8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int query_local = query_offset + j * 8 + quad * 2 + e % 2;
      float cap_derivative;
      const float prob = backward_probability<MASKED>(st[j][e], p, s, slope, q0 + query_local, key0 + key_local[e / 2],
                                                      lse[query_local], &cap_derivative);
      st[j][e] = prob;
      dpt[j][e] = prob * (dpt[j][e] - dsum[query_local]) * cap_derivative;
    }
}

// COLUMNS8 x 8 columns of a warpgroup's m64 accumulator fragment (from acc[0]) into shared memory in register
// order (dq_accum_offset's tile layout): float4 i of thread t at 16 (128 i + t) bytes, without bank
// conflicts.
template <int COLUMNS8>
__device__ __forceinline__ void stage_fragment(float* staging, const float (*acc)[4]) {
  float4* target = reinterpret_cast<float4*>(staging) + threadIdx.x % 128;
#pragma unroll
  for (int i = 0; i < COLUMNS8; ++i) target[i * 128] = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
}

}  // namespace fap
