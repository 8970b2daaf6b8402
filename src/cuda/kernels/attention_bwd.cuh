// Attention backward for sm_80+ (FlashAttention-2's algorithm on tensor cores), the main kernel (the
// preprocess and conversion kernels around it are in attention_bwd_common.cuh):
//   attention_bwd             per (key block of BLOCK_N keys, batch, kv head): loops over the group's query
//                             heads and the query blocks that can see these keys; per block recomputes
//                             S^T = K Q^T and P^T from the forward's LSE, dP^T = V dO^T and
//                             dS^T = P^T (dP^T - D); accumulates dV += P^T dO and dK += dS^T Q in registers
//                             and adds dQ += dS K to the fp32 accumulator
// Keys are the MMA's M dimension, so dK and dV stay in registers. FAP_DKV_SPLIT warps share 16 keys: for
// S^T and dP^T each takes a slice of the step's queries, they exchange P^T and dS^T through shared memory,
// and for dK and dV each keeps a slice of the head dim. With FAP_Q_STAGES = 2 the query tiles (Q, dO, LSE,
// D) are double-buffered: the next step's load runs under this step's math.
// dQ: fp32 atomics into one buffer shared by every CTA. In deterministic mode (p.deterministic) each CTA
// owns a slice of the buffer and its key blocks in a fixed order (blockIdx.x, + gridDim.x, ...), and an
// element of the slice is only ever added to by one thread (the dQ work items map to warps and lanes the
// same way at every step); a thread's atomics to one address take effect in program order, so every sum
// is taken in the same order, without the stall of a read-add-write.
//
// Compile-time configuration: FAP_HEAD_DIM, FAP_BLOCK_M (queries per step), FAP_BLOCK_N (keys per CTA),
// FAP_WARPS, FAP_DKV_SPLIT, FAP_Q_STAGES, FAP_BF16, FAP_SOFTCAP, FAP_ALIBI, FAP_DROPOUT, FAP_WINDOW.
#pragma once

#include "attention_bwd_common.cuh"


#define FAP_DS_STRIDE (FAP_BLOCK_M + 8)              // dS^T tile row stride (halves): conflict-free ldmatrix
#define FAP_DKV_COLS (FAP_HEAD_DIM / FAP_DKV_SPLIT)  // dK/dV columns per warp
#define FAP_Q_COLS (FAP_BLOCK_M / FAP_DKV_SPLIT)      // S^T / dP^T query columns per warp

namespace fap {

// Grid (deterministic ? splits : key blocks, batch, kv heads).
extern "C" __global__ void __launch_bounds__(FAP_WARPS * 32, 1) attention_bwd(const AttentionBwdParams p) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  storage_t* k_tile = reinterpret_cast<storage_t*>(shared_bytes);
  storage_t* v_tile = k_tile + FAP_BLOCK_N * FAP_STRIDE;
  storage_t* q_tiles = v_tile + FAP_BLOCK_N * FAP_STRIDE;                  // FAP_Q_STAGES stages
  storage_t* do_tiles = q_tiles + FAP_Q_STAGES * FAP_BLOCK_M * FAP_STRIDE;
  storage_t* p_tile = do_tiles + FAP_Q_STAGES * FAP_BLOCK_M * FAP_STRIDE;   // P^T after dropout, [key][query]
  storage_t* ds_tile = p_tile + FAP_BLOCK_N * FAP_DS_STRIDE;     // dS^T, [key][query]
  float* lse_rows = reinterpret_cast<float*>(ds_tile + FAP_BLOCK_N * FAP_DS_STRIDE);  // per stage, log2 units
  float* dsum_rows = lse_rows + FAP_Q_STAGES * FAP_BLOCK_M;

  const int batch = blockIdx.y, kv_head = blockIdx.z;
  const SequenceRows s = sequence_rows(p, batch);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad = lane % 4;
  const int m = lane / 8, r = lane % 8;  // ldmatrix: this lane addresses row r of matrix m
  const int key_tile = warp / FAP_DKV_SPLIT, part = warp % FAP_DKV_SPLIT;
  const int dkv_col0 = part * FAP_DKV_COLS, query_col0 = part * FAP_Q_COLS;
  const int key_blocks = (s.len_k + FAP_BLOCK_N - 1) / FAP_BLOCK_N;

