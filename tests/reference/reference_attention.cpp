#include "tests/reference/reference_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/mask.h"
#include "core/philox.h"

namespace fap::test {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Scores, probabilities and dropout of one (sequence, head): everything the backward needs again.
struct HeadForward {
  int64_t len_q = 0, len_k = 0;
  std::vector<double> capped;   // score after softcap (before mask), len_q x len_k
  std::vector<double> probs;    // softmax, 0 where masked
  std::vector<double> keep;     // dropout multiplier: 0 or 1 / (1 - p)
  std::vector<double> lse, row_max;
};

double at(const std::vector<double>& x, const ReferenceProblem& p, int64_t row, int64_t head, int64_t heads,
          int64_t dim) {
  return x[(row * heads + head) * p.head_dim + dim];
}

// Rows [start, start + count) of one head as a contiguous (count, head_dim) array of round(x * factor).
std::vector<double> head_rows(const ReferenceProblem& p, const std::vector<double>& x, int64_t start, int64_t count,
                              int64_t head, int64_t heads, double factor, const Rounding& round) {
  std::vector<double> rows(static_cast<size_t>(count * p.head_dim));
  for (int64_t i = 0; i < count; ++i)
    for (int64_t c = 0; c < p.head_dim; ++c) rows[i * p.head_dim + c] = round(at(x, p, start + i, head, heads, c) * factor);
  return rows;
}

HeadForward head_forward(const ReferenceProblem& p, int64_t b, int64_t h, const std::vector<double>& q,
                         const std::vector<double>& k, const Rounding& round) {
  HeadForward f;
  f.len_q = p.len_q[b];
  f.len_k = p.len_k[b];
  const int64_t hk = h / (p.heads_q / p.heads_kv);
  const AttentionWindow window = normalize_window(p.window_left, p.window_right, p.causal, p.max_seqlen_k);
  const double slope = p.alibi_slopes.empty()
                           ? 0.0
                           : p.alibi_slopes[static_cast<size_t>(
                                 (p.alibi_slopes.size() == static_cast<size_t>(p.heads_q) ? 0 : b * p.heads_q) + h)];
  f.capped.assign(f.len_q * f.len_k, 0.0);
  f.probs.assign(f.len_q * f.len_k, 0.0);
  f.keep.assign(f.len_q * f.len_k, 1.0);
  f.lse.assign(f.len_q, kInf);
  f.row_max.assign(f.len_q, -kInf);
  std::vector<double> scores(f.len_k);
  const std::vector<double> keys = head_rows(p, k, p.k_start[b], f.len_k, hk, p.heads_kv, p.scale, round);
  const std::vector<double> queries = head_rows(p, q, p.q_start[b], f.len_q, h, p.heads_q, 1.0, no_rounding);
  const int64_t d = p.head_dim;
  for (int64_t i = 0; i < f.len_q; ++i) {
    const KeyRange allowed = allowed_keys(window, i, f.len_q, f.len_k);
    for (int64_t j = 0; j < f.len_k; ++j) {
      double dot = 0.0;
      for (int64_t c = 0; c < d; ++c) dot += queries[i * d + c] * keys[j * d + c];
      double s = round(dot);
      if (p.softcap > 0) s = round(round(std::tanh(round(s / p.softcap))) * p.softcap);
      f.capped[i * f.len_k + j] = s;
      const bool masked = j < allowed.begin || j >= allowed.end;
      scores[j] = masked ? -kInf : round(s + alibi_bias(static_cast<float>(slope), i, j, f.len_q, f.len_k));
    }
    const double m = f.len_k ? *std::max_element(scores.begin(), scores.end()) : -kInf;
    if (m == -kInf) continue;  // empty row: probabilities 0, lse +inf
    double sum = 0.0;
    for (int64_t j = 0; j < f.len_k; ++j) sum += std::exp(scores[j] - m);
    f.row_max[i] = m;
    f.lse[i] = m + std::log(sum);
    for (int64_t j = 0; j < f.len_k; ++j) f.probs[i * f.len_k + j] = round(std::exp(scores[j] - m) / sum);
    if (p.dropout_p > 0) {
      for (int64_t j = 0; j < f.len_k; ++j)
        f.keep[i * f.len_k + j] = reference_dropped(p, b, h, i, j) ? 0.0 : 1.0 / (1.0 - p.dropout_p);
    }
  }
  return f;
}

}  // namespace

bool reference_dropped(const ReferenceProblem& p, int64_t b, int64_t head, int64_t row, int64_t col) {
  const Philox4 words = dropout_words(p.dropout_seed, p.dropout_offset, static_cast<unsigned int>(b * p.heads_q + head),
                                      static_cast<unsigned int>(row), static_cast<unsigned int>(col / 4));
  return philox_word(words, static_cast<unsigned int>(col % 4)) < dropout_threshold(static_cast<float>(p.dropout_p));
}

std::vector<double> reference_probabilities(const ReferenceProblem& p, const std::vector<double>& q,
                                            const std::vector<double>& k, int64_t b, int64_t head) {
  return head_forward(p, b, head, q, k, no_rounding).probs;
}

