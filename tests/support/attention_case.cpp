#include "tests/support/attention_case.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <sstream>

#include "core/half.h"
#include "core/validate.h"

namespace fap::test {
namespace {

int64_t element_size(fap_dtype dtype) { return dtype == FAP_DTYPE_FLOAT32 || dtype == FAP_DTYPE_INT32 ? 4 : 2; }

template <typename T>
T pick(std::mt19937_64& rng, std::initializer_list<T> choices) {
  std::uniform_int_distribution<size_t> index(0, choices.size() - 1);
  return *(choices.begin() + index(rng));
}

bool chance(std::mt19937_64& rng, double probability) {
  return std::uniform_real_distribution<double>(0.0, 1.0)(rng) < probability;
}

int64_t uniform(std::mt19937_64& rng, int64_t low, int64_t high) {
  return std::uniform_int_distribution<int64_t>(low, high)(rng);
}

}  // namespace

std::string CaseConfig::describe() const {
  std::ostringstream text;
  text << "seed=" << seed << " dtype=" << fap::dtype_name(dtype) << (varlen ? " varlen" : " dense") << " b=" << batch
       << " h=" << heads_q << "/" << heads_kv << " d=" << head_dim << " len_q=[";
  for (size_t i = 0; i < len_q.size(); ++i) text << (i ? "," : "") << len_q[i];
  text << "] len_k=[";
  for (size_t i = 0; i < len_k.size(); ++i) text << (i ? "," : "") << len_k[i];
  text << "] causal=" << causal << " window=(" << window_left << "," << window_right << ") softcap=" << softcap
       << " alibi_rank=" << alibi_rank << " dropout=" << dropout_p << " probs=" << want_probs
       << " row_padding=" << row_padding << " trailing_rows=" << trailing_rows;
  return text.str();
}

CaseConfig random_case(uint64_t seed) {
  std::mt19937_64 rng(seed);
  CaseConfig c;
  c.seed = seed;
  c.dtype = pick(rng, {FAP_DTYPE_FLOAT16, FAP_DTYPE_FLOAT16, FAP_DTYPE_BFLOAT16, FAP_DTYPE_BFLOAT16, FAP_DTYPE_FLOAT32});
  c.varlen = chance(rng, 0.35);
  const auto heads = pick<std::pair<int64_t, int64_t>>(rng, {{1, 1}, {2, 2}, {2, 1}, {3, 3}, {4, 2}, {4, 1}, {6, 2}});
  c.heads_q = heads.first;
  c.heads_kv = heads.second;
  c.head_dim = pick<int64_t>(rng, {1, 2, 8, 16, 32, 40, 59, 64, 72, 80, 96, 111, 128, 160, 192, 224, 256});
  const bool long_sequence = chance(rng, 0.02);
  c.batch = long_sequence ? 1 : uniform(rng, 1, 4);
  const auto draw_length = [&] {
    if (long_sequence) return pick<int64_t>(rng, {1000, 1023, 1100, 1300});
    return pick<int64_t>(rng, {1, 2, 3, 17, 31, 64, 65, 113, 128, 129, 200});
  };
  if (long_sequence) {
    c.heads_q = c.heads_kv = 1;
    c.head_dim = pick<int64_t>(rng, {32, 59, 64});
  }
  const int64_t dense_q = draw_length();
  const int64_t dense_k = chance(rng, 0.5) ? dense_q : draw_length();
  for (int64_t b = 0; b < c.batch; ++b) {
    // Varlen sequences differ in length, zero included.
    c.len_q.push_back(c.varlen ? (chance(rng, 0.1) ? 0 : uniform(rng, 1, dense_q)) : dense_q);
    c.len_k.push_back(c.varlen ? (chance(rng, 0.1) ? 0 : uniform(rng, 1, dense_k)) : dense_k);
  }
  if (c.varlen && chance(rng, 0.3)) c.trailing_rows = uniform(rng, 1, 5);
  // Keep the float64 reference affordable: about 4e6 multiply-adds per case at most (long cases aside).
  while (c.batch > 1 && c.batch * c.heads_q * dense_q * dense_k * c.head_dim > 4'000'000) {
    c.batch -= 1;
    c.len_q.pop_back();
    c.len_k.pop_back();
  }
  if (chance(rng, 0.3)) c.row_padding = uniform(rng, 1, 2) * c.head_dim * c.heads_q;
  c.causal = chance(rng, 0.4);
  if (chance(rng, 0.25)) {
    const int64_t longest = std::max(dense_q, dense_k);
    c.window_left = chance(rng, 0.15) ? -1 : uniform(rng, 0, longest + 2);
    c.window_right = chance(rng, 0.15) ? -1 : uniform(rng, 0, longest + 2);
  }
  if (chance(rng, 0.2)) c.softcap = pick<float>(rng, {1.5f, 30.0f});
  if (chance(rng, 0.2)) c.alibi_rank = chance(rng, 0.5) ? 1 : 2;
  if (chance(rng, 0.2)) c.dropout_p = pick<float>(rng, {0.17f, 0.5f});
  c.want_probs = chance(rng, 0.15);
  return c;
}

AttentionCase::AttentionCase(const CaseConfig& config) : config_(config) {
  ReferenceProblem& r = reference_;
  r.batch = config.batch;
  r.heads_q = config.heads_q;
  r.heads_kv = config.heads_kv;
  r.head_dim = config.head_dim;
  r.len_q = config.len_q;
  r.len_k = config.len_k;
  for (int64_t b = 0; b < config.batch; ++b) {
    r.q_start.push_back(r.total_q);
    r.k_start.push_back(r.total_k);
    r.total_q += config.len_q[b];
    r.total_k += config.len_k[b];
  }
  seqlen_q_ = *std::max_element(config.len_q.begin(), config.len_q.end());
  seqlen_k_ = *std::max_element(config.len_k.begin(), config.len_k.end());
  if (config.varlen) {
    cu_seqlens_q.assign(r.q_start.begin(), r.q_start.end());
    cu_seqlens_q.push_back(static_cast<int32_t>(r.total_q));
    cu_seqlens_k.assign(r.k_start.begin(), r.k_start.end());
    cu_seqlens_k.push_back(static_cast<int32_t>(r.total_k));
  }
  r.max_seqlen_k = seqlen_k_;
  r.scale = 1.0 / std::sqrt(static_cast<double>(config.head_dim));
  r.scale = static_cast<float>(r.scale);  // the library computes the default scale in fp32
  r.softcap = config.softcap;
  r.causal = config.causal;
  r.window_left = config.window_left;
  r.window_right = config.window_right;
  r.dropout_p = config.dropout_p;
  r.dropout_seed = config.seed * 0x9E3779B97F4A7C15ull;
  r.dropout_offset = config.seed % 7 * (uint64_t{1} << 33) + 12345;
  std::mt19937_64 rng(config.seed ^ 0xA11Bu);
  if (config.alibi_rank) {
    const int64_t count = config.alibi_rank == 1 ? config.heads_q : config.batch * config.heads_q;
    for (int64_t i = 0; i < count; ++i) alibi.push_back(std::uniform_real_distribution<float>(0.01f, 1.0f)(rng));
    r.alibi_slopes = alibi;
  }

  // Varlen rows after the last sequence are part of the tensors too.
  const int64_t rows_q = config.varlen ? r.total_q + config.trailing_rows : seqlen_q_;
  const int64_t rows_k = config.varlen ? r.total_k + config.trailing_rows : seqlen_k_;
  q = make_operand(rows_q, config.heads_q, true, 1);
  k = make_operand(rows_k, config.heads_kv, true, 2);
  v = make_operand(rows_k, config.heads_kv, true, 3);
  dout = make_operand(rows_q, config.heads_q, true, 4);
  out = make_operand(rows_q, config.heads_q, false, 5);
  dq = make_operand(rows_q, config.heads_q, false, 6);
  dk = make_operand(rows_k, config.heads_kv, false, 7);
  dv = make_operand(rows_k, config.heads_kv, false, 8);
  lse.assign(static_cast<size_t>(config.heads_q * (config.varlen ? rows_q : config.batch * seqlen_q_)),
             std::numeric_limits<float>::quiet_NaN());
  if (config.want_probs) {
    // Rounded up like FlashAttention-2's S_dmask, so the padding must be written (as zeros) too.
    probs_rows = (seqlen_q_ + 127) / 128 * 128;
    probs_cols = (seqlen_k_ + 127) / 128 * 128;
    probs.assign(static_cast<size_t>(config.batch * config.heads_q * probs_rows * probs_cols *
                                     element_size(config.dtype)),
                 0xFF);  // NaN in every float format
  }
}

HostOperand AttentionCase::make_operand(int64_t rows, int64_t heads, bool random, uint64_t stream) {
  const CaseConfig& c = config_;
  HostOperand operand;
  const int64_t d = c.head_dim;
  const int64_t row_stride = heads * d + c.row_padding;
  const int64_t batches = c.varlen ? 1 : c.batch;
  const int64_t size = element_size(c.dtype);
  operand.bytes.assign(static_cast<size_t>(batches * rows * row_stride * size), 0xFF);  // NaN poison
  fap_tensor& t = operand.view;
  t.data = operand.bytes.data();
  t.dtype = c.dtype;
  t.device_type = FAP_DEVICE_CPU;
  if (c.varlen) {
    t.rank = 3;
    const int64_t shape[] = {rows, heads, d}, strides[] = {row_stride, d, 1};
    std::copy(shape, shape + 3, t.shape);
    std::copy(strides, strides + 3, t.strides);
  } else {
    t.rank = 4;
    const int64_t shape[] = {c.batch, rows, heads, d}, strides[] = {rows * row_stride, row_stride, d, 1};
    std::copy(shape, shape + 4, t.shape);
    std::copy(strides, strides + 4, t.strides);
  }
  if (!random) return operand;
  // Inputs are normal(0, 1) rounded to the dtype; the reference sees exactly the stored values.
  std::mt19937_64 rng(c.seed * 131 + stream);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  operand.values.assign(static_cast<size_t>(batches * rows * heads * d), 0.0);
  for (int64_t b = 0; b < batches; ++b)
    for (int64_t row = 0; row < rows; ++row)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t col = 0; col < d; ++col) {
          const float value = round_to(c.dtype, normal(rng));
          store_from_float(c.dtype, t.data, (b * rows + row) * row_stride + h * d + col, value);
          operand.values[static_cast<size_t>(((b * rows + row) * heads + h) * d + col)] = value;
        }
  return operand;
}

