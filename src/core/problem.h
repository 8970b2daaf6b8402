// AttentionProblem: one validated, normalised description of a forward or backward call. The C API builds
// it once (validate.cpp) and every backend reads only this struct, so shape rules, window normalisation and
// defaults live in one place.
#pragma once

#include <cstdint>

#include "core/mask.h"
#include "flash_attn_plus/flash_attn_plus.h"

namespace fap {

// Bytes of one element of a fap_dtype: 4 for float32 and int32, 2 for float16 and bfloat16.
inline int64_t dtype_bytes(int32_t dtype) { return dtype == FAP_DTYPE_FLOAT32 || dtype == FAP_DTYPE_INT32 ? 4 : 2; }

// A (batch, row, head, dim) operand with a unit-stride last dimension. For varlen problems the batch stride
// is 0 and rows are absolute (a sequence starts at its cu_seqlens entry).
struct Operand {
  void* data = nullptr;
  int64_t batch_stride = 0, row_stride = 0, head_stride = 0;
  int64_t block_stride = 0;  // k, v of a paged KV cache: between its blocks (rows count within a block)
};

// softmax_lse, addressed as (batch, head, row) for both dense (B, H, Sq) and varlen (H, total_q) layouts.
struct LseView {
  float* data = nullptr;
  int64_t batch_stride = 0, head_stride = 0, row_stride = 0;
};

// attn_probs (batch, head, row, col): rows and cols count within each sequence.
struct ProbsView {
  void* data = nullptr;
  int64_t rows = 0, cols = 0;
  int64_t batch_stride = 0, head_stride = 0, row_stride = 0, col_stride = 0;
};

struct SequenceExtent {
  int64_t q_start, k_start;  // first row of this sequence in q/k (0 for dense problems)
  int64_t len_q, len_k;
};

// A rotary embedding table (cos and sin, (rows, half_dim) in q's dtype): pairs of dims turn by angles
// that depend on the position.
struct RotaryTable {
  const void* cos = nullptr;
  const void* sin = nullptr;
  int64_t rows = 0, half_dim = 0;  // half_dim = rotary_dim / 2 (0: no rotary)
  int64_t cos_row_stride = 0, sin_row_stride = 0;
  bool interleaved = true;  // pairs (2i, 2i + 1); else (i, i + half_dim)
};

// The KV-cache call's append: new keys and values written into the caches at each sequence's cache_seqlens,
// rotated with q first when rotary.half_dim > 0.
struct CacheAppend {
  Operand k, v;       // (batch, rows, heads_k, head_dim)
  int64_t rows = 0;   // seqlen_new (0: nothing appended)
  RotaryTable rotary;
};

enum class Direction { kForward, kBackward };

// What a kernel configuration depends on: never batch size or sequence lengths.
struct KernelFeatures {
  Direction direction = Direction::kForward;
  fap_dtype dtype = FAP_DTYPE_FLOAT16;
  int64_t head_dim = 0;
  bool window = false, softcap = false, alibi = false, dropout = false;
};

struct AttentionProblem {
  Direction direction = Direction::kForward;
  fap_dtype dtype = FAP_DTYPE_FLOAT16;
  fap_device_type device_type = FAP_DEVICE_CPU;
  int32_t device_index = 0;
  bool varlen = false;

  int64_t batch = 0, heads_q = 0, heads_kv = 0, head_dim = 0;
  int64_t seqlen_q = 0, seqlen_k = 0;  // dense: the sequence lengths; varlen: max_seqlen_q / max_seqlen_k
  int64_t total_q = 0, total_k = 0;    // rows of the q / k tensors per batch entry (varlen: all rows)
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  const int32_t* seqused_k = nullptr;    // varlen forward: keys each sequence uses (else its cu_seqlens_k count)
  const int32_t* block_table = nullptr;  // a paged KV cache: (batch, max_blocks)
  int64_t block_table_stride = 0, page_size = 0, num_blocks = 0, max_blocks = 0;
  // The KV-cache call (dense): seqused_k holds cache_seqlens, and sequence b uses the cache positions
  // [leftpad_k[b], seqused_k[b] + cache.rows) of cache entry cache_batch_idx[b].
  bool kv_cache = false;
  const int32_t* cache_batch_idx = nullptr;
  const int32_t* leftpad_k = nullptr;
  int64_t cache_batch = 0;  // entries of a dense cache
  CacheAppend cache;
  int32_t num_splits = 0;

  Operand q, k, v, out;
  Operand dout, dq, dk, dv;  // backward only
  LseView lse;
  ProbsView probs;

  float softmax_scale = 1.0f;
  float softcap = 0.0f;  // 0: off
  AttentionWindow window;
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch_stride = 0;  // 0 when the slopes are shared across the batch
  float dropout_p = 0.0f;
  uint64_t dropout_seed = 0, dropout_offset = 0;
  bool deterministic = false;

  KernelFeatures features() const {
    KernelFeatures f;
    f.direction = direction;
    f.dtype = dtype;
    f.head_dim = head_dim;
    f.window = window.active();
    f.softcap = softcap > 0.0f;
    f.alibi = alibi_slopes != nullptr;
    f.dropout = dropout_p > 0.0f;
    return f;
  }

  int64_t group_size() const { return heads_q / heads_kv; }
  int64_t kv_head(int64_t head) const { return head / group_size(); }

  // Read on the host: for problems whose index tensors are in host memory (the CPU backend's).
  SequenceExtent sequence(int64_t b) const {
    SequenceExtent seq{0, 0, seqlen_q, seqlen_k};
    if (varlen) {
      seq = {cu_seqlens_q[b], cu_seqlens_k[b], cu_seqlens_q[b + 1] - cu_seqlens_q[b],
             cu_seqlens_k[b + 1] - cu_seqlens_k[b]};
    }
    if (seqused_k) seq.len_k = seqused_k[b] + cache.rows;
    if (leftpad_k) {
      seq.k_start += leftpad_k[b];
      seq.len_k -= leftpad_k[b];
    }
    return seq;
  }

  // The cache position of key t of sequence b (a paged cache: counted from the sequence's first block).
  int64_t cache_position(const SequenceExtent& seq, int64_t t) const { return block_table ? t : seq.k_start + t; }

  // The element offset of cache position `position` of sequence b, head h, in k or v (a paged cache: through the
  // block table; a dense KV cache: in entry cache_batch_idx[b]).
  int64_t position_offset(const Operand& o, int64_t b, int64_t position, int64_t h) const {
    if (block_table) {
      const int64_t block = block_table[b * block_table_stride + position / page_size];
      return block * o.block_stride + (position % page_size) * o.row_stride + h * o.head_stride;
    }
    const int64_t entry = cache_batch_idx ? cache_batch_idx[b] : b;
    return entry * o.batch_stride + position * o.row_stride + h * o.head_stride;
  }

  // The element offset of key t of sequence b, head h, in k or v.
  int64_t key_offset(const Operand& o, int64_t b, const SequenceExtent& seq, int64_t t, int64_t h) const {
    return position_offset(o, b, cache_position(seq, t), h);
  }

  float alibi_slope(int64_t b, int64_t head) const {
    return alibi_slopes ? alibi_slopes[b * alibi_batch_stride + head] : 0.0f;
  }
};

}  // namespace fap
