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
