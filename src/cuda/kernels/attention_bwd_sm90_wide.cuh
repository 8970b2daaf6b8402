// Attention backward for Hopper (sm_90a) at head dim 256, the main kernel on warpgroup MMAs (the preprocess
// and conversion kernels around it are in attention_bwd_common.cuh). dK and dV of 64 keys x 256 columns
// would take 256 registers per thread of a warpgroup, so both warpgroups share the CTA's FAP_BLOCK_N = 64
// keys and each keeps dK, dV for one half of the head dim. Per step of FAP_BLOCK_M = 64 queries (of one
// query head of the group), warpgroup w:
//   S^T = K Q^T and dP^T = V dO^T        (64 keys x its 32 queries over all 256 columns, from shared memory)
//   P^T, dS^T = P^T (dP^T - D)           (registers, from the forward's LSE), to shared memory in bf16/fp16
//   dV += P^T dO, dK += dS^T Q           (its 128 columns, over all 64 queries: P^T, dS^T from shared memory)
//   dQ = dS K                            (its 128 columns, over the 64 keys), staged where its halves of this
//                                        stage's Q and dO tiles were (nothing reads them any more) and added
//                                        to the fp32 accumulator by two bulk reductions of the TMA unit
// Q and dO tiles (with LSE and D) are double-buffered with cp.async, each fill landing through an mbarrier
// ("full" once every thread's copies landed), and P^T, dS^T double-buffered by step: the one CTA barrier of a
// step is the exchange of P^T and dS^T, so a warpgroup done with its dQ starts the next step's S^T and dP^T
// while the other finishes. The next step's loads start after that barrier: both warpgroups are then done with
// the stage's last use (its products, and the reads of the dQ staged in it by the bulk reductions). Every CTA
// adds to each dQ element: in no fixed order, except in the deterministic mode (DqOrder).
// Dropout uses the mma.sync kernel (the dispatch table decides).
//
// Compile-time configuration: FAP_HEAD_DIM (256), FAP_BLOCK_M (64), FAP_BLOCK_N (64), FAP_WARPS (8),
// FAP_DQ_TILES (1), FAP_BF16, FAP_SOFTCAP, FAP_ALIBI, FAP_WINDOW.
#pragma once

#include "attention_bwd_sm90_common.cuh"


namespace fap {

// A warpgroup's 64 keys x 32 queries of P^T or dS^T (accumulator layout) as 16-bit values into a swizzled
// [key][query] tile of 64 rows, at query column query_offset.
__device__ __forceinline__ void store_transposed_scores(unsigned char* tile, const float (&scores)[4][4],
                                                        const int (&key_local)[2], int query_offset) {
  const int quad = threadIdx.x % 4;
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      *reinterpret_cast<unsigned int*>(tile + swizzled_offset<64>(key_local[half], query_offset + j * 8 + quad * 2)) =
          pack2(scores[j][2 * half], scores[j][2 * half + 1]);
    }
}

