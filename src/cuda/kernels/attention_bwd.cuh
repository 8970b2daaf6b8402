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
// Otherwise FAP_DKV_SPLIT warps share FAP_KEY_TILE keys (16 or 32: above d = 128 dK and dV of 16 keys do not
// fit one warp's registers, and with 32 every Q/dO and dO/Q fragment read from shared memory feeds two 16-key
// MMA tiles), each computes S^T and dP^T for a slice of the step's queries, they exchange P^T and dS^T through
// shared memory, and for dK and dV each keeps a slice of the head dim. The query tiles, Q with LSE
// (FAP_Q_STAGES) and dO with D (FAP_DO_STAGES), are double- or single-buffered: double-buffered, the next step's
// load runs under this step's math; single-buffered, it starts once dV and dK have read them and runs under dQ's.
// dQ: fp32 atomics into one buffer shared by every CTA, a warp's work item being 16 (with 32-key tiles 32) query
// rows x up to 64 columns (each dS^T fragment read from shared memory feeds several MMAs). In deterministic mode
// (p.deterministic) each CTA owns a slice of the buffer and its key blocks in a fixed order (its slice, + slices,
// ...), and an element of the slice is only ever added to by one thread (the dQ work items map to
// warps and lanes the same way at every step); a thread's atomics to one address take effect in program order,
// so every sum is taken in the same order, without the stall of a read-add-write.
//
// Compile-time configuration: FAP_HEAD_DIM, FAP_BLOCK_M (queries per step), FAP_BLOCK_N (keys per CTA),
// FAP_WARPS, FAP_DKV_SPLIT, FAP_KEY_TILE, FAP_Q_STAGES, FAP_DO_STAGES, FAP_BF16, FAP_SOFTCAP, FAP_ALIBI,
// FAP_DROPOUT, FAP_WINDOW.
#pragma once

#include "attention_bwd_common.cuh"
#include "tile_layouts.h"


#define FAP_DS_STRIDE (FAP_BLOCK_M + 8)              // dS^T tile row stride (halves): conflict-free ldmatrix
#define FAP_DKV_COLS (FAP_HEAD_DIM / FAP_DKV_SPLIT)  // dK/dV columns per warp
#define FAP_PT_IN_REGISTERS (FAP_DKV_SPLIT == 1)      // P^T and dS^T feed dV and dK from registers

