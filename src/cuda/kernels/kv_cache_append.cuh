// The KV-cache call's first step (FlashAttention-2's flash_attn_with_kvcache with k and v): the new keys and
// values are written into the cache at each sequence's cache_seqlens (a dense entry or a paged block), the keys
// rotated, and with a rotary table q is rotated into the workspace for the attention to read. One CTA per new
// key row (batch, t), then, with rotary, one per query row (batch, i); threads walk (head, dim).
//
// Indices come from device memory and are never trusted: a position past the cache, a cache entry or block
// index out of range writes nothing; rotary positions are clamped to the table.
#pragma once

#include "core/rotary.h"
#include "tensor_core.cuh"

namespace fap {

// Element `dim` of a row, rotated by the angles of `position` when dim < rotary_dim.
__device__ __forceinline__ float rotated_element(const DecodeParams& p, const storage_t* row, int dim, int position) {
  const float x = to_float(row[dim]);
  if (dim >= 2 * p.rotary_half_dim) return x;
  const RotaryPair pair = rotary_pair(dim, p.rotary_half_dim, p.rotary_interleaved != 0);
  position = position < 0 ? 0 : (position >= p.rotary_rows ? p.rotary_rows - 1 : position);
  const float cos = to_float(static_cast<const storage_t*>(p.rotary_cos)[position * p.cos_row_stride + pair.angle]);
  const float sin = to_float(static_cast<const storage_t*>(p.rotary_sin)[position * p.sin_row_stride + pair.angle]);
  return rotate_element(x, to_float(row[pair.partner]), cos, sin, pair.first);
}

// Where cache position `position` of sequence `batch` starts in k and v (head 0); false when an index is out of
// range (nothing may be written).
__device__ __forceinline__ bool cache_row(const DecodeParams& p, int batch, int position, long long* k_offset,
                                          long long* v_offset) {
  if (p.block_table) {
    if (position < 0 || position >= p.max_blocks * p.page_size) return false;
    const int block = p.block_table[batch * p.block_table_stride + position / p.page_size];
    if (block < 0 || block >= p.num_blocks) return false;
    const int row = position % p.page_size;
    *k_offset = block * p.k_block_stride + row * p.k_row_stride;
    *v_offset = block * p.v_block_stride + row * p.v_row_stride;
    return true;
  }
  if (position < 0 || position >= p.capacity) return false;
  const int entry = p.cache_batch_idx ? p.cache_batch_idx[batch] : batch;
  if (entry < 0 || entry >= p.cache_batch) return false;
  *k_offset = entry * p.k_batch_stride + (long long)position * p.k_row_stride;
  *v_offset = entry * p.v_batch_stride + (long long)position * p.v_row_stride;
  return true;
}

extern "C" __global__ void __launch_bounds__(128) kv_cache_append(const DecodeParams p) {
  const int append_blocks = p.batch * p.appended_keys;
  const int heads_kv = p.heads_q / p.group_size;
  if ((int)blockIdx.x < append_blocks) {
    const int batch = blockIdx.x / p.appended_keys, t = blockIdx.x % p.appended_keys;
    const int position = p.seqused_k[batch] + t;
    long long k_offset = 0, v_offset = 0;
    if (!cache_row(p, batch, position, &k_offset, &v_offset)) return;
    storage_t* k = static_cast<storage_t*>(const_cast<void*>(p.k)) + k_offset;
    storage_t* v = static_cast<storage_t*>(const_cast<void*>(p.v)) + v_offset;
    const storage_t* k_new = static_cast<const storage_t*>(p.k_new) + batch * p.k_new_batch_stride + t * p.k_new_row_stride;
    const storage_t* v_new = static_cast<const storage_t*>(p.v_new) + batch * p.v_new_batch_stride + t * p.v_new_row_stride;
    for (int e = threadIdx.x; e < heads_kv * p.head_dim; e += blockDim.x) {
      const int head = e / p.head_dim, dim = e % p.head_dim;
      k[head * p.k_head_stride + dim] = from_float(rotated_element(p, k_new + head * p.k_new_head_stride, dim, position));
      v[head * p.v_head_stride + dim] = v_new[head * p.v_new_head_stride + dim];
    }
    return;
  }
  // A query row, rotated into the workspace's (batch, seqlen_q, heads, head_dim) copy.
  const int row = blockIdx.x - append_blocks;
  const int batch = row / p.seqlen_q, i = row % p.seqlen_q;
  const int position = p.seqused_k[batch] + (p.query_positions_by_row ? i : 0);
  const storage_t* q = static_cast<const storage_t*>(p.q) + batch * p.q_batch_stride + i * p.q_row_stride;
  storage_t* target = static_cast<storage_t*>(p.q_rotated) + (long long)row * p.heads_q * p.head_dim;
  for (int e = threadIdx.x; e < p.heads_q * p.head_dim; e += blockDim.x) {
    const int head = e / p.head_dim, dim = e % p.head_dim;
    target[e] = from_float(rotated_element(p, q + head * p.q_head_stride, dim, position));
  }
}

}  // namespace fap
