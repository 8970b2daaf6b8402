// Shared-memory layouts of the mma.sync kernels (attention_fwd, attention_bwd, attention_decode), from their
// compile-time parameters. The kernels take their tiles' places from these and the host its dynamic
// shared-memory size (attention_config.cpp), so each layout has one definition. Plain C++ for the host and NVRTC;
// tile offsets count 2-byte elements from the start of dynamic shared memory, sizes are in bytes.
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

}  // namespace fap
