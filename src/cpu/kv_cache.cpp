// The KV-cache call's first steps on the CPU: the new keys and values written into the caches (the keys
// rotated) and q rotated into the workspace, after which the call is an ordinary forward over the caches.
#include <cstdint>

#include "core/half.h"
#include "core/rotary.h"
#include "src/cpu/cpu_attention.h"

namespace fap::cpu {
namespace {

// Copies one head's row of head_dim elements, rotated by the angles of `position` when rotary is given (dims
// past rotary_dim copied).
void copy_row(const AttentionProblem& p, const RotaryTable* rotary, const void* source, int64_t source_offset,
              void* target, int64_t target_offset, int64_t position) {
  const int half = rotary ? static_cast<int>(rotary->half_dim) : 0;
  for (int c = 0; c < p.head_dim; ++c) {
    float value = load_as_float(p.dtype, source, source_offset + c);
    if (c < 2 * half) {
      const RotaryPair pair = rotary_pair(c, half, rotary->interleaved);
      const float cos = load_as_float(p.dtype, rotary->cos, position * rotary->cos_row_stride + pair.angle);
      const float sin = load_as_float(p.dtype, rotary->sin, position * rotary->sin_row_stride + pair.angle);
      value = rotate_element(value, load_as_float(p.dtype, source, source_offset + pair.partner), cos, sin, pair.first);
    }
    store_from_float(p.dtype, target, target_offset + c, value);
  }
}

}  // namespace

size_t prepare_kv_cache(const AttentionProblem& p, void* workspace, AttentionProblem* attention) {
  WorkspaceCarver carver(workspace);
  const bool rotary = p.cache.rotary.half_dim > 0;
  const int64_t row = p.heads_q * p.head_dim;  // the rotated q is (batch, seqlen_q, heads, head_dim), contiguous
  char* rotated_q =
      rotary ? carver.take<char>(static_cast<size_t>(p.batch * p.seqlen_q * row * dtype_bytes(p.dtype))) : nullptr;
  if (!workspace) return carver.bytes();

  *attention = p;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t cached = p.seqused_k[b];
    for (int64_t t = 0; t < p.cache.rows; ++t)
      for (int64_t h = 0; h < p.heads_kv; ++h) {
        const int64_t position = cached + t;
        const Operand& k = p.cache.k;
        const Operand& v = p.cache.v;
        const int64_t k_source = b * k.batch_stride + t * k.row_stride + h * k.head_stride;
        const int64_t v_source = b * v.batch_stride + t * v.row_stride + h * v.head_stride;
        const RotaryTable* key_rotary = rotary ? &p.cache.rotary : nullptr;  // v is never rotated
        copy_row(p, key_rotary, k.data, k_source, p.k.data, p.position_offset(p.k, b, position, h), position);
        copy_row(p, nullptr, v.data, v_source, p.v.data, p.position_offset(p.v, b, position, h), position);
      }
    if (!rotary) continue;
    for (int64_t i = 0; i < p.seqlen_q; ++i)
      for (int64_t h = 0; h < p.heads_q; ++h) {
        // FlashAttention-2: with causal or a window, query row i sits at position cache_seqlens + i; else every
        // row at cache_seqlens.
        const int64_t position = cached + (p.window.active() ? i : 0);
        copy_row(p, &p.cache.rotary, p.q.data, b * p.q.batch_stride + i * p.q.row_stride + h * p.q.head_stride, rotated_q,
                 (b * p.seqlen_q + i) * row + h * p.head_dim, position);
      }
  }
  if (rotary) attention->q = Operand{rotated_q, p.seqlen_q * row, row, p.head_dim};
  return carver.bytes();
}

}  // namespace fap::cpu
