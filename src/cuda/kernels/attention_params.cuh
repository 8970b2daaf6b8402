// The kernels' argument blocks, shared by the host launcher and the kernel sources (compiled by NVRTC), so they
// are plain C++ with no includes. Strides are in elements. AttentionParams holds what every attention kernel
// reads (the forward needs nothing more); the backward's block extends it with its gradients and workspace.
#pragma once

namespace fap {

struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;   // the forward's output, the backward's input
  float* lse;  // the forward's output (nullptr: not requested), the backward's input
  long long q_batch_stride, q_row_stride, q_head_stride;
  long long k_batch_stride, k_row_stride, k_head_stride;
  long long v_batch_stride, v_row_stride, v_head_stride;
  long long out_batch_stride, out_row_stride, out_head_stride;
  long long lse_batch_stride, lse_head_stride, lse_row_stride;
  const int* cu_seqlens_q;  // nullptr for dense problems
  const int* cu_seqlens_k;
  int seqlen_q, seqlen_k;   // dense lengths, or varlen maxima
  int total_q, total_k;     // varlen: the rows of q (out) and of k (v), which bound cu_seqlens' offsets
  int heads_q, group_size;  // query heads, query heads per kv head
  int head_dim;
  int vector_loads;         // 1 when every row read starts 16-byte aligned and head_dim % 8 == 0
  float scale;              // softmax scale
  float scale_log2;         // scale * log2(e)
  float softcap;            // 0: off
  // Sequences (dense batch or varlen count). Here it fills the padding before the next 8-byte field: the fields
  // after it keep their offsets, which the kernels' register allocation turned out to be sensitive to (Turing's
  // d = 256 backward spilled when they moved).
  int batch;
  long long window_left, window_right;  // normalised; both -1: no window
  const float* alibi;       // nullptr: off
  long long alibi_batch_stride;
  unsigned int dropout_threshold;  // 0: no dropout
  float dropout_scale;             // 1 / (1 - p)
  unsigned long long dropout_seed, dropout_offset;
};

using AttentionFwdParams = AttentionParams;

// The three backward kernels (attention_bwd_common.cuh). Rows of the workspace buffers are "padded rows"
// (attention_bwd_common.cuh).
struct AttentionBwdParams : AttentionParams {
  const void* dout;
  void* dq;
  void* dk;
  void* dv;
  float* dq_accum;  // [splits][...] fp32 (dq_accum_offset in attention_bwd_common.cuh), in the workspace
  float* dsum;      // [head][padded row] rowsum(dout * out), in the workspace (softmax_row_offset)
  float* lse_log2;  // [head][padded row] the forward's LSE in base-2 units, in the workspace
  long long dq_accum_split_stride;
  long long softmax_head_stride;  // of dsum and lse_log2: the padded rows
  long long dout_batch_stride, dout_row_stride, dout_head_stride;
  long long dq_batch_stride, dq_row_stride, dq_head_stride;
  long long dk_batch_stride, dk_row_stride, dk_head_stride;
  long long dv_batch_stride, dv_row_stride, dv_head_stride;
  int* dq_order;     // d = 256 wgmma kernel's deterministic mode: [head][padded row / 64] dQ additions (DqOrder)
  int splits;        // dq_accum slices: 1, or the deterministic mode's CTAs per (batch, kv head)
  int deterministic; // 1: dQ's additions in a fixed order (each CTA into its own slice, or DqOrder)
};

// The S_dmask kernel (attention_probs.cuh): the forward's arguments and the probs tensor (batch, head, rows, cols),
// rows and columns counted within each sequence.
struct AttentionProbsParams : AttentionParams {
  void* probs;
  long long probs_batch_stride, probs_head_stride, probs_row_stride, probs_col_stride;
  int probs_rows, probs_cols;
};

// The decode / KV-cache kernels (attention_decode.cuh, kv_cache_append.cuh): keys found in a cache through
// device-resident indices (each clamped where it is read), the key split's partial results, and the
// KV-cache call's append and rotary embedding.
struct DecodeParams : AttentionParams {
  const int* seqused_k;        // keys per sequence before the append (nullptr: from cu_seqlens_k or seqlen_k)
  const int* leftpad_k;        // nullptr: 0
  const int* cache_batch_idx;  // nullptr: entry = batch
  const int* block_table;      // nullptr: a dense cache
  long long block_table_stride, k_block_stride, v_block_stride;
  int page_size, num_blocks, max_blocks;
  int cache_batch;    // entries of a dense KV cache
  int capacity;       // a KV cache's positions per sequence
  int appended_keys;  // seqlen_new
  int splits;         // key splits per (batch, kv head, row block): 1 writes out directly
  int split_rows;     // rows of the partial buffers per (split, head): batch * seqlen_q, varlen total_q
  float* partial_out;  // [split][head][row][head_dim] fp32, normalised per split, in the workspace
  float* partial_lse;  // [split][head][row] base-2 LSE of each split (-inf: no key)
  // The KV-cache call's append and rotary embedding (kv_cache_append.cuh).
  const void* k_new;
  const void* v_new;
  long long k_new_batch_stride, k_new_row_stride, k_new_head_stride;
  long long v_new_batch_stride, v_new_row_stride, v_new_head_stride;
  const void* rotary_cos;
  const void* rotary_sin;
  long long cos_row_stride, sin_row_stride;
  int rotary_half_dim, rotary_rows, rotary_interleaved;
  int query_positions_by_row;  // 1: q row i sits at cache_seqlens + i (causal or a window); 0: at cache_seqlens
  void* q_rotated;             // (batch, seqlen_q, heads, head_dim) in the workspace; q then points at it
};

}  // namespace fap