  for (int key_block = blockIdx.x; key_block < key_blocks; key_block += gridDim.x) {
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
#pragma unroll
    for (int i = 0; i < FAP_DKV_COLS / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.0f;

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

      // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys and its slice of the queries.
      float st[FAP_Q_COLS / 8][4], dpt[FAP_Q_COLS / 8][4];
#pragma unroll
      for (int j = 0; j < FAP_Q_COLS / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) st[j][e] = dpt[j][e] = 0.0f;
#pragma unroll 8  // fully unrolled up to d = 128; beyond, the unrolled addresses would crowd the registers
      for (int kk = 0; kk < FAP_HEAD_DIM / 16; ++kk) {
        unsigned int a_k[4], a_v[4];
        ldmatrix_x4(a_k, k_tile + (key_tile * 16 + (m % 2) * 8 + r) * FAP_STRIDE + kk * 16 + (m / 2) * 8);
        ldmatrix_x4(a_v, v_tile + (key_tile * 16 + (m % 2) * 8 + r) * FAP_STRIDE + kk * 16 + (m / 2) * 8);
#pragma unroll
        for (int j = 0; j < FAP_Q_COLS / 16; ++j) {
          unsigned int b[4];
          ldmatrix_x4(b, q_tile + (query_col0 + j * 16 + (m / 2) * 8 + r) * FAP_STRIDE + kk * 16 + (m % 2) * 8);
          mma_16816(st[2 * j], a_k, b[0], b[1]);
          mma_16816(st[2 * j + 1], a_k, b[2], b[3]);
          ldmatrix_x4(b, do_tile + (query_col0 + j * 16 + (m / 2) * 8 + r) * FAP_STRIDE + kk * 16 + (m % 2) * 8);
          mma_16816(dpt[2 * j], a_v, b[0], b[1]);
          mma_16816(dpt[2 * j + 1], a_v, b[2], b[3]);
        }
      }

      // P^T after dropout and dS^T (the derivative with respect to the scaled, capped score) into shared memory.
      const bool needs_mask = BlockInfo<FAP_BLOCK_M, FAP_BLOCK_N>::needs_mask(p, s, q0, key0);
#pragma unroll
      for (int j = 0; j < FAP_Q_COLS / 8; ++j)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float prob_out[2], ds_out[2];
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int query_local = query_col0 + j * 8 + quad * 2 + c;
            const int key = key0 + key_tile * 16 + group + 8 * half;
            const int row = q0 + query_local, diagonal = row + s.offset;
            float cap_derivative;
            float prob =
                exp2f(backward_score_log2(st[j][2 * half + c], p, slope, diagonal, key, &cap_derivative) -
                      lse_stage[query_local]);
            if (needs_mask && !key_allowed(p, s, diagonal, key)) prob = 0.0f;
            float dp = dpt[j][2 * half + c];
#if FAP_DROPOUT
            const Philox4 words = dropout_words(p.dropout_seed, p.dropout_offset,
                                                (unsigned int)(batch * p.heads_q + head), (unsigned int)row,
                                                (unsigned int)key / 4);
            const float kept = philox_word(words, (unsigned int)key % 4) >= p.dropout_threshold ? p.dropout_scale : 0.0f;
            dp *= kept;
            prob_out[c] = prob * kept;
#else
            prob_out[c] = prob;
#endif
            ds_out[c] = prob * (dp - dsum_stage[query_local]) * cap_derivative;
          }
          const int element = (key_tile * 16 + group + 8 * half) * FAP_DS_STRIDE + query_col0 + j * 8 + quad * 2;
          *reinterpret_cast<unsigned int*>(p_tile + element) = pack2(prob_out[0], prob_out[1]);
          *reinterpret_cast<unsigned int*>(ds_tile + element) = pack2(ds_out[0], ds_out[1]);
        }
      __syncthreads();  // P^T and dS^T are complete

      // dV += P^T dO and dK += dS^T Q over this warp's 16 keys and columns; every query of the step.
#pragma unroll
      for (int kk = 0; kk < FAP_BLOCK_M / 16; ++kk) {
        unsigned int a_p[4], a_ds[4];
        ldmatrix_x4(a_p, p_tile + (key_tile * 16 + (m % 2) * 8 + r) * FAP_DS_STRIDE + kk * 16 + (m / 2) * 8);
        ldmatrix_x4(a_ds, ds_tile + (key_tile * 16 + (m % 2) * 8 + r) * FAP_DS_STRIDE + kk * 16 + (m / 2) * 8);
#pragma unroll
        for (int i = 0; i < FAP_DKV_COLS / 16; ++i) {
          unsigned int b[4];
          ldmatrix_x4_trans(b, do_tile + (kk * 16 + (m % 2) * 8 + r) * FAP_STRIDE + dkv_col0 + i * 16 + (m / 2) * 8);
          mma_16816(dv[2 * i], a_p, b[0], b[1]);
          mma_16816(dv[2 * i + 1], a_p, b[2], b[3]);
          ldmatrix_x4_trans(b, q_tile + (kk * 16 + (m % 2) * 8 + r) * FAP_STRIDE + dkv_col0 + i * 16 + (m / 2) * 8);
          mma_16816(dk[2 * i], a_ds, b[0], b[1]);
          mma_16816(dk[2 * i + 1], a_ds, b[2], b[3]);
        }
      }

      // dQ += dS K: work items (16 query rows, 16 head-dim columns) spread over the warps (one at a time:
      // unrolled, their accumulators would compete with dK and dV for registers).
#pragma unroll 1
      for (int item = warp; item < (FAP_BLOCK_M / 16) * (FAP_HEAD_DIM / 16); item += FAP_WARPS) {
        const int t = item / (FAP_HEAD_DIM / 16), i = item % (FAP_HEAD_DIM / 16);
        float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
        for (int kk = 0; kk < FAP_BLOCK_N / 16; ++kk) {
          unsigned int a[4], b[4];
          ldmatrix_x4_trans(a, ds_tile + (kk * 16 + (m / 2) * 8 + r) * FAP_DS_STRIDE + t * 16 + (m % 2) * 8);
          ldmatrix_x4_trans(b, k_tile + (kk * 16 + (m % 2) * 8 + r) * FAP_STRIDE + i * 16 + (m / 2) * 8);
          mma_16816(acc[0], a, b[0], b[1]);
          mma_16816(acc[1], a, b[2], b[3]);
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int query_local = t * 16 + group + 8 * half;
          if (q0 + query_local >= s.len_q) continue;
          float* target = p.dq_accum + (p.deterministic ? blockIdx.x * p.dq_accum_split_stride : 0) +
                          dq_accum_offset(p, s, batch, q0 + query_local, head, i * 16 + quad * 2);
#pragma unroll
          for (int n = 0; n < 2; ++n) {
            atomicAdd(target + n * 8, acc[n][2 * half]);
            atomicAdd(target + n * 8 + 1, acc[n][2 * half + 1]);
          }
        }
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