namespace fap {

// 16-key MMA tiles per group of warps sharing keys (FAP_KEY_TILE / 16): with two, every Q/dO fragment a warp
// reads from shared memory for S^T and dP^T, and every dO/Q fragment for dV and dK, feeds twice the MMAs.
constexpr int kKeyFragments = FAP_KEY_TILE / 16;
static_assert(FAP_KEY_TILE % 16 == 0 && (kKeyFragments == 1 || !FAP_PT_IN_REGISTERS),
              "32-key tiles only where warps share keys (P^T and dS^T through shared memory)");

// S^T / dP^T query columns per warp and pass: warps sharing keys take a slice of the step's queries; a warp with
// its own keys takes them all; either 32 at a time (the registers hold dK and dV beside S^T and dP^T of 32
// queries, not of 64), 16 with dropout above d = 64 (its Philox rounds need registers too).
constexpr int kWarpColumns = FAP_BLOCK_M / FAP_DKV_SPLIT;
constexpr int kMaxPassColumns = FAP_DROPOUT && FAP_HEAD_DIM > 64 ? 16 : 32;
constexpr int kPassColumns = kWarpColumns < kMaxPassColumns ? kWarpColumns : kMaxPassColumns;
constexpr int kPasses = kWarpColumns / kPassColumns;
static_assert(kPassColumns % 16 == 0, "whole 16-query MMA tiles per warp and pass");

// dQ work items: kDqItemRows rows (32 with 32-key tiles, each dS^T fragment then feeding two rows of MMAs and each
// K fragment two) x kDqItemColumns, the widest multiple of 16 up to 64 / (rows / 16) that divides the head dim.
constexpr int kDqRowTiles = kKeyFragments == 2 && FAP_BLOCK_M % 32 == 0 ? 2 : 1;
constexpr int kDqItemRows = 16 * kDqRowTiles;
constexpr int kDqMaxColumns = 64 / kDqRowTiles;
constexpr int kDqItemColumns = FAP_HEAD_DIM % 64 == 0 && kDqMaxColumns >= 64   ? 64
                               : FAP_HEAD_DIM % 48 == 0 && kDqMaxColumns >= 48 ? 48
                               : FAP_HEAD_DIM % 32 == 0                        ? 32
                                                                               : 16;

// Grid: place_in_grid's over key blocks (deterministic: slices), batch and kv heads.
extern "C" __global__ void __launch_bounds__(FAP_WARPS * 32, 1) attention_bwd(const AttentionBwdParams p) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  constexpr BackwardSharedLayout kLayout{FAP_BLOCK_M, FAP_BLOCK_N, FAP_HEAD_DIM, FAP_Q_STAGES, FAP_DO_STAGES,
                                         FAP_PT_IN_REGISTERS};
  static_assert(padded_row(FAP_HEAD_DIM) == FAP_STRIDE && padded_row(FAP_BLOCK_M) == FAP_DS_STRIDE,
                "tiles are laid out with the kernel's row strides");
  storage_t* k_tile = reinterpret_cast<storage_t*>(shared_bytes);
  storage_t* v_tile = k_tile + kLayout.v_tile();
  storage_t* q_tiles = k_tile + kLayout.q_tiles();    // FAP_Q_STAGES stages
  storage_t* do_tiles = k_tile + kLayout.do_tiles();  // FAP_DO_STAGES stages
  storage_t* ds_tile = k_tile + kLayout.ds_tile();    // dS^T, [key][query]
  storage_t* p_tile = k_tile + kLayout.p_tile();      // P^T after dropout, [key][query]: shared warps only
  float* lse_rows = reinterpret_cast<float*>(shared_bytes + kLayout.row_floats_offset_bytes());
  float* dsum_rows = lse_rows + FAP_Q_STAGES * FAP_BLOCK_M;  // FAP_DO_STAGES stages

