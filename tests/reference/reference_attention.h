// A float64 reference of FlashAttention-2's forward and its analytic backward, written as the plain
// definition (full score matrix per (sequence, head)), for checking every backend.
//
// The same code also models "the same computation done by plain PyTorch in fp16/bf16" (FA2's tests'
// attention_ref with upcast=False): pass a Rounding that rounds to the dtype, and every intermediate tensor
// that PyTorch would materialise in that dtype is rounded. FA2's correctness rule compares a kernel's error
// against that computation's error, both measured against the exact (identity-rounding) reference.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace fap::test {

using Rounding = std::function<double(double)>;
inline double no_rounding(double value) { return value; }

// Tensors are contiguous (rows, heads, head_dim) arrays of all sequences' rows back to back.
struct ReferenceProblem {
  int64_t batch = 1, heads_q = 1, heads_kv = 1, head_dim = 1;
  std::vector<int64_t> q_start, k_start, len_q, len_k;  // per sequence
  int64_t total_q = 0, total_k = 0;
  int64_t max_seqlen_k = 0;  // window normalisation uses it, as FlashAttention-2 does
  double scale = 1.0, softcap = 0.0;
  bool causal = false;
  int64_t window_left = -1, window_right = -1;
  std::vector<float> alibi_slopes;  // empty, heads_q, or batch * heads_q values
  double dropout_p = 0.0;
  uint64_t dropout_seed = 0, dropout_offset = 0;
};

struct ReferenceForward {
  std::vector<double> out;   // (total_q, heads_q, head_dim)
  std::vector<double> lse;   // (heads_q, total_q); +inf for empty rows
  std::vector<double> row_max;  // (heads_q, total_q): max score of each row, -inf for empty rows
};

struct ReferenceGradients {
  std::vector<double> dq, dk, dv;
};

ReferenceForward reference_forward(const ReferenceProblem& problem, const std::vector<double>& q,
                                   const std::vector<double>& k, const std::vector<double>& v,
                                   const Rounding& round = no_rounding);

// With `out` given, rowsum(dP * P) is computed as rowsum(dout * out) from it, as FlashAttention's backward
// does from the forward's stored output: passing the exact output rounded to a dtype measures the error
// that storing `out` in that dtype alone causes (the backward API receives it rounded).
ReferenceGradients reference_backward(const ReferenceProblem& problem, const std::vector<double>& q,
                                      const std::vector<double>& k, const std::vector<double>& v,
                                      const std::vector<double>& dout, const Rounding& round = no_rounding,
                                      const std::vector<double>* out = nullptr);

// softmax probabilities of sequence b, head h: a (len_q, len_k) row-major matrix.
std::vector<double> reference_probabilities(const ReferenceProblem& problem, const std::vector<double>& q,
                                            const std::vector<double>& k, int64_t b, int64_t head);

// Whether key `col` of row `row` in sequence b is dropped by the shared Philox mask.
bool reference_dropped(const ReferenceProblem& problem, int64_t b, int64_t head, int64_t row, int64_t col);

}  // namespace fap::test