// Grid: backward_cta; 256 threads.
extern "C" __global__ void __launch_bounds__(FAP_WARPS * 32, 1) attention_bwd(const AttentionBwdParams p) {
  static_assert(FAP_HEAD_DIM == 256 && FAP_BLOCK_M == 64 && FAP_BLOCK_N == 64, "the tile shape this kernel is for");
  constexpr HopperBackwardSharedLayout kLayout =
      hopper_backward_layout(FAP_BLOCK_M, FAP_BLOCK_N, FAP_HEAD_DIM, FAP_SOFTCAP, FAP_ALIBI);
  constexpr int kQBytes = kLayout.q_tile_bytes();
  constexpr int kHalfBytes = kQBytes / 2;  // a warpgroup's 128 columns of a Q or dO tile: two column blocks
  constexpr int kScoreBytes = kLayout.score_tile_bytes();
  // Score tiles: P^T then dS^T (each FAP_BLOCK_N keys x FAP_BLOCK_M queries, swizzled), two of each: by the use's
  // parity. dQ is staged in the Q and dO tiles.
  const auto [k_tile, v_tile, q_tiles, do_tiles, score_tiles, unused_dq_staging, lse_rows, dsum_rows, ring_barriers] =
      backward_tiles(kLayout);
  const QueryStages<FAP_BLOCK_M> stages = {q_tiles, do_tiles, lse_rows, dsum_rows, kQBytes};
  auto ring = StageRing<true, false>::at(ring_barriers);

  const auto [batch, kv_head, first_key_block, key_block_stride, s, warpgroup, reduces_dq, dq_slice] =
      backward_cta<true>(p);
  const int warp = threadIdx.x % 128 / 32, lane = threadIdx.x % 32;
  const int key_local[2] = {warp * 16 + lane / 4, warp * 16 + lane / 4 + 8};
  const unsigned int k_address = shared_address(k_tile), v_address = shared_address(v_tile);
  const int query_offset = warpgroup * 32, col0 = warpgroup * 128;  // this warpgroup's queries and columns

  for (int key_block = first_key_block; key_block * FAP_BLOCK_N < s.len_k; key_block += key_block_stride) {
    const int key0 = key_block * FAP_BLOCK_N;
    const KeyBlockSteps steps = key_block_steps<FAP_BLOCK_M, FAP_BLOCK_N>(p, s, kv_head, key0);
    QueryStep current = {kv_head * p.group_size, steps.first_q0};
    load_key_block<FAP_BLOCK_M, FAP_BLOCK_N>(k_tile, v_tile, stages, ring, p, s, batch, kv_head, key0, steps, current);

    float dk[16][4], dv[16][4];  // this warpgroup's 128 columns
    zero_fragments(dk);
    zero_fragments(dv);

    for (int step = 0; step < steps.count; ++step) {
      const int stage = ring.acquire();  // this step's Q, dO, LSE and D have landed
      const int head = current.head, q0 = current.q0;
      const QueryStep next = following_step<FAP_BLOCK_M>(current, steps.first_q0, steps.end_q0);
      unsigned char* pt_tile = score_tiles + stage * 2 * kScoreBytes;
      unsigned char* dst_tile = pt_tile + kScoreBytes;
      const unsigned int pt_address = shared_address(pt_tile), dst_address = shared_address(dst_tile);
      unsigned char* q_tile = q_tiles + stage * kQBytes;
      unsigned char* do_tile = do_tiles + stage * kQBytes;
      const unsigned int q_address = shared_address(q_tile), do_address = shared_address(do_tile);

      // S^T = K Q^T and dP^T = V dO^T for the 64 keys and this warpgroup's 32 queries.
      float st[4][4], dpt[4][4];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < FAP_HEAD_DIM / 16; ++kk) {
        wgmma_ss<32>(&st[0][0], k_major_descriptor<FAP_BLOCK_N>(k_address, 0, kk),
                     k_major_descriptor<FAP_BLOCK_M>(q_address, query_offset, kk), kk > 0);
      }
#pragma unroll
      for (int kk = 0; kk < FAP_HEAD_DIM / 16; ++kk) {
        wgmma_ss<32>(&dpt[0][0], k_major_descriptor<FAP_BLOCK_N>(v_address, 0, kk),
                     k_major_descriptor<FAP_BLOCK_M>(do_address, query_offset, kk), kk > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_registers<16>(&st[0][0]);
      fence_registers<16>(&dpt[0][0]);

      // P^T and dS^T (the derivative with respect to the scaled, capped score), in place, then to shared memory.
      const bool needs_mask = BlockInfo<FAP_BLOCK_M, FAP_BLOCK_N>::needs_mask(p, s, q0, key0);
      const float slope = FAP_ALIBI ? p.alibi[batch * p.alibi_batch_stride + head] : 0.0f;
      const float* lse_stage = lse_rows + stage * FAP_BLOCK_M;
      const float* dsum_stage = dsum_rows + stage * FAP_BLOCK_M;
      if (needs_mask) {
        softmax_gradients<true>(st, dpt, p, s, slope, q0, query_offset, key0, key_local, lse_stage, dsum_stage);
      } else {
        softmax_gradients<false>(st, dpt, p, s, slope, q0, query_offset, key0, key_local, lse_stage, dsum_stage);
      }
      store_transposed_scores(pt_tile, st, key_local, query_offset);
      store_transposed_scores(dst_tile, dpt, key_local, query_offset);
      fence_proxy_async();
      if (reduces_dq) bulk_wait_read<0>();  // the last step's dQ reductions have read the other stage
      // P^T, dS^T complete; both warpgroups are done reading S^T's and dP^T's operands, and done with the last
      // step (its products, and its P^T, dS^T tiles, which the next step overwrites).
      __syncthreads();

      // The next step's loads, into the other stage, while this one's products run.
      if (step + 1 < steps.count) ring.fill(stages, p, s, batch, next, ring.uses + 1);

      // dV += P^T dO, dK += dS^T Q (this warpgroup's columns of dO and Q, MN-major), dQ = dS K (dS^T read
      // transposed, K's columns MN-major).
      float dq[16][4];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < FAP_BLOCK_M / 16; ++kk) {
        wgmma_ss<128>(&dv[0][0], k_major_descriptor<FAP_BLOCK_N>(pt_address, 0, kk),
                      mn_major_descriptor<FAP_BLOCK_M>(do_address + warpgroup * kHalfBytes, kk), 1, Transpose::kB);
      }
#pragma unroll
      for (int kk = 0; kk < FAP_BLOCK_M / 16; ++kk) {
        wgmma_ss<128>(&dk[0][0], k_major_descriptor<FAP_BLOCK_N>(dst_address, 0, kk),
                      mn_major_descriptor<FAP_BLOCK_M>(q_address + warpgroup * kHalfBytes, kk), 1, Transpose::kB);
      }
#pragma unroll
      for (int kk = 0; kk < FAP_BLOCK_N / 16; ++kk) {
        wgmma_ss<128>(&dq[0][0], mn_major_descriptor<FAP_BLOCK_N>(dst_address, kk),
                      mn_major_descriptor<FAP_BLOCK_N>(k_address + warpgroup * FAP_BLOCK_N * 256, kk), kk > 0,
                      Transpose::kBoth);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_registers<64>(&dv[0][0]);
      fence_registers<64>(&dk[0][0]);
      fence_registers<64>(&dq[0][0]);

      // dQ's two 64-column blocks into this warpgroup's halves of the Q and dO tiles (only it reads them after
      // the barrier above), then added by the TMA unit. Rows past the sequence hold zeros (their P is 0) and
      // land in the tile's padding.
      float* staging[2] = {reinterpret_cast<float*>(q_tile + warpgroup * kHalfBytes),
                           reinterpret_cast<float*>(do_tile + warpgroup * kHalfBytes)};
      stage_fragment<8>(staging[0], &dq[0]);
      stage_fragment<8>(staging[1], &dq[8]);
      fence_proxy_async();
      named_barrier_sync(1 + warpgroup, 128);  // the warpgroup's dQ is staged
      if (reduces_dq) {
        if (p.dq_order) DqOrder<FAP_BLOCK_M, FAP_BLOCK_N>::wait_turn(p, s, current, key0);
        for (int half = 0; half < 2; ++half) {
          bulk_reduce_add(dq_slice + dq_accum_offset(p, s, batch, q0, head, col0 + half * 64),
                          shared_address(staging[half]), kHalfBytes);
        }
        bulk_commit();
        if (p.dq_order && step > 0) DqOrder<FAP_BLOCK_M, FAP_BLOCK_N>::count_before<1>(p, s, current, steps);
      }
      ring.release();
      current = next;
    }
    finish_key_block(reduces_dq);
    if (reduces_dq && p.dq_order && steps.count > 0) {
      DqOrder<FAP_BLOCK_M, FAP_BLOCK_N>::count_before<0>(p, s, current, steps);
    }

    // dK and dV for the 64 keys, this warpgroup's columns.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      store_key_gradients(p, s, batch, kv_head, key0 + key_local[half], half, col0, dk, dv);
    }
    __syncthreads();  // the next key block's loads may overwrite every tile
  }
}

}  // namespace fap
