// Where a sequence's keys lie when they are found through device-resident indices (a paged cache's block table,
// a KV cache's entries, used key counts, left padding), shared by the decode kernel and the forward kernel's
// indexed-keys configuration: every index is clamped to the cache where it is read, so that no value in device
// memory can make a kernel read out of bounds.
#pragma once

#include "attention_fwd_common.cuh"

namespace fap {

__device__ __forceinline__ int clamp_to(int x, int low, int high) { return x < low ? low : (x > high ? high : x); }

// One batch entry's keys. seq.k_start is the first cache position used (leftpad_k), seq.len_k the keys used;
// k_base / v_base place the sequence's cache entry and kv head.
struct CacheSequence {
  ForwardSequence seq;
  long long k_base, v_base;
};

__device__ __forceinline__ CacheSequence cache_sequence(const DecodeParams& p, int batch, int kv_head) {
  CacheSequence d;
  ForwardSequence& s = d.seq;
  s = sequence_info<long long>(p, batch);  // the query side; keys: cu_seqlens_k's count or the dense capacity
  const int capacity = p.block_table ? p.max_blocks * p.page_size : s.len_k;
  const int used = clamp_to(p.seqused_k ? p.seqused_k[batch] + p.appended_keys : s.len_k, 0, capacity);
  const int pad = p.leftpad_k ? clamp_to(p.leftpad_k[batch], 0, used) : 0;
  s.k_start = (p.block_table ? 0 : s.k_start) + pad;
  s.len_k = used - pad;
  s.offset = s.len_k - s.len_q;
  d.k_base = kv_head * p.k_head_stride;
  d.v_base = kv_head * p.v_head_stride;
  if (!p.block_table) {
    const int entry = p.cache_batch_idx ? clamp_to(p.cache_batch_idx[batch], 0, p.cache_batch - 1) : batch;
    d.k_base += entry * p.k_batch_stride;
    d.v_base += entry * p.v_batch_stride;
  }
  return d;
}

// Where key `key` (< seq.len_k) of the sequence starts in k and v: through the block table (the block index
// clamped) or the cache entry's rows. The block-table entry is a load of its own (key_block) so that a loop can
// issue it ahead of the copies that need it.
struct KeyRowOffsets {
  long long k, v;
};

// The unclamped block-table entry holding key `key` (< seq.len_k) of a paged cache; 0 for other caches.
__device__ __forceinline__ int key_block(const DecodeParams& p, const CacheSequence& d, int batch, int key) {
  if (!p.block_table) return 0;
  return p.block_table[batch * p.block_table_stride + ((int)d.seq.k_start + key) / p.page_size];
}

__device__ __forceinline__ KeyRowOffsets key_row_offsets(const DecodeParams& p, const CacheSequence& d, int key,
                                                         int block) {
  const int position = (int)d.seq.k_start + key;
  if (p.block_table) {
    block = clamp_to(block, 0, p.num_blocks - 1);
    const int row = position % p.page_size;
    return {d.k_base + block * p.k_block_stride + row * p.k_row_stride,
            d.v_base + block * p.v_block_stride + row * p.v_row_stride};
  }
  return {d.k_base + position * p.k_row_stride, d.v_base + position * p.v_row_stride};
}

// The same, looking the block-table entry up on the spot.
__device__ __forceinline__ KeyRowOffsets lookup_key_row_offsets(const DecodeParams& p, const CacheSequence& d,
                                                                int batch, int key) {
  return key_row_offsets(p, d, key, key_block(p, d, batch, key));
}

// Copies 8 elements of a K and a V row into shared memory: 16-byte copies (with the L2 prefetching the line)
// when vector_loads, else element copies; zeros where !valid or past head_dim.
__device__ __forceinline__ void copy_key_chunk(storage_t* k_target, storage_t* v_target, const DecodeParams& p,
                                               const KeyRowOffsets& rows, int col, bool valid) {
  const storage_t* k = static_cast<const storage_t*>(p.k) + rows.k + col;
  const storage_t* v = static_cast<const storage_t*>(p.v) + rows.v + col;
  if (p.vector_loads) {
    cp_async_16_or_zero_streaming(k_target, k, valid && col < p.head_dim);
    cp_async_16_or_zero_streaming(v_target, v, valid && col < p.head_dim);
  } else {
    for (int e = 0; e < 8; ++e) {
      const bool inside = valid && col + e < p.head_dim;
      k_target[e] = inside ? k[e] : (storage_t)0;
      v_target[e] = inside ? v[e] : (storage_t)0;
    }
  }
}

}  // namespace fap