ReferenceForward reference_forward(const ReferenceProblem& p, const std::vector<double>& q,
                                   const std::vector<double>& k, const std::vector<double>& v,
                                   const Rounding& round) {
  ReferenceForward result;
  result.out.assign(p.total_q * p.heads_q * p.head_dim, 0.0);
  result.lse.assign(p.heads_q * p.total_q, kInf);
  result.row_max.assign(p.heads_q * p.total_q, -kInf);
  const int64_t d = p.head_dim;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.heads_q; ++h) {
      const int64_t hk = h / (p.heads_q / p.heads_kv);
      const HeadForward f = head_forward(p, b, h, q, k, round);
      const double scaling = p.dropout_p > 0 ? 1.0 / (1.0 - p.dropout_p) : 1.0;
      const std::vector<double> values = head_rows(p, v, p.k_start[b], f.len_k, hk, p.heads_kv, scaling, round);
      for (int64_t i = 0; i < f.len_q; ++i) {
        const int64_t row = p.q_start[b] + i;
        result.lse[h * p.total_q + row] = f.lse[i];
        result.row_max[h * p.total_q + row] = f.row_max[i];
        std::vector<double> sum(static_cast<size_t>(d), 0.0);
        for (int64_t j = 0; j < f.len_k; ++j) {
          const double kept = f.keep[i * f.len_k + j] > 0 ? f.probs[i * f.len_k + j] : 0.0;
          for (int64_t c = 0; c < d; ++c) sum[c] += kept * values[j * d + c];
        }
        for (int64_t c = 0; c < d; ++c) result.out[(row * p.heads_q + h) * d + c] = round(sum[c]);
      }
    }
  return result;
}

ReferenceGradients reference_backward(const ReferenceProblem& p, const std::vector<double>& q,
                                      const std::vector<double>& k, const std::vector<double>& v,
                                      const std::vector<double>& dout, const Rounding& round,
                                      const std::vector<double>* out) {
  const int64_t d = p.head_dim;
  ReferenceGradients g;
  g.dq.assign(p.total_q * p.heads_q * d, 0.0);
  g.dk.assign(p.total_k * p.heads_kv * d, 0.0);
  g.dv.assign(p.total_k * p.heads_kv * d, 0.0);
  const double scaling = p.dropout_p > 0 ? 1.0 / (1.0 - p.dropout_p) : 1.0;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.heads_q; ++h) {
      const int64_t hk = h / (p.heads_q / p.heads_kv);
      const HeadForward f = head_forward(p, b, h, q, k, round);
      const int64_t n = f.len_k;
      const std::vector<double> qs = head_rows(p, q, p.q_start[b], f.len_q, h, p.heads_q, 1.0, no_rounding);
      const std::vector<double> ks = head_rows(p, k, p.k_start[b], n, hk, p.heads_kv, p.scale, round);
      const std::vector<double> vs = head_rows(p, v, p.k_start[b], n, hk, p.heads_kv, scaling, round);
      const std::vector<double> dos = head_rows(p, dout, p.q_start[b], f.len_q, h, p.heads_q, 1.0, no_rounding);
      // dP (through dropout), then dS = P * (dP - rowsum(P * dP)), then through softcap and the scale.
      std::vector<double> dlogit(f.len_q * n, 0.0);
      for (int64_t i = 0; i < f.len_q; ++i) {
        std::vector<double> dp(n, 0.0);
        double row_dot = 0.0;
        for (int64_t j = 0; j < n; ++j) {
          double sum = 0.0;
          for (int64_t c = 0; c < d; ++c) sum += dos[i * d + c] * vs[j * d + c];
          dp[j] = f.keep[i * n + j] > 0 ? round(sum) : 0.0;
          row_dot += dp[j] * f.probs[i * n + j];
        }
        if (out) {
          row_dot = 0.0;
          for (int64_t c = 0; c < d; ++c) row_dot += dos[i * d + c] * at(*out, p, p.q_start[b] + i, h, p.heads_q, c);
        }
        for (int64_t j = 0; j < n; ++j) {
          const double pij = f.probs[i * n + j];
          double ds = round(pij * (dp[j] - row_dot));
          if (p.softcap > 0 && pij != 0.0) {
            const double t = f.capped[i * n + j] / p.softcap;
            ds = round(ds * (1.0 - t * t));
          }
          dlogit[i * n + j] = ds;
        }
      }
      for (int64_t i = 0; i < f.len_q; ++i) {
        std::vector<double> sum(static_cast<size_t>(d), 0.0);
        for (int64_t j = 0; j < n; ++j)
          for (int64_t c = 0; c < d; ++c) sum[c] += dlogit[i * n + j] * ks[j * d + c];
        for (int64_t c = 0; c < d; ++c) g.dq[((p.q_start[b] + i) * p.heads_q + h) * d + c] = round(sum[c]);
      }
      for (int64_t j = 0; j < n; ++j) {
        std::vector<double> dk(static_cast<size_t>(d), 0.0), dv(static_cast<size_t>(d), 0.0);
        for (int64_t i = 0; i < f.len_q; ++i) {
          const double kept = f.keep[i * n + j] > 0 ? f.probs[i * n + j] : 0.0;
          for (int64_t c = 0; c < d; ++c) {
            dk[c] += dlogit[i * n + j] * qs[i * d + c];
            dv[c] += kept * dos[i * d + c];
          }
        }
        for (int64_t c = 0; c < d; ++c) {
          g.dk[((p.k_start[b] + j) * p.heads_kv + hk) * d + c] += round(round(dk[c]) * p.scale);
          g.dv[((p.k_start[b] + j) * p.heads_kv + hk) * d + c] += round(round(dv[c]) * scaling);
        }
      }
    }
  for (double& x : g.dk) x = round(x);
  for (double& x : g.dv) x = round(x);
  return g;
}

}  // namespace fap::test
