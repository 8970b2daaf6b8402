// The backward's kernels around the main one, shared by the mma.sync (attention_bwd.cuh) and the wgmma
// (attention_bwd_sm90.cuh) main kernels:
//   attention_bwd_preprocess  D = rowsum(dO * O) per (row, head), and the dQ accumulator zeroed
//   attention_bwd_convert     dQ = scale * (sum of the accumulator slices), rounded to the storage type
// and where a batch entry's rows are. Needs FAP_HEAD_DIM and the sources tensor_core.cuh needs, before it.

#define FAP_LOG2E 1.4426950408889634f

namespace fap {

struct SequenceRows {
  int q_start, k_start;  // first row of the sequence in q / k
  int global_row0;       // its first row in the workspace buffers (row counts fit in int, as in FA2)
  int len_q, len_k;
};

__device__ __forceinline__ SequenceRows sequence_rows(const AttentionBwdParams& p, int batch) {
  SequenceRows s;
  if (p.cu_seqlens_q) {
    s.q_start = s.global_row0 = p.cu_seqlens_q[batch];
    s.k_start = p.cu_seqlens_k[batch];
    s.len_q = p.cu_seqlens_q[batch + 1] - s.q_start;
    s.len_k = p.cu_seqlens_k[batch + 1] - s.k_start;
  } else {
    s.q_start = s.k_start = 0;
    s.global_row0 = batch * p.seqlen_q;
    s.len_q = p.seqlen_q;
    s.len_k = p.seqlen_k;
  }
  return s;
}

// Grid (ceil(seqlen_q / 4), batch, heads), 4 warps, one row per warp.
extern "C" __global__ void __launch_bounds__(128) attention_bwd_preprocess(const AttentionBwdParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int batch = blockIdx.y, head = blockIdx.z;
  const SequenceRows s = sequence_rows(p, batch);
  const int row = blockIdx.x * 4 + warp;
  if (row >= s.len_q) return;
  const storage_t* out = static_cast<const storage_t*>(p.out) + batch * p.out_batch_stride +
                         (s.q_start + row) * p.out_row_stride + head * p.out_head_stride;
  const storage_t* dout = static_cast<const storage_t*>(p.dout) + batch * p.dout_batch_stride +
                          (s.q_start + row) * p.dout_row_stride + head * p.dout_head_stride;
  float sum = 0.0f;
  for (int d = lane; d < p.head_dim; d += 32) sum += to_float(out[d]) * to_float(dout[d]);
  for (int step = 16; step > 0; step /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, step);
  const long long slot = (long long)(s.global_row0 + row) * p.heads_q + head;
  if (lane == 0) p.dsum[slot] = sum;
  for (int split = 0; split < p.splits; ++split)
    for (int d = lane; d < FAP_HEAD_DIM; d += 32) p.dq_accum[split * p.dq_accum_split_stride + slot * FAP_HEAD_DIM + d] = 0.0f;
}

// Grid (ceil(seqlen_q / 4), batch, heads), 4 warps, one row per warp.
extern "C" __global__ void __launch_bounds__(128) attention_bwd_convert(const AttentionBwdParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int batch = blockIdx.y, head = blockIdx.z;
  const SequenceRows s = sequence_rows(p, batch);
  const int row = blockIdx.x * 4 + warp;
  if (row >= s.len_q) return;
  const long long slot = (long long)(s.global_row0 + row) * p.heads_q + head;
  storage_t* dq = static_cast<storage_t*>(p.dq) + batch * p.dq_batch_stride + (s.q_start + row) * p.dq_row_stride +
                  head * p.dq_head_stride;
  for (int d = lane; d < p.head_dim; d += 32) {
    float sum = 0.0f;
    for (int split = 0; split < p.splits; ++split) sum += p.dq_accum[split * p.dq_accum_split_stride + slot * FAP_HEAD_DIM + d];
    dq[d] = from_float(sum * p.scale);
  }
}

// P for one (row, key) from the raw product q.k, the forward's LSE (base-2 units) and, when MASKED, the
// mask; `cap_derivative` gets the softcap's derivative (1 without softcap).
template <bool MASKED>
__device__ __forceinline__ float backward_probability(float x, const AttentionBwdParams& p, const SequenceRows& s,
                                                      float slope, int row, int key, float lse_log2,
                                                      float* cap_derivative) {
  *cap_derivative = 1.0f;
#if FAP_SOFTCAP || FAP_ALIBI
  x *= p.scale;
#if FAP_SOFTCAP
  const float capped = tanhf(x / p.softcap);
  x = p.softcap * capped;
  *cap_derivative = 1.0f - capped * capped;
#endif
#if FAP_ALIBI
  x -= slope * (float)abs(row + s.len_k - s.len_q - key);  // mask.h's alibi_bias
#endif
  x *= FAP_LOG2E;
#else
  x *= p.scale_log2;
#endif
  float prob = fast_exp2(x - lse_log2);
  if (MASKED) {
    bool allowed = key < s.len_k;
#if FAP_WINDOW
    const int diagonal = row + s.len_k - s.len_q;  // windows are normalised to at most max_seqlen_k: int
    allowed = allowed && key >= diagonal - (int)p.window_left && key <= diagonal + (int)p.window_right;
#endif
    if (!allowed) prob = 0.0f;
  }
  return prob;
}

}  // namespace fap