std::vector<double> AttentionCase::read(const HostOperand& operand) const {
  const fap_tensor& t = operand.view;
  const int64_t rows = config_.varlen ? t.shape[0] : t.shape[1];
  const int64_t heads = config_.varlen ? t.shape[1] : t.shape[2];
  const int64_t batches = config_.varlen ? 1 : config_.batch;
  const int64_t d = config_.head_dim;
  const int64_t row_stride = config_.varlen ? t.strides[0] : t.strides[1];
  std::vector<double> values(static_cast<size_t>(batches * rows * heads * d));
  for (int64_t b = 0; b < batches; ++b)
    for (int64_t row = 0; row < rows; ++row)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t col = 0; col < d; ++col)
          values[static_cast<size_t>(((b * rows + row) * heads + h) * d + col)] =
              load_as_float(config_.dtype, t.data, b * rows * row_stride + row * row_stride + h * d + col);
  return values;
}

std::vector<double> AttentionCase::lse_by_head_row() const {
  const int64_t total = reference_.total_q;
  std::vector<double> result(static_cast<size_t>(config_.heads_q * total));
  for (int64_t b = 0; b < config_.batch; ++b)
    for (int64_t h = 0; h < config_.heads_q; ++h)
      for (int64_t i = 0; i < config_.len_q[b]; ++i) {
        const int64_t row = reference_.q_start[b] + i;
        const size_t source = config_.varlen ? static_cast<size_t>(h * (total + config_.trailing_rows) + row)
                                             : static_cast<size_t>((b * config_.heads_q + h) * seqlen_q_ + i);
        result[static_cast<size_t>(h * total + row)] = lse[source];
      }
  return result;
}

