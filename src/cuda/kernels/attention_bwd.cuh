// Attention backward for sm_80+ (FlashAttention-2's algorithm on tensor cores), the main kernel (the
// preprocess and conversion kernels around it are in attention_bwd_common.cuh):
//   attention_bwd             per (key block of BLOCK_N keys, batch, kv head): loops over the group's query
//                             heads and the query blocks that can see these keys; per block recomputes
//                             S^T = K Q^T and P^T from the forward's LSE, dP^T = V dO^T and
//                             dS^T = P^T (dP^T - D); accumulates dV += P^T dO and dK += dS^T Q in registers
//                             and adds dQ += dS K to the fp32 accumulator
// Keys are the MMA's M dimension, so dK and dV stay in registers. With FAP_DKV_SPLIT = 1 a warp owns 16 keys
// and every query of the step: P^T and dS^T feed dV and dK from the registers they were computed in (an
// accumulator fragment is the next product's A operand), and only dS^T goes through shared memory, for dQ.
// Above d = 128 dK and dV of 16 keys do not fit one warp's registers: FAP_DKV_SPLIT warps share 16 keys, each
// computes S^T and dP^T for a slice of the step's queries, they exchange P^T and dS^T through shared memory,
// and for dK and dV each keeps a slice of the head dim. With FAP_Q_STAGES = 2 the query tiles (Q, dO, LSE, D)
// are double-buffered: the next step's load runs under this step's math.
// dQ: fp32 atomics into one buffer shared by every CTA, a warp's work item being 16 query rows x up to 64
// columns (each dS^T fragment read from shared memory feeds several MMAs). In deterministic mode
// (p.deterministic) each CTA owns a slice of the buffer and its key blocks in a fixed order (blockIdx.x,
// + gridDim.x, ...), and an element of the slice is only ever added to by one thread (the dQ work items map to
// warps and lanes the same way at every step); a thread's atomics to one address take effect in program order,
// so every sum is taken in the same order, without the stall of a read-add-write.
//
// Compile-time configuration: FAP_HEAD_DIM, FAP_BLOCK_M (queries per step), FAP_BLOCK_N (keys per CTA),
// FAP_WARPS, FAP_DKV_SPLIT, FAP_Q_STAGES, FAP_BF16, FAP_SOFTCAP, FAP_ALIBI, FAP_DROPOUT, FAP_WINDOW.
#pragma once

#include "attention_bwd_common.cuh"


#define FAP_DS_STRIDE (FAP_BLOCK_M + 8)              // dS^T tile row stride (halves): conflict-free ldmatrix
#define FAP_DKV_COLS (FAP_HEAD_DIM / FAP_DKV_SPLIT)  // dK/dV columns per warp
#define FAP_PT_IN_REGISTERS (FAP_DKV_SPLIT == 1)      // P^T and dS^T feed dV and dK from registers

namespace fap {

// S^T / dP^T query columns per warp and pass: warps sharing keys take a slice of the step's queries in one pass;
// a warp with its own keys takes them all, 32 at a time (the registers hold dK and dV of 16 keys beside S^T and
// dP^T of 32 queries, not of 64), 16 with dropout above d = 64 (its Philox rounds need registers too).
constexpr int kRegisterPassColumns = FAP_DROPOUT && FAP_HEAD_DIM > 64 ? 16 : 32;
constexpr int kPassColumns = FAP_PT_IN_REGISTERS ? (FAP_BLOCK_M < kRegisterPassColumns ? FAP_BLOCK_M : kRegisterPassColumns)
                                                 : FAP_BLOCK_M / FAP_DKV_SPLIT;
constexpr int kPasses = FAP_PT_IN_REGISTERS ? FAP_BLOCK_M / kPassColumns : 1;
static_assert(kPassColumns % 16 == 0, "whole 16-query MMA tiles per warp and pass");

// dQ columns per work item: the widest multiple of 16 up to 64 that divides the head dim.
constexpr int kDqItemColumns = FAP_HEAD_DIM % 64 == 0 ? 64 : FAP_HEAD_DIM % 48 == 0 ? 48 : FAP_HEAD_DIM % 32 == 0 ? 32 : 16;

// Grid (deterministic ? splits : key blocks, batch, kv heads).
extern "C" __global__ void __launch_bounds__(FAP_WARPS * 32, 1) attention_bwd(const AttentionBwdParams p) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  storage_t* k_tile = reinterpret_cast<storage_t*>(shared_bytes);
  storage_t* v_tile = k_tile + FAP_BLOCK_N * FAP_STRIDE;
  storage_t* q_tiles = v_tile + FAP_BLOCK_N * FAP_STRIDE;                  // FAP_Q_STAGES stages
  storage_t* do_tiles = q_tiles + FAP_Q_STAGES * FAP_BLOCK_M * FAP_STRIDE;
  storage_t* ds_tile = do_tiles + FAP_Q_STAGES * FAP_BLOCK_M * FAP_STRIDE;  // dS^T, [key][query]
  storage_t* p_tile = ds_tile + FAP_BLOCK_N * FAP_DS_STRIDE;  // P^T after dropout, [key][query]: shared warps only
  float* lse_rows = reinterpret_cast<float*>(p_tile + (FAP_PT_IN_REGISTERS ? 0 : FAP_BLOCK_N * FAP_DS_STRIDE));
  float* dsum_rows = lse_rows + FAP_Q_STAGES * FAP_BLOCK_M;

