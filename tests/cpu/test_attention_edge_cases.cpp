// Hand-picked problems the random suite may draw only rarely: empty sequences, fully masked rows, and the
// bitwise reproducibility of the backward.
#include <gtest/gtest.h>

#include <cmath>

#include "flash_attn_plus/flash_attn_plus.hpp"
#include "tests/support/attention_case.h"

namespace fap::test {
namespace {

CaseConfig base_config() {
  CaseConfig config;
  config.dtype = FAP_DTYPE_BFLOAT16;
  config.batch = 2;
  config.heads_q = 2;
  config.heads_kv = 1;
  config.head_dim = 32;
  config.len_q = {9, 9};
  config.len_k = {4, 4};
  config.seed = 11;
  return config;
}

TEST(AttentionEdgeCases, EmptyKeysGiveZeroOutputAndInfiniteLse) {
  CaseConfig config = base_config();
  config.len_k = {0, 0};
  AttentionCase c(config);
  flash_attn_plus::forward(c.forward_args(), c.options());
  for (double x : c.read(c.out)) EXPECT_EQ(x, 0.0);
  for (float x : c.lse) EXPECT_TRUE(std::isinf(x) && x > 0);
  flash_attn_plus::backward(c.backward_args(), c.options());
  for (double x : c.read(c.dq)) EXPECT_EQ(x, 0.0);
}

TEST(AttentionEdgeCases, CausalRowsAboveTheDiagonalAreEmpty) {
  CaseConfig config = base_config();
  config.causal = true;  // seqlen_q 9 > seqlen_k 4: rows 0..4 see no key
  AttentionCase c(config);
  flash_attn_plus::forward(c.forward_args(), c.options());
  flash_attn_plus::backward(c.backward_args(), c.options());
  const std::vector<double> out = c.read(c.out), dq = c.read(c.dq);
  const int64_t d = config.head_dim, h = config.heads_q;
  for (int64_t b = 0; b < config.batch; ++b)
    for (int64_t row = 0; row < 9; ++row)
      for (int64_t head = 0; head < h; ++head) {
        const float lse = c.lse[static_cast<size_t>((b * h + head) * 9 + row)];
        EXPECT_EQ(std::isinf(lse), row < 5) << row;
        for (int64_t col = 0; col < d; ++col) {
          const size_t index = static_cast<size_t>(((b * 9 + row) * h + head) * d + col);
          if (row < 5) {
            EXPECT_EQ(out[index], 0.0);
            EXPECT_EQ(dq[index], 0.0);
          }
        }
      }
}

TEST(AttentionEdgeCases, VarlenWithEmptySequencesAndTrailingRows) {
  CaseConfig config = base_config();
  config.varlen = true;
  config.batch = 3;
  config.len_q = {3, 0, 5};
  config.len_k = {0, 4, 6};
  config.trailing_rows = 2;
  AttentionCase c(config);
  const auto layout = flash_attn_plus::Layout::kVarlen;
  flash_attn_plus::forward(c.forward_args(), c.options(), layout);
  flash_attn_plus::backward(c.backward_args(), c.options(), layout);
  const std::vector<double> out = c.read(c.out), dk = c.read(c.dk);
  for (size_t i = 0; i < 3 * 2 * 32; ++i) EXPECT_EQ(out[i], 0.0);  // sequence 0 has no keys
  for (double x : out) EXPECT_FALSE(std::isnan(x));
  for (size_t i = (10) * 32; i < dk.size(); ++i) EXPECT_EQ(dk[i], 0.0);  // trailing key rows
  for (size_t i = 0; i < 4 * 32; ++i) EXPECT_EQ(dk[i], 0.0);            // sequence 1 has no queries
}

TEST(AttentionEdgeCases, BackwardIsBitwiseReproducible) {
  CaseConfig config = base_config();
  config.len_q = {150, 150};
  config.len_k = {300, 300};
  config.dropout_p = 0.2f;
  config.softcap = 5.0f;
  AttentionCase c(config);
  const fap_options options = c.options();
  flash_attn_plus::forward(c.forward_args(), options);
  flash_attn_plus::backward(c.backward_args(), options);
  const auto first = std::make_tuple(c.dq.bytes, c.dk.bytes, c.dv.bytes);
  for (int run = 0; run < 3; ++run) {
    flash_attn_plus::backward(c.backward_args(), options);
    EXPECT_TRUE(first == std::make_tuple(c.dq.bytes, c.dk.bytes, c.dv.bytes)) << "run " << run;
  }
}

}  // namespace
}  // namespace fap::test