double AttentionCase::probs_at(int64_t b, int64_t h, int64_t row, int64_t col) const {
  const int64_t index = ((b * config_.heads_q + h) * probs_rows + row) * probs_cols + col;
  return load_as_float(config_.dtype, probs.data(), index);
}

fap_options AttentionCase::options() const {
  fap_options o = fap_default_options();
  o.causal = config_.causal;
  o.window_size_left = static_cast<int32_t>(config_.window_left);
  o.window_size_right = static_cast<int32_t>(config_.window_right);
  o.softcap = config_.softcap;
  o.dropout_p = config_.dropout_p;
  o.dropout_seed = reference_.dropout_seed;
  o.dropout_offset = reference_.dropout_offset;
  if (config_.alibi_rank) {
    const int64_t shape[] = {config_.batch, config_.heads_q};
    o.alibi_slopes = fap_make_tensor(const_cast<float*>(alibi.data()), FAP_DTYPE_FLOAT32, FAP_DEVICE_CPU, 0,
                                     config_.alibi_rank, config_.alibi_rank == 1 ? shape + 1 : shape);
  }
  return o;
}

fap_tensor AttentionCase::lse_view() {
  if (config_.varlen) {
    const int64_t shape[] = {config_.heads_q, q.view.shape[0]};
    return fap_make_tensor(lse.data(), FAP_DTYPE_FLOAT32, FAP_DEVICE_CPU, 0, 2, shape);
  }
  const int64_t shape[] = {config_.batch, config_.heads_q, seqlen_q_};
  return fap_make_tensor(lse.data(), FAP_DTYPE_FLOAT32, FAP_DEVICE_CPU, 0, 3, shape);
}