  const int batch = blockIdx.y, kv_head = blockIdx.z;
  const SequenceRows s = sequence_rows(p, batch);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad = lane % 4;
  const int m = lane / 8, r = lane % 8;  // ldmatrix: this lane addresses row r of matrix m
  const int key_tile = warp / FAP_DKV_SPLIT, part = warp % FAP_DKV_SPLIT;
  const int dkv_col0 = part * FAP_DKV_COLS;
  for (int key_block = blockIdx.x; key_block * FAP_BLOCK_N < s.len_k; key_block += gridDim.x) {
    const int key0 = key_block * FAP_BLOCK_N;
    const BlockRange blocks = BlockInfo<FAP_BLOCK_M, FAP_BLOCK_N>::query_blocks(p, s, key0);
    const int first_block = blocks.first, query_blocks = blocks.end - blocks.first;
    const int steps = query_blocks * p.group_size;  // (query head of the group, query block) pairs

    // Issues the loads of step `step` into stage `stage`: Q and dO tiles by cp.async, LSE and D directly.
    auto load_step = [&](int step, int stage) {
      const int head = kv_head * p.group_size + step / query_blocks;
      const int q0 = (first_block + step % query_blocks) * FAP_BLOCK_M;
      load_tile<FAP_BLOCK_M>(q_tiles + stage * FAP_BLOCK_M * FAP_STRIDE,
                             static_cast<const storage_t*>(p.q) + batch * p.q_batch_stride +
                                 (s.q_start + q0) * p.q_row_stride + head * p.q_head_stride,
                             p.q_row_stride, s.len_q - q0, p.head_dim, p.vector_loads);
      load_tile<FAP_BLOCK_M>(do_tiles + stage * FAP_BLOCK_M * FAP_STRIDE,
                             static_cast<const storage_t*>(p.dout) + batch * p.dout_batch_stride +
                                 (s.q_start + q0) * p.dout_row_stride + head * p.dout_head_stride,
                             p.dout_row_stride, s.len_q - q0, p.head_dim, p.vector_loads);
      load_softmax_rows<FAP_BLOCK_M>(lse_rows + stage * FAP_BLOCK_M, dsum_rows + stage * FAP_BLOCK_M, p, s, head, q0);
    };

    __syncthreads();  // the previous key block's readers are done with every tile
    load_tile<FAP_BLOCK_N>(k_tile,
                           static_cast<const storage_t*>(p.k) + batch * p.k_batch_stride +
                               (s.k_start + key0) * p.k_row_stride + kv_head * p.k_head_stride,
                           p.k_row_stride, s.len_k - key0, p.head_dim, p.vector_loads);
    load_tile<FAP_BLOCK_N>(v_tile,
                           static_cast<const storage_t*>(p.v) + batch * p.v_batch_stride +
                               (s.k_start + key0) * p.v_row_stride + kv_head * p.v_head_stride,
                           p.v_row_stride, s.len_k - key0, p.head_dim, p.vector_loads);
    if (steps > 0) load_step(0, 0);
    cp_async_commit();

    float dk[FAP_DKV_COLS / 8][4], dv[FAP_DKV_COLS / 8][4];
    zero_fragments(dk);
    zero_fragments(dv);

    for (int step = 0; step < steps; ++step) {
      const int stage = FAP_Q_STAGES == 2 ? step & 1 : 0;
      const int head = kv_head * p.group_size + step / query_blocks;
      const int q0 = (first_block + step % query_blocks) * FAP_BLOCK_M;
      const storage_t* q_tile = q_tiles + stage * FAP_BLOCK_M * FAP_STRIDE;
      const storage_t* do_tile = do_tiles + stage * FAP_BLOCK_M * FAP_STRIDE;
      const float* lse_stage = lse_rows + stage * FAP_BLOCK_M;
      const float* dsum_stage = dsum_rows + stage * FAP_BLOCK_M;
      if (FAP_Q_STAGES == 1 && step > 0) {
        __syncthreads();  // the previous step is finished with the tiles
        load_step(step, 0);
        cp_async_commit();
      }
      cp_async_wait_all();
      __syncthreads();  // this stage's tiles are in; the previous step is finished with the other stage
      if (FAP_Q_STAGES == 2 && step + 1 < steps) load_step(step + 1, stage ^ 1);
      cp_async_commit();
      const float slope = FAP_ALIBI ? p.alibi[batch * p.alibi_batch_stride + head] : 0.0f;

      const bool needs_mask = BlockInfo<FAP_BLOCK_M, FAP_BLOCK_N>::needs_mask(p, s, q0, key0);

      // dV += P^T dO and dK += dS^T Q for 16 queries from row query_row of the step, over this warp's 16 keys and
      // columns.
      auto accumulate_key_gradients = [&](const unsigned int (&a_p)[4], const unsigned int (&a_ds)[4], int query_row) {
#pragma unroll
        for (int i = 0; i < FAP_DKV_COLS / 16; ++i) {
          unsigned int b[4];
          ldmatrix_x4_trans(b, do_tile + (query_row + (m % 2) * 8 + r) * FAP_STRIDE + dkv_col0 + i * 16 + (m / 2) * 8);
          mma_16816(dv[2 * i], a_p, b[0], b[1]);
          mma_16816(dv[2 * i + 1], a_p, b[2], b[3]);
          ldmatrix_x4_trans(b, q_tile + (query_row + (m % 2) * 8 + r) * FAP_STRIDE + dkv_col0 + i * 16 + (m / 2) * 8);
          mma_16816(dk[2 * i], a_ds, b[0], b[1]);
          mma_16816(dk[2 * i + 1], a_ds, b[2], b[3]);
        }
      };

#pragma unroll 1
      for (int pass = 0; pass < kPasses; ++pass) {
        const int query_col0 = (FAP_PT_IN_REGISTERS ? pass : part) * kPassColumns;

        // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys and the pass's queries.
        float st[kPassColumns / 8][4], dpt[kPassColumns / 8][4];
        zero_fragments(st);
        zero_fragments(dpt);
        // This lane's ldmatrix rows at column 0; each 16-column step moves them by 32 bytes.
        const unsigned int k_rows = shared_address(k_tile + (key_tile * 16 + (m % 2) * 8 + r) * FAP_STRIDE + (m / 2) * 8);
        const unsigned int v_rows = shared_address(v_tile + (key_tile * 16 + (m % 2) * 8 + r) * FAP_STRIDE + (m / 2) * 8);
        const unsigned int q_rows = shared_address(q_tile + (query_col0 + (m / 2) * 8 + r) * FAP_STRIDE + (m % 2) * 8);
        const unsigned int do_rows = shared_address(do_tile + (query_col0 + (m / 2) * 8 + r) * FAP_STRIDE + (m % 2) * 8);
#pragma unroll 2  // unrolled further, ptxas hoists the fragment loads of the whole head dim and spills
        for (int kk = 0; kk < FAP_HEAD_DIM / 16; ++kk) {
          unsigned int a_k[4], a_v[4];
          ldmatrix_x4(a_k, k_rows + kk * 32);
          ldmatrix_x4(a_v, v_rows + kk * 32);
#pragma unroll
          for (int j = 0; j < kPassColumns / 16; ++j) {
            unsigned int b[4];
            ldmatrix_x4(b, q_rows + j * 16 * FAP_STRIDE * 2 + kk * 32);
            mma_16816(st[2 * j], a_k, b[0], b[1]);
            mma_16816(st[2 * j + 1], a_k, b[2], b[3]);
            ldmatrix_x4(b, do_rows + j * 16 * FAP_STRIDE * 2 + kk * 32);
            mma_16816(dpt[2 * j], a_v, b[0], b[1]);
            mma_16816(dpt[2 * j + 1], a_v, b[2], b[3]);
          }
        }

        // P^T after dropout and dS^T (the derivative with respect to the scaled, capped score) in place of S^T and
        // dP^T; dS^T (and, for warps sharing keys, P^T) into shared memory.
#pragma unroll
        for (int j = 0; j < kPassColumns / 8; ++j)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int query_local = query_col0 + j * 8 + quad * 2 + c;
              const int key = key0 + key_tile * 16 + group + 8 * half;
              const int row = q0 + query_local;
              float cap_derivative;
              const float prob =
                  needs_mask ? backward_probability<true>(st[j][2 * half + c], p, s, slope, row, key,
                                                          lse_stage[query_local], &cap_derivative)
                             : backward_probability<false>(st[j][2 * half + c], p, s, slope, row, key,
                                                           lse_stage[query_local], &cap_derivative);
              float dp = dpt[j][2 * half + c];
#if FAP_DROPOUT
              const Philox4 words = dropout_words(p.dropout_seed, p.dropout_offset,
                                                  (unsigned int)(batch * p.heads_q + head), (unsigned int)row,
                                                  (unsigned int)key / 4);
              const float kept =
                  philox_word(words, (unsigned int)key % 4) >= p.dropout_threshold ? p.dropout_scale : 0.0f;
              dp *= kept;
              st[j][2 * half + c] = prob * kept;
#else
              st[j][2 * half + c] = prob;
#endif
              dpt[j][2 * half + c] = prob * (dp - dsum_stage[query_local]) * cap_derivative;
            }
            const int element = (key_tile * 16 + group + 8 * half) * FAP_DS_STRIDE + query_col0 + j * 8 + quad * 2;
            *reinterpret_cast<unsigned int*>(ds_tile + element) = pack2(dpt[j][2 * half], dpt[j][2 * half + 1]);
            if (!FAP_PT_IN_REGISTERS)
              *reinterpret_cast<unsigned int*>(p_tile + element) = pack2(st[j][2 * half], st[j][2 * half + 1]);
          }

#if FAP_PT_IN_REGISTERS
#pragma unroll
        for (int kk = 0; kk < kPassColumns / 16; ++kk) {
          unsigned int a_p[4], a_ds[4];
          pack_a_operand(a_p, st, kk);
          pack_a_operand(a_ds, dpt, kk);
          accumulate_key_gradients(a_p, a_ds, query_col0 + kk * 16);
        }
#endif
      }
      __syncthreads();  // dS^T (and P^T) are complete
#if !FAP_PT_IN_REGISTERS
#pragma unroll
      for (int kk = 0; kk < FAP_BLOCK_M / 16; ++kk) {
        unsigned int a_p[4], a_ds[4];
        ldmatrix_x4(a_p, p_tile + (key_tile * 16 + (m % 2) * 8 + r) * FAP_DS_STRIDE + kk * 16 + (m / 2) * 8);
        ldmatrix_x4(a_ds, ds_tile + (key_tile * 16 + (m % 2) * 8 + r) * FAP_DS_STRIDE + kk * 16 + (m / 2) * 8);
        accumulate_key_gradients(a_p, a_ds, kk * 16);
      }
#endif

