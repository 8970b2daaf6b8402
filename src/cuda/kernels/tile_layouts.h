// Shared-memory layouts of the kernels, from their compile-time parameters: the mma.sync kernels'
// (attention_fwd, attention_bwd, attention_decode) and the wgmma kernels' (attention_fwd_sm90,
// attention_bwd_sm90(_wide)). The kernels take their tiles' places from these and the host its dynamic
// shared-memory size (attention_config.cpp), so each layout has one definition. Plain C++ for the host and NVRTC.
// The mma.sync layouts' tile offsets count 2-byte elements from the start of dynamic shared memory; the wgmma
// layouts' count bytes from its first 1024-byte boundary. Sizes are in bytes.
#pragma once

#include "core/host_device.h"

namespace fap {

// Tile rows padded by 8 elements (16 bytes): ldmatrix's eight row addresses then fall in distinct banks.
FAP_HOST_DEVICE constexpr int padded_row(int columns) { return columns + 8; }

// attention_fwd: the Q tile, `stages` K tiles, as many V tiles, then a slot for the CTA's keys and sequence.
struct ForwardSharedLayout {
  int block_m, block_n, head_dim, stages, cta_keys_bytes;

  FAP_HOST_DEVICE constexpr int key_tile() const { return block_n * padded_row(head_dim); }  // one K or V stage
  FAP_HOST_DEVICE constexpr int k_tiles() const { return block_m * padded_row(head_dim); }
  FAP_HOST_DEVICE constexpr int v_tiles() const { return k_tiles() + stages * key_tile(); }
  FAP_HOST_DEVICE constexpr int cta_keys_offset_bytes() const { return (v_tiles() + stages * key_tile()) * 2; }
  FAP_HOST_DEVICE constexpr int bytes() const { return cta_keys_offset_bytes() + cta_keys_bytes; }
};

// attention_bwd: the key block's K and V tiles, `q_stages` Q tiles and `do_stages` dO tiles of the query block,
// the dS^T tile ([key][query]) and, unless P^T stays in registers, the P^T tile; then a float per query row of
// every Q stage (LSE) and dO stage (D).
struct BackwardSharedLayout {
  int block_m, block_n, head_dim, q_stages, do_stages;
  bool pt_in_registers;

  FAP_HOST_DEVICE constexpr int transposed_tile() const { return block_n * padded_row(block_m); }  // dS^T or P^T
  FAP_HOST_DEVICE constexpr int v_tile() const { return block_n * padded_row(head_dim); }
  FAP_HOST_DEVICE constexpr int q_tiles() const { return 2 * v_tile(); }
  FAP_HOST_DEVICE constexpr int do_tiles() const { return q_tiles() + q_stages * block_m * padded_row(head_dim); }
  FAP_HOST_DEVICE constexpr int ds_tile() const { return do_tiles() + do_stages * block_m * padded_row(head_dim); }
  FAP_HOST_DEVICE constexpr int p_tile() const { return ds_tile() + transposed_tile(); }
  FAP_HOST_DEVICE constexpr int row_floats_offset_bytes() const {
    return (p_tile() + (pt_in_registers ? 0 : transposed_tile())) * 2;
  }
  FAP_HOST_DEVICE constexpr int bytes() const {
    return row_floats_offset_bytes() + (q_stages + do_stages) * block_m * 4;
  }
};

// attention_decode: the tile of kRows packed query rows, then each warp's `stages` stages of a K and a V tile.
// After the keys, the warps' fp32 outputs and row maxima and sums for the merge take the stages' place.
struct DecodeSharedLayout {
  static constexpr int kRows = 16;  // packed rows per CTA: one mma row tile
  int head_dim, block_n, stages, warps;

  FAP_HOST_DEVICE constexpr int kv_tile() const { return block_n * padded_row(head_dim); }
  FAP_HOST_DEVICE constexpr int stages_offset() const { return kRows * padded_row(head_dim); }  // warp 0's
  FAP_HOST_DEVICE constexpr int warp_stages() const { return stages * 2 * kv_tile(); }         // one warp's
  FAP_HOST_DEVICE constexpr int merge_bytes() const { return warps * kRows * (head_dim + 2) * 4; }
  FAP_HOST_DEVICE constexpr int bytes() const {
    const int stages_bytes = warps * warp_stages() * 2;
    return stages_offset() * 2 + (stages_bytes > merge_bytes() ? stages_bytes : merge_bytes());
  }
};

// The wgmma kernels' tiles are unpadded (128-byte swizzle) and start at a 1024-byte boundary, which the swizzle
// atoms need: the host asks for this much more than the layout, and the kernel skips to the boundary.
constexpr int kSwizzleAlignmentSlack = 1024;

// attention_fwd_sm90: the Q tile, `stages` K tiles, `stages` V tiles, then the pipeline's mbarriers (q_full,
// q_empty, then full and empty of each K and each V stage).
struct HopperForwardSharedLayout {
  int block_m, block_n, head_dim, stages;

