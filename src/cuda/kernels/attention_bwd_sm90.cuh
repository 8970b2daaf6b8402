// Attention backward for Hopper (sm_90a), the main kernel on warpgroup MMAs (the preprocess and conversion
// kernels around it are in attention_bwd_common.cuh). One CTA per (block of FAP_BLOCK_N = 128 keys, batch,
// kv head), two warpgroups of 64 keys; it loops over the group's query heads and the blocks of
// FAP_BLOCK_M queries that can see its keys (d = 128: 64, d = 64: 128). Per step, each warpgroup:
//   S^T = K Q^T and dP^T = V dO^T        (64 keys x FAP_BLOCK_M queries, both operands in shared memory)
//   P^T, dS^T = P^T (dP^T - D)           (registers, from the forward's LSE)
//   dV += P^T dO, dK += dS^T Q           (P^T and dS^T from registers; dK, dV stay in registers)
//   dQ += dS K                           (dS^T through shared memory, both operands transposed) for a
//                                        64 x 64 part over all 128 keys: at d = 128 half the columns, at
//                                        d = 64 half the queries; staged in shared memory (kLayout.dq_stages) and
//                                        added to the fp32 accumulator by one bulk reduction of the TMA unit
// Q and dO tiles (with LSE and D) are double-buffered with cp.async in the 128-byte-swizzled layout wgmma
// reads (hopper.cuh), each stage handed over through mbarriers rather than CTA barriers: "full" once every
// thread's copies of it landed, "empty" once both warpgroups' products read it. A warpgroup ahead of the other
// thus starts its next step's products while the other finishes its dQ; the one CTA barrier per step is the
// exchange of dS^T (double-buffered by step, so that a warpgroup a step ahead never overwrites what the other's
// dQ product reads). This took the profile's largest stall, warps waiting at the top-of-step CTA barrier (18 %
// of the samples at d = 128), and gave +10-17 % at d = 128, +5-16 % at d = 64 on an H200 (bench/RESULTS.md).
// At d = 64 with softcap or ALiBi it would spill registers: there a CTA barrier still opens each step.
// Every CTA adds to each dQ element once: in no fixed order, except in the deterministic mode (one accumulator
// slice per CTA). Dropout uses the mma.sync kernel (the dispatch table decides).
//
// Compile-time configuration: FAP_HEAD_DIM (64 or 128), FAP_BLOCK_M (8192 / FAP_HEAD_DIM), FAP_BLOCK_N (128),
// FAP_WARPS (8), FAP_DQ_TILES (1), FAP_BF16, FAP_SOFTCAP, FAP_ALIBI, FAP_WINDOW.
#pragma once

#include "attention_bwd_sm90_common.cuh"


