// The randomised correctness suite of the CPU backend: every case draws a fresh problem (random_case), runs
// our forward and backward through the C++ API on NaN-poisoned outputs, and checks them against the float64
// reference with FlashAttention-2's rule:
//   fp16/bf16: max|ours - exact| <= 2x (gradients 3x) max|plain low-precision computation - exact|
//   fp32:      max|ours - exact| <= 1e-5 * max|exact|
// Gradients get one more allowance, from the API rather than the kernel: the backward receives `out` as the
// forward stored it (fp16/bf16, as in FlashAttention-2), and rowsum(dout * out) inherits its rounding. On
// rows with one or two keys that error can exceed plain PyTorch's (whose softmax backward never reads out),
// so the baseline is the larger of the two, each measured with the float64 reference.
// The seed of every case is printed on failure; FAP_TEST_SEED shifts all seeds for a fresh draw.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>

#include "core/half.h"
#include "core/validate.h"
#include "flash_attn_plus/flash_attn_plus.hpp"
#include "tests/support/attention_case.h"

namespace fap::test {
namespace {

constexpr int kForwardCases = 1600;
constexpr int kBackwardCases = 900;
constexpr double kFp32RelativeBound = 1e-5;
// Below this fraction of the output's magnitude, differences are fp32 rounding noise; it only matters when
// the low-precision computation is exact (e.g. a single key), where 2x of 0 would demand bit equality.
constexpr double kNoiseFloor = 1e-6;

uint64_t seed_base() {
  const char* value = std::getenv("FAP_TEST_SEED");
  return value ? std::strtoull(value, nullptr, 10) : 0;
}

Rounding rounding_for(fap_dtype dtype) {
  return [dtype](double x) { return static_cast<double>(round_to(dtype, static_cast<float>(x))); };
}

// Extends a reference laid out over the sequences' rows to the tensor's rows (trailing rows must be zero).
std::vector<double> with_trailing_zeros(std::vector<double> values, size_t size) {
  values.resize(size, 0.0);
  return values;
}

// low_precision: the plain fp16/bf16 computation (unused for fp32). stored_out: the computation whose only
// rounding is that of the stored output (gradients only; empty for the forward).
// scale: the magnitude errors are relative to (the tensor's own, or for gradients the largest gradient's).
void expect_within_rule(const char* what, const std::vector<double>& ours, const std::vector<double>& exact,
                        const std::vector<double>& low_precision, const std::vector<double>& stored_out,
                        double scale, fap_dtype dtype, double factor, const CaseConfig& config) {
  const double error = max_abs_diff(ours, exact);
  const double stored_out_error = stored_out.empty() ? 0.0 : max_abs_diff(stored_out, exact);
  if (dtype == FAP_DTYPE_FLOAT32) {
    EXPECT_LE(error, std::max(kFp32RelativeBound * scale, factor * stored_out_error))
        << what << " fp32 error " << error << " vs max " << scale << "\n"
        << config.describe();
    return;
  }
  const double baseline = std::max(max_abs_diff(low_precision, exact), stored_out_error);
  EXPECT_LE(error, factor * baseline + kNoiseFloor * scale)
      << what << ": ours " << error << " vs plain " << dtype_name(dtype) << " " << baseline << " (x" << factor
      << " allowed)\n"
      << config.describe();
}

void check_lse(AttentionCase& c, const ReferenceForward& exact) {
  const std::vector<double> lse = c.lse_by_head_row();
  for (size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(exact.lse[i])) {
      ASSERT_TRUE(std::isinf(lse[i]) && lse[i] > 0) << "empty row " << i << " needs lse +inf, got " << lse[i] << "\n"
                                                    << c.config().describe();
    } else {
      ASSERT_NEAR(lse[i], exact.lse[i], 1e-5 * std::max(1.0, std::fabs(exact.lse[i])))
          << "lse row " << i << "\n" << c.config().describe();
    }
  }
}

// attn_probs holds exp(score - row max), negated where dropout dropped it, and zero outside the problem.
// With p = exp(score - lse) from the reference, the expected magnitude is p * exp(lse - row max).
void check_probs(AttentionCase& c, const ReferenceForward& exact) {
  const CaseConfig& config = c.config();
  const ReferenceProblem& r = c.reference();
  const double relative = config.dtype == FAP_DTYPE_FLOAT32 ? 1e-5 : config.dtype == FAP_DTYPE_FLOAT16 ? 2e-3 : 1.6e-2;
  for (int64_t b = 0; b < config.batch; ++b)
    for (int64_t h = 0; h < config.heads_q; ++h) {
      const std::vector<double> probs = reference_probabilities(r, c.q.values, c.k.values, b, h);
      for (int64_t i = 0; i < c.probs_rows; ++i)
        for (int64_t j = 0; j < c.probs_cols; ++j) {
          const double value = c.probs_at(b, h, i, j);
          ASSERT_FALSE(std::isnan(value)) << "attn_probs not written at " << b << "," << h << "," << i << "," << j;
          if (i >= config.len_q[b] || j >= config.len_k[b]) {
            ASSERT_EQ(value, 0.0) << "attn_probs padding at " << i << "," << j;
            continue;
          }
          const int64_t row = r.q_start[b] + i;
          const double lse = exact.lse[h * r.total_q + row], row_max = exact.row_max[h * r.total_q + row];
          const double expected = std::isinf(lse) ? 0.0 : probs[i * config.len_k[b] + j] * std::exp(lse - row_max);
          ASSERT_NEAR(std::fabs(value), expected, relative * expected + 1e-6)
              << "attn_probs at " << b << "," << h << "," << i << "," << j << "\n" << config.describe();
          if (config.dropout_p > 0 && value != 0.0) {
            ASSERT_EQ(value < 0, reference_dropped(r, b, h, i, j)) << "dropout sign at " << i << "," << j;
          }
        }
    }
}

class ForwardCorrectness : public ::testing::TestWithParam<int> {};

TEST_P(ForwardCorrectness, MatchesFloat64Reference) {
  const CaseConfig config = random_case(seed_base() + static_cast<uint64_t>(GetParam()));
  AttentionCase c(config);
  const fap_options options = c.options();
  flash_attn_plus::forward(c.forward_args(), options,
                           config.varlen ? flash_attn_plus::Layout::kVarlen : flash_attn_plus::Layout::kDense);

  const ReferenceProblem& r = c.reference();
  const ReferenceForward exact = reference_forward(r, c.q.values, c.k.values, c.v.values);
  const std::vector<double> ours = c.read(c.out);
  const size_t size = ours.size();
  const std::vector<double> low =
      config.dtype == FAP_DTYPE_FLOAT32
          ? std::vector<double>()
          : reference_forward(r, c.q.values, c.k.values, c.v.values, rounding_for(config.dtype)).out;
  expect_within_rule("out", ours, with_trailing_zeros(exact.out, size), with_trailing_zeros(low, size), {},
                     std::max(max_abs(exact.out), 1e-30), config.dtype, 2.0, config);
  check_lse(c, exact);
  if (config.want_probs) check_probs(c, exact);
}

INSTANTIATE_TEST_SUITE_P(RandomCases, ForwardCorrectness, ::testing::Range(0, kForwardCases));

class BackwardCorrectness : public ::testing::TestWithParam<int> {};

TEST_P(BackwardCorrectness, GradientsMatchFloat64Reference) {
  // Distinct seeds from the forward suite.
  const CaseConfig config = random_case(seed_base() + 1'000'000u + static_cast<uint64_t>(GetParam()));
  AttentionCase c(config);
  const fap_options options = c.options();
  const auto layout = config.varlen ? flash_attn_plus::Layout::kVarlen : flash_attn_plus::Layout::kDense;
  flash_attn_plus::forward(c.forward_args(), options, layout);
  flash_attn_plus::backward(c.backward_args(), options, layout);

  const ReferenceProblem& r = c.reference();
  const ReferenceGradients exact = reference_backward(r, c.q.values, c.k.values, c.v.values, c.dout.values);
  ReferenceGradients low;
  if (config.dtype != FAP_DTYPE_FLOAT32) {
    low = reference_backward(r, c.q.values, c.k.values, c.v.values, c.dout.values, rounding_for(config.dtype));
  }
  std::vector<double> stored_out = reference_forward(r, c.q.values, c.k.values, c.v.values).out;
  for (double& x : stored_out) x = rounding_for(config.dtype)(x);
  const ReferenceGradients from_stored_out =
      reference_backward(r, c.q.values, c.k.values, c.v.values, c.dout.values, no_rounding, &stored_out);
  const struct {
    const char* name;
    const HostOperand& ours;
    const std::vector<double>& exact;
    const std::vector<double>& low;
    const std::vector<double>& stored_out;
  } grads[] = {{"dq", c.dq, exact.dq, low.dq, from_stored_out.dq},
               {"dk", c.dk, exact.dk, low.dk, from_stored_out.dk},
               {"dv", c.dv, exact.dv, low.dv, from_stored_out.dv}};
  // A gradient that is exactly zero (e.g. dq and dk with a single key per row) is judged on the scale of the
  // others: relative to zero, fp32 rounding noise would count as infinite error.
  const double scale = std::max({max_abs(exact.dq), max_abs(exact.dk), max_abs(exact.dv), 1e-30});
  for (const auto& g : grads) {
    const std::vector<double> ours = c.read(g.ours);
    const size_t size = ours.size();
    expect_within_rule(g.name, ours, with_trailing_zeros(g.exact, size), with_trailing_zeros(g.low, size),
                       with_trailing_zeros(g.stored_out, size), scale, config.dtype, 3.0, config);
  }
}

INSTANTIATE_TEST_SUITE_P(RandomCases, BackwardCorrectness, ::testing::Range(0, kBackwardCases));

}  // namespace
}  // namespace fap::test