      // dQ += dS K: work items of 16 query rows x kDqItemColumns spread over the warps (one at a time: unrolled,
      // their accumulators would compete with dK and dV for registers).
      constexpr int kColumnItems = FAP_HEAD_DIM / kDqItemColumns;
#pragma unroll 1
      for (int item = warp; item < (FAP_BLOCK_M / 16) * kColumnItems; item += FAP_WARPS) {
        const int t = item / kColumnItems, col0 = item % kColumnItems * kDqItemColumns;
        float acc[kDqItemColumns / 8][4];
        zero_fragments(acc);
#pragma unroll
        for (int kk = 0; kk < FAP_BLOCK_N / 16; ++kk) {
          unsigned int a[4];
          ldmatrix_x4_trans(a, ds_tile + (kk * 16 + (m / 2) * 8 + r) * FAP_DS_STRIDE + t * 16 + (m % 2) * 8);
#pragma unroll
          for (int i = 0; i < kDqItemColumns / 16; ++i) {
            unsigned int b[4];
            ldmatrix_x4_trans(b, k_tile + (kk * 16 + (m % 2) * 8 + r) * FAP_STRIDE + col0 + i * 16 + (m / 2) * 8);
            mma_16816(acc[2 * i], a, b[0], b[1]);
            mma_16816(acc[2 * i + 1], a, b[2], b[3]);
          }
        }
        // Rows past the sequence add zeros (their P is 0) into its padded rows, which the conversion skips.
        float* tile = p.dq_accum + (p.deterministic ? blockIdx.x * p.dq_accum_split_stride : 0) +
                      dq_accum_offset(p, s, batch, q0 + t * 16, head, col0);
#pragma unroll
        for (int n = 0; n < kDqItemColumns / 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) atomicAdd(tile + n * 128 + e * 32 + lane, acc[n][e]);
      }
    }
    cp_async_wait_all();  // a key block no query sees still has its tile loads in flight

    // dK and dV for this warp's keys and columns.
#pragma unroll
    for (int half = 0; half < 2; ++half)
      store_key_gradients(p, s, batch, kv_head, key0 + key_tile * 16 + group + 8 * half, half, dkv_col0, dk, dv);
  }
}

}  // namespace fap