fap_tensor AttentionCase::probs_view() {
  if (!config_.want_probs) return fap_tensor{};
  const int64_t shape[] = {config_.batch, config_.heads_q, probs_rows, probs_cols};
  return fap_make_tensor(probs.data(), config_.dtype, FAP_DEVICE_CPU, 0, 4, shape);
}

fap_tensor AttentionCase::index_view(std::vector<int32_t>& values) {
  if (!config_.varlen) return fap_tensor{};
  const int64_t shape[] = {static_cast<int64_t>(values.size())};
  return fap_make_tensor(values.data(), FAP_DTYPE_INT32, FAP_DEVICE_CPU, 0, 1, shape);
}

fap_fwd_args AttentionCase::forward_args() {
  fap_fwd_args args{};
  args.q = q.view;
  args.k = k.view;
  args.v = v.view;
  args.out = out.view;
  args.softmax_lse = lse_view();
  args.attn_probs = probs_view();
  args.cu_seqlens_q = index_view(cu_seqlens_q);
  args.cu_seqlens_k = index_view(cu_seqlens_k);
  args.max_seqlen_q = config_.varlen ? seqlen_q_ : 0;
  args.max_seqlen_k = config_.varlen ? seqlen_k_ : 0;
  return args;
}

fap_bwd_args AttentionCase::backward_args() {
  fap_bwd_args args{};
  args.q = q.view;
  args.k = k.view;
  args.v = v.view;
  args.out = out.view;
  args.dout = dout.view;
  args.softmax_lse = lse_view();
  args.dq = dq.view;
  args.dk = dk.view;
  args.dv = dv.view;
  args.cu_seqlens_q = index_view(cu_seqlens_q);
  args.cu_seqlens_k = index_view(cu_seqlens_k);
  args.max_seqlen_q = config_.varlen ? seqlen_q_ : 0;
  args.max_seqlen_k = config_.varlen ? seqlen_k_ : 0;
  return args;
}

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double worst = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double diff = std::fabs(a[i] - b[i]);
    if (std::isnan(diff)) return std::numeric_limits<double>::infinity();
    worst = std::max(worst, diff);
  }
  return worst;
}

double max_abs(const std::vector<double>& a) {
  double worst = 0.0;
  for (double x : a) worst = std::max(worst, std::fabs(x));
  return worst;
}

}  // namespace fap::test