  // The first key block (under a causal mask the first key blocks see the most query rows) and every
  // place.blocks-th after it; in the deterministic mode the rank is the CTA's accumulator slice.
  const GridPlace place = place_in_grid();
  const int batch = place.batch, kv_head = place.head;
  const SequenceRows s = sequence_rows(p, batch);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad = lane % 4;
  const int m = lane / 8, r = lane % 8;  // ldmatrix: this lane addresses row r of matrix m
  const int key_row0 = warp / FAP_DKV_SPLIT * FAP_KEY_TILE, part = warp % FAP_DKV_SPLIT;  // this warp's keys
  const int dkv_col0 = part * FAP_DKV_COLS;
  for (int key_block = place.rank; key_block * FAP_BLOCK_N < s.len_k; key_block += place.blocks) {
    const int key0 = key_block * FAP_BLOCK_N;
    const BlockRange blocks = BlockInfo<FAP_BLOCK_M, FAP_BLOCK_N>::query_blocks(p, s, key0);
    const int first_block = blocks.first, query_blocks = blocks.end - blocks.first;
    const int steps = query_blocks * p.group_size;  // (query head of the group, query block) pairs

    // A step's query head and first query row, advanced from the previous step's (a division per step cost ~25
    // integer instructions per warp: ncu at d = 128).
    struct StepPosition {
      int head, q0;
    };
    const StepPosition first_position{kv_head * p.group_size, first_block * FAP_BLOCK_M};
    auto next_position = [&](StepPosition at) {
      at.q0 += FAP_BLOCK_M;
      if (at.q0 == blocks.end * FAP_BLOCK_M) at.q0 = first_position.q0, ++at.head;
      return at;
    };
    // Issue, by cp.async, the loads of a step into one stage of a query-side tensor: its tile (Q or dO) with its
    // per-row values (LSE or D), these by the threads from first_thread on.
    auto load_query_side = [&](StepPosition at, storage_t* tile, float* rows, const void* tensor, long long batch_stride,
                               long long row_stride, long long head_stride, const float* row_values, int first_thread) {
      const int head = at.head, q0 = at.q0;
      load_tile<FAP_BLOCK_M>(tile,
                             static_cast<const storage_t*>(tensor) + batch * batch_stride +
                                 (s.q_start + q0) * row_stride + head * head_stride,
                             row_stride, s.len_q - q0, p.head_dim, p.vector_loads);
      load_query_rows<FAP_BLOCK_M>(rows, row_values, p, s, head, q0, first_thread);
    };
    auto load_queries = [&](StepPosition at, int stage) {
      load_query_side(at, q_tiles + stage * FAP_BLOCK_M * FAP_STRIDE, lse_rows + stage * FAP_BLOCK_M, p.q,
                      p.q_batch_stride, p.q_row_stride, p.q_head_stride, p.lse_log2, 0);
    };
    auto load_output_grads = [&](StepPosition at, int stage) {
      load_query_side(at, do_tiles + stage * FAP_BLOCK_M * FAP_STRIDE, dsum_rows + stage * FAP_BLOCK_M, p.dout,
                      p.dout_batch_stride, p.dout_row_stride, p.dout_head_stride, p.dsum, FAP_BLOCK_M / 4);
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
    if (steps > 0) {
      load_queries(first_position, 0);
      load_output_grads(first_position, 0);
    }
    cp_async_commit();

    float dk[kKeyFragments][FAP_DKV_COLS / 8][4], dv[kKeyFragments][FAP_DKV_COLS / 8][4];
#pragma unroll
    for (int f = 0; f < kKeyFragments; ++f) zero_fragments(dk[f]), zero_fragments(dv[f]);

    StepPosition at = first_position;
    for (int step = 0; step < steps; ++step) {
      const int q_stage = FAP_Q_STAGES == 2 ? step & 1 : 0, do_stage = FAP_DO_STAGES == 2 ? step & 1 : 0;
      const int head = at.head, q0 = at.q0;
      const StepPosition next = next_position(at);
      const storage_t* q_tile = q_tiles + q_stage * FAP_BLOCK_M * FAP_STRIDE;
      const storage_t* do_tile = do_tiles + do_stage * FAP_BLOCK_M * FAP_STRIDE;
      const float* lse_stage = lse_rows + q_stage * FAP_BLOCK_M;
      const float* dsum_stage = dsum_rows + do_stage * FAP_BLOCK_M;
      cp_async_wait_all();
      __syncthreads();  // this step's tiles are in; the previous step is finished with the other stages
      if (step + 1 < steps) {
        if (FAP_Q_STAGES == 2) load_queries(next, q_stage ^ 1);
        if (FAP_DO_STAGES == 2) load_output_grads(next, do_stage ^ 1);
      }
      cp_async_commit();
      const float slope = FAP_ALIBI ? p.alibi[batch * p.alibi_batch_stride + head] : 0.0f;

      const bool needs_mask = BlockInfo<FAP_BLOCK_M, FAP_BLOCK_N>::needs_mask(p, s, q0, key0);

      // dV += P^T dO and dK += dS^T Q for 16 queries from row query_row of the step, over this warp's keys and
      // columns. The B fragments are addressed from this lane's ldmatrix row of each tile (query 0, column
      // dkv_col0) plus byte offsets known at compile time: a pointer per load cost an IMAD before each ldmatrix
      // (ptxas rematerialised them at 255 registers; ncu at d = 128).
      const unsigned int do_rows_t = shared_address(do_tile + ((m % 2) * 8 + r) * FAP_STRIDE + dkv_col0 + (m / 2) * 8);
      const unsigned int q_rows_t = shared_address(q_tile + ((m % 2) * 8 + r) * FAP_STRIDE + dkv_col0 + (m / 2) * 8);
      auto accumulate_key_gradients = [&](const unsigned int (&a_p)[kKeyFragments][4],
                                          const unsigned int (&a_ds)[kKeyFragments][4], int query_row) {
        const unsigned int row_bytes = query_row * FAP_STRIDE * sizeof(storage_t);
#pragma unroll
        for (int i = 0; i < FAP_DKV_COLS / 16; ++i) {
          const unsigned int column_bytes = i * 16 * sizeof(storage_t);
          unsigned int b[4];
          ldmatrix_x4_trans(b, do_rows_t + row_bytes + column_bytes);
#pragma unroll
          for (int f = 0; f < kKeyFragments; ++f) {
            mma_16816(dv[f][2 * i], a_p[f], b[0], b[1]);
            mma_16816(dv[f][2 * i + 1], a_p[f], b[2], b[3]);
          }
          ldmatrix_x4_trans(b, q_rows_t + row_bytes + column_bytes);
#pragma unroll
          for (int f = 0; f < kKeyFragments; ++f) {
            mma_16816(dk[f][2 * i], a_ds[f], b[0], b[1]);
            mma_16816(dk[f][2 * i + 1], a_ds[f], b[2], b[3]);
          }
        }
      };

#pragma unroll 1
      for (int pass = 0; pass < kPasses; ++pass) {
        const int query_col0 = part * kWarpColumns + pass * kPassColumns;

        // S^T = K Q^T and dP^T = V dO^T for this warp's keys and the pass's queries.
        float st[kKeyFragments][kPassColumns / 8][4], dpt[kKeyFragments][kPassColumns / 8][4];
#pragma unroll
        for (int f = 0; f < kKeyFragments; ++f) zero_fragments(st[f]), zero_fragments(dpt[f]);
        // This lane's ldmatrix rows at column 0; each 16-column step moves them by 32 bytes.
        const unsigned int k_rows = shared_address(k_tile + (key_row0 + (m % 2) * 8 + r) * FAP_STRIDE + (m / 2) * 8);
        const unsigned int v_rows = shared_address(v_tile + (key_row0 + (m % 2) * 8 + r) * FAP_STRIDE + (m / 2) * 8);
        const unsigned int q_rows = shared_address(q_tile + (query_col0 + (m / 2) * 8 + r) * FAP_STRIDE + (m % 2) * 8);
        const unsigned int do_rows = shared_address(do_tile + (query_col0 + (m / 2) * 8 + r) * FAP_STRIDE + (m % 2) * 8);
        constexpr unsigned int kFragmentBytes = 16 * FAP_STRIDE * 2;  // 16 rows of a K/V or Q/dO tile
        // Two head-dim columns of fragments per iteration with 16-key tiles (unrolled further, ptxas hoists the
        // fragment loads of the whole head dim and spills); one with 32-key tiles, which load two K and two V
        // fragments per column (unrolled twice, a few of their configurations spill 8-16 bytes).
        auto column_products = [&](int kk) {
          unsigned int a_k[kKeyFragments][4], a_v[kKeyFragments][4];
#pragma unroll
          for (int f = 0; f < kKeyFragments; ++f) {
            ldmatrix_x4(a_k[f], k_rows + f * kFragmentBytes + kk * 32);
            ldmatrix_x4(a_v[f], v_rows + f * kFragmentBytes + kk * 32);
          }
#pragma unroll
          for (int j = 0; j < kPassColumns / 16; ++j) {
            unsigned int b[4];
            ldmatrix_x4(b, q_rows + j * kFragmentBytes + kk * 32);
#pragma unroll
            for (int f = 0; f < kKeyFragments; ++f) {
              mma_16816(st[f][2 * j], a_k[f], b[0], b[1]);
              mma_16816(st[f][2 * j + 1], a_k[f], b[2], b[3]);
            }
            ldmatrix_x4(b, do_rows + j * kFragmentBytes + kk * 32);
#pragma unroll
            for (int f = 0; f < kKeyFragments; ++f) {
              mma_16816(dpt[f][2 * j], a_v[f], b[0], b[1]);
              mma_16816(dpt[f][2 * j + 1], a_v[f], b[2], b[3]);
            }
          }
        };
        // Column 0 outside the loop: its products start from zero accumulators that ptxas then folds into them
        // (in a rolled loop, zeroing S^T and dP^T took a register move per pair of floats every step).
        column_products(0);
#pragma unroll(kKeyFragments == 2 ? 1 : 2)
        for (int kk = 1; kk < FAP_HEAD_DIM / 16; ++kk) column_products(kk);

        // P^T after dropout and dS^T (the derivative with respect to the scaled, capped score) in place of S^T and
        // dP^T; dS^T (and, for warps sharing keys, P^T) into shared memory. Inlined once per value of `masked`,
        // chosen per step: a choice per element cost a branch and its convergence barrier each (ncu at d = 64).
        auto softmax_gradients = [&](bool masked) {
#pragma unroll
          for (int j = 0; j < kPassColumns / 8; ++j) {
            // This thread's two query columns of the 8-column tile j: their LSE and D, read once for every key.
            const int query_local = query_col0 + j * 8 + quad * 2;
            const float lse[2] = {lse_stage[query_local], lse_stage[query_local + 1]};
            const float dsum[2] = {dsum_stage[query_local], dsum_stage[query_local + 1]};
#pragma unroll
            for (int f = 0; f < kKeyFragments; ++f)
#pragma unroll
              for (int half = 0; half < 2; ++half) {
                const int key_row = key_row0 + f * 16 + group + 8 * half;
                const int key = key0 + key_row;
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                  const int row = q0 + query_local + c;
                  float cap_derivative;
                  const float prob =
                      masked ? backward_probability<true>(st[f][j][2 * half + c], p, s, slope, row, key, lse[c],
                                                          &cap_derivative)
                             : backward_probability<false>(st[f][j][2 * half + c], p, s, slope, row, key, lse[c],
                                                           &cap_derivative);
                  float dp = dpt[f][j][2 * half + c];
#if FAP_DROPOUT
                  const Philox4 words = dropout_words(p.dropout_seed, p.dropout_offset,
                                                      (unsigned int)(batch * p.heads_q + head), (unsigned int)row,
                                                      (unsigned int)key / 4);
                  const float kept =
                      philox_word(words, (unsigned int)key % 4) >= p.dropout_threshold ? p.dropout_scale : 0.0f;
                  dp *= kept;
                  st[f][j][2 * half + c] = prob * kept;
#else
                  st[f][j][2 * half + c] = prob;
#endif
                  dpt[f][j][2 * half + c] = prob * (dp - dsum[c]) * cap_derivative;
                }
                const int element = key_row * FAP_DS_STRIDE + query_local;
                *reinterpret_cast<unsigned int*>(ds_tile + element) = pack2(dpt[f][j][2 * half], dpt[f][j][2 * half + 1]);
                if (!FAP_PT_IN_REGISTERS)
                  *reinterpret_cast<unsigned int*>(p_tile + element) = pack2(st[f][j][2 * half], st[f][j][2 * half + 1]);
              }
          }
        };
        if (FAP_DROPOUT || (FAP_SOFTCAP && FAP_ALIBI && kKeyFragments == 2)) {
          // One copy where a second spills: beside dropout's Philox rounds, and the softcap's and ALiBi's
          // arithmetic with 32-key tiles.
          softmax_gradients(needs_mask);
        } else if (needs_mask) {
          softmax_gradients(true);
        } else {
          softmax_gradients(false);
        }

#if FAP_PT_IN_REGISTERS
#pragma unroll
        for (int kk = 0; kk < kPassColumns / 16; ++kk) {
          unsigned int a_p[1][4], a_ds[1][4];
          pack_a_operand(a_p[0], st[0], kk);
          pack_a_operand(a_ds[0], dpt[0], kk);
          accumulate_key_gradients(a_p, a_ds, query_col0 + kk * 16);
        }
#endif
      }
      __syncthreads();  // dS^T (and P^T) are complete
#if !FAP_PT_IN_REGISTERS
      // This lane's ldmatrix row of dS^T (P^T lies a constant distance further) at this warp's keys, query 0.
      const unsigned int ds_rows = shared_address(ds_tile + (key_row0 + (m % 2) * 8 + r) * FAP_DS_STRIDE + (m / 2) * 8);
      constexpr unsigned int kPFromDs = (kLayout.p_tile() - kLayout.ds_tile()) * sizeof(storage_t);
#pragma unroll
      for (int kk = 0; kk < FAP_BLOCK_M / 16; ++kk) {
        unsigned int a_p[kKeyFragments][4], a_ds[kKeyFragments][4];
#pragma unroll
        for (int f = 0; f < kKeyFragments; ++f) {
          const unsigned int offset = (f * 16 * FAP_DS_STRIDE + kk * 16) * sizeof(storage_t);
          ldmatrix_x4(a_p[f], ds_rows + kPFromDs + offset);
          ldmatrix_x4(a_ds[f], ds_rows + offset);
        }
        accumulate_key_gradients(a_p, a_ds, kk * 16);
      }
      if (FAP_Q_STAGES == 1 || FAP_DO_STAGES == 1) __syncthreads();  // every warp is done with Q, dO, LSE and D
#endif
      // Single-buffered query tiles: the next step's load runs under dQ's MMAs and atomics (the last reads of Q and
      // dO were dV's and dK's, before the barrier above).
      if ((FAP_Q_STAGES == 1 || FAP_DO_STAGES == 1) && step + 1 < steps) {
        if (FAP_Q_STAGES == 1) load_queries(next, 0);
        if (FAP_DO_STAGES == 1) load_output_grads(next, 0);
        cp_async_commit();
      }

      // dQ += dS K: work items of kDqItemRows query rows x kDqItemColumns spread over the warps (one at a time:
      // unrolled, their accumulators would compete with dK and dV for registers).
      constexpr int kColumnItems = FAP_HEAD_DIM / kDqItemColumns;
      float* const dq_step = p.dq_accum + (p.deterministic ? place.rank * p.dq_accum_split_stride : 0) +
                             dq_accum_offset(p, s, batch, q0, head, 0);
#pragma unroll 1
      for (int item = warp; item < (FAP_BLOCK_M / kDqItemRows) * kColumnItems; item += FAP_WARPS) {
        const int row0 = item / kColumnItems * kDqItemRows, col0 = item % kColumnItems * kDqItemColumns;
        float acc[kDqRowTiles][kDqItemColumns / 8][4];
#pragma unroll
        for (int t = 0; t < kDqRowTiles; ++t) zero_fragments(acc[t]);
        warp_mma_shared<FAP_BLOCK_N / 16>(
            acc,
            SharedFragments<true, 32, 16 * FAP_DS_STRIDE * sizeof(storage_t)>{
                shared_address(ds_tile + ((m / 2) * 8 + r) * FAP_DS_STRIDE + row0 + (m % 2) * 8)},
            SharedFragments<true, 32, 16 * FAP_STRIDE * sizeof(storage_t)>{
                shared_address(k_tile + ((m % 2) * 8 + r) * FAP_STRIDE + col0 + (m / 2) * 8)});
        // Rows past the sequence add zeros (their P is 0) into its padded rows, which the conversion skips.
#pragma unroll
        for (int t = 0; t < kDqRowTiles; ++t) {
          float* tile = dq_step + dq_accum_offset_in_rows(p, row0 + t * 16, col0);
#pragma unroll
          for (int n = 0; n < kDqItemColumns / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) atomicAdd(tile + n * 128 + e * 32 + lane, acc[t][n][e]);
        }
      }
      at = next;
    }
    cp_async_wait_all();  // a key block no query sees still has its tile loads in flight

    // dK and dV for this warp's keys and columns.
#pragma unroll
    for (int f = 0; f < kKeyFragments; ++f)
#pragma unroll
      for (int half = 0; half < 2; ++half)
        store_key_gradients(p, s, batch, kv_head, key0 + key_row0 + f * 16 + group + 8 * half, half, dkv_col0, dk[f],
                            dv[f]);
  }
}

}  // namespace fap
