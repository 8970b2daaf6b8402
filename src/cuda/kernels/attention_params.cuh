// The argument block of the forward kernel, shared by the host launcher and the kernel source (compiled
// by NVRTC), so it is plain C++ with no includes. Strides are in elements.
#pragma once

namespace fap {

struct AttentionFwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // nullptr: not requested
  long long q_batch_stride, q_row_stride, q_head_stride;
  long long k_batch_stride, k_row_stride, k_head_stride;
  long long v_batch_stride, v_row_stride, v_head_stride;
  long long out_batch_stride, out_row_stride, out_head_stride;
  long long lse_batch_stride, lse_head_stride, lse_row_stride;
  const int* cu_seqlens_q;  // nullptr for dense problems
  const int* cu_seqlens_k;
  int seqlen_q, seqlen_k;   // dense lengths, or varlen maxima
  int heads_q, group_size;  // query heads, query heads per kv head
  int head_dim;
  int vector_loads;         // 1 when every row starts 16-byte aligned and head_dim % 8 == 0
  float scale;              // softmax scale
  float scale_log2;         // scale * log2(e)
  float softcap;            // 0: off
  long long window_left, window_right;  // normalised; both -1: no window
  const float* alibi;       // nullptr: off
  long long alibi_batch_stride;
  unsigned int dropout_threshold;  // 0: no dropout
  float dropout_scale;             // 1 / (1 - p)
  unsigned long long dropout_seed, dropout_offset;
};

}  // namespace fap

namespace fap {

// The argument block of the three backward kernels (attention_bwd.cuh). Rows of the workspace buffers are
// "global rows": batch * seqlen_q + row for dense problems, the absolute row for varlen ones.
struct AttentionBwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* dout;
  const float* lse;
  void* dq;
  void* dk;
  void* dv;
  float* dq_accum;  // [splits][...] fp32 (dq_accum_offset in attention_bwd_common.cuh), in the workspace
  float* dsum;      // [head][padded row] rowsum(dout * out), in the workspace (softmax_row_offset)
  float* lse_log2;  // [head][padded row] the forward's LSE in base-2 units, in the workspace
  long long dq_accum_split_stride;
  long long softmax_head_stride;  // of dsum and lse_log2: the padded rows
  long long q_batch_stride, q_row_stride, q_head_stride;
  long long k_batch_stride, k_row_stride, k_head_stride;
  long long v_batch_stride, v_row_stride, v_head_stride;
  long long out_batch_stride, out_row_stride, out_head_stride;
  long long dout_batch_stride, dout_row_stride, dout_head_stride;
  long long dq_batch_stride, dq_row_stride, dq_head_stride;
  long long dk_batch_stride, dk_row_stride, dk_head_stride;
  long long dv_batch_stride, dv_row_stride, dv_head_stride;
  long long lse_batch_stride, lse_head_stride, lse_row_stride;
  const int* cu_seqlens_q;  // nullptr for dense problems
  const int* cu_seqlens_k;
  int seqlen_q, seqlen_k;   // dense lengths, or varlen maxima
  int heads_q, group_size;
  int head_dim;
  int splits;               // dq_accum slices: 1, or the deterministic mode's CTAs per (batch, kv head)
  int deterministic;        // 1: each CTA adds into its own slice, in a fixed order
  int vector_loads;         // 1 when every row of q, k, v, dout starts 16-byte aligned and head_dim % 8 == 0
  float scale, scale_log2;
  float softcap;
  long long window_left, window_right;
  const float* alibi;
  long long alibi_batch_stride;
  unsigned int dropout_threshold;
  float dropout_scale;
  unsigned long long dropout_seed, dropout_offset;
};

}  // namespace fap