  static constexpr int kBarrierBytes = 128;
  FAP_HOST_DEVICE constexpr int q_tile_bytes() const { return block_m * head_dim * 2; }
  FAP_HOST_DEVICE constexpr int kv_tile_bytes() const { return block_n * head_dim * 2; }  // one K or V stage
  FAP_HOST_DEVICE constexpr int k_tiles() const { return q_tile_bytes(); }
  FAP_HOST_DEVICE constexpr int v_tiles() const { return k_tiles() + stages * kv_tile_bytes(); }
  FAP_HOST_DEVICE constexpr int barriers() const { return v_tiles() + stages * kv_tile_bytes(); }
  FAP_HOST_DEVICE constexpr bool barriers_fit() const { return (2 + 4 * stages) * 8 <= kBarrierBytes; }
  FAP_HOST_DEVICE constexpr int bytes() const { return barriers() + kBarrierBytes + kSwizzleAlignmentSlack; }
};

// attention_bwd_sm90 and attention_bwd_sm90_wide: the key block's K and V tiles, two stages of Q tiles and two of
// dO tiles, `score_tiles` [key][query] tiles (dS^T; at d = 256 P^T and dS^T, two of each), `dq_stages` buffers of
// both warpgroups' 64 x 64 fp32 dQ parts, two stages of LSE rows and two of D rows, then the stage ring's four
// mbarriers.
struct HopperBackwardSharedLayout {
  int block_m, block_n, head_dim, score_tiles, dq_stages;

  FAP_HOST_DEVICE constexpr int kv_tile_bytes() const { return block_n * head_dim * 2; }
  FAP_HOST_DEVICE constexpr int q_tile_bytes() const { return block_m * head_dim * 2; }  // a Q or dO stage
  FAP_HOST_DEVICE constexpr int score_tile_bytes() const { return block_n * block_m * 2; }
  FAP_HOST_DEVICE constexpr int dq_stage_bytes() const { return 2 * 64 * 64 * 4; }
  FAP_HOST_DEVICE constexpr int k_tile() const { return 0; }
  FAP_HOST_DEVICE constexpr int v_tile() const { return kv_tile_bytes(); }
  FAP_HOST_DEVICE constexpr int q_tiles() const { return 2 * kv_tile_bytes(); }
  FAP_HOST_DEVICE constexpr int do_tiles() const { return q_tiles() + 2 * q_tile_bytes(); }
  FAP_HOST_DEVICE constexpr int score_tiles_offset() const { return do_tiles() + 2 * q_tile_bytes(); }
  FAP_HOST_DEVICE constexpr int dq_staging() const { return score_tiles_offset() + score_tiles * score_tile_bytes(); }
  FAP_HOST_DEVICE constexpr int lse_rows() const { return dq_staging() + dq_stages * dq_stage_bytes(); }
  FAP_HOST_DEVICE constexpr int dsum_rows() const { return lse_rows() + 2 * block_m * 4; }
  FAP_HOST_DEVICE constexpr int stage_ring() const { return dsum_rows() + 2 * block_m * 4; }
  FAP_HOST_DEVICE constexpr int bytes() const { return stage_ring() + 4 * 8 + kSwizzleAlignmentSlack; }
};

// Whether attention_bwd_sm90 hands the Q/dO stages over through mbarriers (the warpgroups drift apart within a
// step, so dS^T is double-buffered, which at d = 64 leaves room for one dQ staging buffer per warpgroup), or, at
// d = 64 with softcap or ALiBi, whose registers that would spill, by a CTA barrier at the top of each step (one
// dS^T tile, two dQ staging buffers).
FAP_HOST_DEVICE constexpr bool hopper_backward_stage_mbarriers(int head_dim, bool softcap, bool alibi) {
  return head_dim == 128 || !(softcap || alibi);
}

// The layout of a wgmma backward configuration: at d = 256 (attention_bwd_sm90_wide) two P^T and two dS^T tiles,
// with dQ staged in the Q and dO tiles; below, as hopper_backward_stage_mbarriers decides.
FAP_HOST_DEVICE constexpr HopperBackwardSharedLayout hopper_backward_layout(int block_m, int block_n, int head_dim,
                                                                            bool softcap, bool alibi) {
  if (head_dim == 256) return {block_m, block_n, head_dim, 4, 0};
  const bool stage_mbarriers = hopper_backward_stage_mbarriers(head_dim, softcap, alibi);
  return {block_m, block_n, head_dim, stage_mbarriers ? 2 : 1, head_dim == 128 || !stage_mbarriers ? 2 : 1};
}

}  // namespace fap