namespace fap {

// How the Q/dO stages are handed over (hopper_backward_stage_mbarriers), and the dS^T tiles and dQ staging buffers
// that follow from it.
constexpr bool kStageMbarriers = hopper_backward_stage_mbarriers(FAP_HEAD_DIM, FAP_SOFTCAP, FAP_ALIBI);
constexpr HopperBackwardSharedLayout kLayout =
    hopper_backward_layout(FAP_BLOCK_M, FAP_BLOCK_N, FAP_HEAD_DIM, FAP_SOFTCAP, FAP_ALIBI);

// Grid: backward_cta; 256 threads.
extern "C" __global__ void __launch_bounds__(FAP_WARPS * 32, 1) attention_bwd(const AttentionBwdParams p) {
  constexpr int kQBytes = kLayout.q_tile_bytes(), kDsBytes = kLayout.score_tile_bytes();
  constexpr int kDsTiles = kLayout.score_tiles, kDqStages = kLayout.dq_stages;
  // dS^T tiles: FAP_BLOCK_N keys x FAP_BLOCK_M queries, swizzled. dQ = dS K: kLayout.dq_stages buffers of both
  // warpgroups' 64 x 64 parts.
  const auto [k_tile, v_tile, q_tiles, do_tiles, ds_tiles, dq_staging, lse_rows, dsum_rows, ring_barriers] =
      backward_tiles(kLayout);
  static_assert(FAP_BLOCK_M * FAP_HEAD_DIM == 2 * 64 * 64, "each warpgroup's dQ part is 64 queries x 64 columns");
  constexpr int kDqBytes = 64 * 64 * 4;
  const QueryStages<FAP_BLOCK_M> stages = {q_tiles, do_tiles, lse_rows, dsum_rows, kQBytes};
  auto ring = StageRing<kStageMbarriers, kStageMbarriers>::at(ring_barriers);

  const auto [batch, kv_head, first_key_block, key_block_stride, s, warpgroup, reduces_dq, dq_slice] =
      backward_cta<false>(p);
  const int warp = threadIdx.x % 128 / 32, lane = threadIdx.x % 32, quad = lane % 4;
  const int key_local[2] = {warpgroup * 64 + warp * 16 + lane / 4, warpgroup * 64 + warp * 16 + lane / 4 + 8};
  const unsigned int k_address = shared_address(k_tile), v_address = shared_address(v_tile);

  for (int key_block = first_key_block; key_block * FAP_BLOCK_N < s.len_k; key_block += key_block_stride) {
    const int key0 = key_block * FAP_BLOCK_N;
    const KeyBlockSteps steps = key_block_steps<FAP_BLOCK_M, FAP_BLOCK_N>(p, s, kv_head, key0);
    QueryStep current = {kv_head * p.group_size, steps.first_q0};
    load_key_block<FAP_BLOCK_M, FAP_BLOCK_N>(k_tile, v_tile, stages, ring, p, s, batch, kv_head, key0, steps, current);

    float dk[FAP_HEAD_DIM / 8][4], dv[FAP_HEAD_DIM / 8][4];
    zero_fragments(dk);
    zero_fragments(dv);

    for (int step = 0; step < steps.count; ++step) {
      const int head = current.head, q0 = current.q0;
      const QueryStep next = following_step<FAP_BLOCK_M>(current, steps.first_q0, steps.end_q0);
      const int stage = ring.acquire();
      const unsigned int q_address = shared_address(q_tiles + stage * kQBytes),
                         do_address = shared_address(do_tiles + stage * kQBytes);
      const float* lse_stage = lse_rows + stage * FAP_BLOCK_M;
      const float* dsum_stage = dsum_rows + stage * FAP_BLOCK_M;

      // S^T = K Q^T and dP^T = V dO^T for this warpgroup's 64 keys.
      float st[FAP_BLOCK_M / 8][4], dpt[FAP_BLOCK_M / 8][4];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < FAP_HEAD_DIM / 16; ++kk) {
        wgmma_ss<FAP_BLOCK_M>(&st[0][0], k_major_descriptor<FAP_BLOCK_N>(k_address, warpgroup * 64, kk),
                              k_major_descriptor<FAP_BLOCK_M>(q_address, 0, kk), kk > 0);
      }
#pragma unroll
      for (int kk = 0; kk < FAP_HEAD_DIM / 16; ++kk) {
        wgmma_ss<FAP_BLOCK_M>(&dpt[0][0], k_major_descriptor<FAP_BLOCK_N>(v_address, warpgroup * 64, kk),
                              k_major_descriptor<FAP_BLOCK_M>(do_address, 0, kk), kk > 0);
      }
      wgmma_commit();
      // The next step's loads while the products run.
      if (step + 1 < steps.count) ring.fill(stages, p, s, batch, next, ring.uses + 1);
      wgmma_wait<0>();
      fence_registers<FAP_BLOCK_M / 2>(&st[0][0]);
      fence_registers<FAP_BLOCK_M / 2>(&dpt[0][0]);

      // P^T and dS^T (the derivative with respect to the scaled, capped score), in place.
      const bool needs_mask = BlockInfo<FAP_BLOCK_M, FAP_BLOCK_N>::needs_mask(p, s, q0, key0);
      const float slope = FAP_ALIBI ? p.alibi[batch * p.alibi_batch_stride + head] : 0.0f;
      if (needs_mask) {
        softmax_gradients<true>(st, dpt, p, s, slope, q0, 0, key0, key_local, lse_stage, dsum_stage);
      } else {
        softmax_gradients<false>(st, dpt, p, s, slope, q0, 0, key0, key_local, lse_stage, dsum_stage);
      }
      unsigned int p_frag[FAP_BLOCK_M / 16][4], ds_frag[FAP_BLOCK_M / 16][4];
#pragma unroll
      for (int kk = 0; kk < FAP_BLOCK_M / 16; ++kk) {
        p_frag[kk][0] = pack2(st[2 * kk][0], st[2 * kk][1]);
        p_frag[kk][1] = pack2(st[2 * kk][2], st[2 * kk][3]);
        p_frag[kk][2] = pack2(st[2 * kk + 1][0], st[2 * kk + 1][1]);
        p_frag[kk][3] = pack2(st[2 * kk + 1][2], st[2 * kk + 1][3]);
        ds_frag[kk][0] = pack2(dpt[2 * kk][0], dpt[2 * kk][1]);
        ds_frag[kk][1] = pack2(dpt[2 * kk][2], dpt[2 * kk][3]);
        ds_frag[kk][2] = pack2(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
        ds_frag[kk][3] = pack2(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
      }

      // dV += P^T dO and dK += dS^T Q (dO and Q as k x n operands: queries x head dim).
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < FAP_BLOCK_M / 16; ++kk)
        wgmma_rs<FAP_HEAD_DIM>(&dv[0][0], p_frag[kk], mn_major_descriptor<FAP_BLOCK_M>(do_address, kk), 1);
#pragma unroll
      for (int kk = 0; kk < FAP_BLOCK_M / 16; ++kk)
        wgmma_rs<FAP_HEAD_DIM>(&dk[0][0], ds_frag[kk], mn_major_descriptor<FAP_BLOCK_M>(q_address, kk), 1);
      wgmma_commit();

      // dS^T of this warpgroup's keys into shared memory, [key][query] swizzled: the A operand of dQ = dS K
      // read transposed. Its tile alternates with the use's parity, like the Q/dO stage.
      unsigned char* ds_tile = ds_tiles + stage % kDsTiles * kDsBytes;
#pragma unroll
      for (int kk = 0; kk < FAP_BLOCK_M / 16; ++kk)
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
          for (int n = 0; n < 2; ++n) {
            *reinterpret_cast<unsigned int*>(ds_tile + swizzled_offset<FAP_BLOCK_N>(key_local[half], kk * 16 + n * 8 + quad * 2)) =
                ds_frag[kk][2 * n + half];
          }
      fence_proxy_async();
      if (reduces_dq) bulk_wait_read<kDqStages - 1>();  // this step's dQ staging buffer is free again
      __syncthreads();  // both warpgroups' dS^T rows are complete (and the staging buffers free)
      wgmma_wait<0>();  // dV, dK done (with dQ's accumulator in flight too, d = 128 would spill)
      fence_registers<FAP_HEAD_DIM / 2>(&dv[0][0]);
      fence_registers<FAP_HEAD_DIM / 2>(&dk[0][0]);
      ring.release();  // nothing reads this step's Q, dO, LSE and D any more

      // dQ += dS K for this warpgroup's part: 64 queries (a 64-column block of dS^T) x 64 columns (of K).
      const int dq_query0 = FAP_BLOCK_M == 128 ? warpgroup * 64 : 0, dq_col0 = FAP_HEAD_DIM == 128 ? warpgroup * 64 : 0;
      const unsigned int ds_part = shared_address(ds_tile) + dq_query0 / 64 * FAP_BLOCK_N * 128,
                         k_part = k_address + dq_col0 / 64 * FAP_BLOCK_N * 128;
      float dq[8][4];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < FAP_BLOCK_N / 16; ++kk) {
        wgmma_ss<64>(&dq[0][0], mn_major_descriptor<FAP_BLOCK_N>(ds_part, kk), mn_major_descriptor<FAP_BLOCK_N>(k_part, kk),
                     kk > 0, Transpose::kBoth);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_registers<32>(&dq[0][0]);
      // Rows past the sequence hold zeros (their P is 0) and land in the tile's padding.
      float* staging = dq_staging + (stage % kDqStages * 2 + warpgroup) * kDqBytes / 4;
      stage_fragment<8>(staging, dq);
      fence_proxy_async();
      named_barrier_sync(3 + warpgroup, 128);  // the warpgroup's dQ is staged
      if (reduces_dq) {
        bulk_reduce_add(dq_slice + dq_accum_offset(p, s, batch, q0 + dq_query0, head, dq_col0), shared_address(staging),
                        kDqBytes);
        bulk_commit();
      }
      current = next;
    }
    finish_key_block(reduces_dq);

    // dK and dV for this warpgroup's keys.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      store_key_gradients(p, s, batch, kv_head, key0 + key_local[half], half, 0, dk, dv);
    }
    __syncthreads();  // the next key block's loads may overwrite every tile
  }
}

}  // namespace fap
