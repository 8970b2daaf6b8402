// Randomised attention problems for the correctness suites: a CaseConfig drawn from a seed, the tensors it
// needs (fresh random inputs in the storage dtype, outputs poisoned with NaN), the C API views of them, and
// the matching float64 ReferenceProblem.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "flash_attn_plus/flash_attn_plus.h"
#include "tests/reference/reference_attention.h"

namespace fap::test {

struct CaseConfig {
  fap_dtype dtype = FAP_DTYPE_FLOAT16;
  bool varlen = false;
  int64_t batch = 1, heads_q = 1, heads_kv = 1, head_dim = 64;
  std::vector<int64_t> len_q, len_k;  // per sequence (dense: all equal)
  int64_t trailing_rows = 0;          // varlen: rows after the last sequence
  int64_t row_padding = 0;            // extra elements between rows (packed-qkv-like strides)
  bool causal = false;
  int64_t window_left = -1, window_right = -1;
  float softcap = 0.0f;
  int alibi_rank = 0;  // 0: none, 1: (heads), 2: (batch, heads)
  float dropout_p = 0.0f;
  bool want_probs = false;
  uint64_t seed = 0;

  std::string describe() const;
};

CaseConfig random_case(uint64_t seed);

// Storage for one (rows, heads, head_dim) operand in a dtype, with row padding.
struct HostOperand {
  std::vector<unsigned char> bytes;
  fap_tensor view{};
  std::vector<double> values;  // the stored values, exactly, as (rows, heads, head_dim)
};

class AttentionCase {
 public:
  explicit AttentionCase(const CaseConfig& config);

  const CaseConfig& config() const { return config_; }
  const ReferenceProblem& reference() const { return reference_; }
  fap_options options() const;
  fap_fwd_args forward_args();
  fap_bwd_args backward_args();

  HostOperand q, k, v, out, dout, dq, dk, dv;
  std::vector<float> lse;  // (batch, heads, seqlen_q) or (heads, total_q)
  std::vector<unsigned char> probs;
  int64_t probs_rows = 0, probs_cols = 0;
  std::vector<int32_t> cu_seqlens_q, cu_seqlens_k;
  std::vector<float> alibi;

  // Reads an output operand back as (rows, heads, head_dim) doubles.
  std::vector<double> read(const HostOperand& operand) const;
  // lse as (heads, total_q) regardless of layout.
  std::vector<double> lse_by_head_row() const;
  double probs_at(int64_t b, int64_t h, int64_t row, int64_t col) const;

 private:
  HostOperand make_operand(int64_t rows, int64_t heads, bool random, uint64_t stream);
  fap_tensor lse_view();
  fap_tensor probs_view();
  fap_tensor index_view(std::vector<int32_t>& values);

  CaseConfig config_;
  ReferenceProblem reference_;
  int64_t seqlen_q_ = 0, seqlen_k_ = 0;  // dense lengths or varlen maxima
};

// Max |a - b| over all elements.
double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b);
double max_abs(const std::vector<double>& a);

}  // namespace fap::test
