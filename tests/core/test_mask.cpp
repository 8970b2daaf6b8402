// FlashAttention-2's mask rule: bottom-right causal alignment and window normalisation, on the examples of
// its documentation.
#include <gtest/gtest.h>

#include <tuple>

#include "core/mask.h"

namespace fap {
namespace {

KeyRange causal_keys(long long row, long long len_q, long long len_k) {
  return allowed_keys(normalize_window(-1, -1, true, len_k), row, len_q, len_k);
}

TEST(Mask, CausalIsAlignedToTheBottomRight) {
  // seqlen_q = 2, seqlen_k = 5: row 0 keeps keys 0..3, row 1 keeps all.
  EXPECT_EQ(causal_keys(0, 2, 5).end, 4);
  EXPECT_EQ(causal_keys(1, 2, 5).end, 5);
  // seqlen_q = 5, seqlen_k = 2: rows 0-2 are empty, row 3 keeps key 0, row 4 keeps keys 0..1.
  for (int row = 0; row < 3; ++row) EXPECT_LE(causal_keys(row, 5, 2).end, causal_keys(row, 5, 2).begin);
  EXPECT_EQ(causal_keys(3, 5, 2).end, 1);
  EXPECT_EQ(causal_keys(4, 5, 2).end, 2);
}

TEST(Mask, WindowIsInclusiveOnBothSides) {
  const AttentionWindow window = normalize_window(2, 1, false, 10);
  const KeyRange keys = allowed_keys(window, 5, 10, 10);
  EXPECT_EQ(keys.begin, 3);
  EXPECT_EQ(keys.end, 7);
}

// The per-key forms the CUDA kernels use (int positions, from the row's diagonal key) agree with the range
// form and alibi_bias on every (row, key) of a few shapes and windows.
TEST(Mask, PerKeyRulesAgreeWithTheRangeForm) {
  int windows = 0;
  for (int len_q : {1, 5, 9})
    for (int len_k : {1, 4, 9})
      for (const auto& [left, right, causal] : {std::tuple{-1, -1, true}, std::tuple{2, 1, false},
                                                std::tuple{0, 3, false}, std::tuple{3, -1, false}}) {
        const AttentionWindow window = normalize_window(left, right, causal, len_k);
        if (!window.active()) continue;  // a side >= len_k is unbounded: no window at all
        ++windows;
        for (int row = 0; row < len_q; ++row) {
          const KeyRange range = allowed_keys(window, row, len_q, len_k);
          const int diagonal = row + len_k - len_q;
          for (int key = 0; key < len_k; ++key) {
            EXPECT_EQ(window_allows(key, diagonal, static_cast<int>(window.left), static_cast<int>(window.right)),
                      key >= range.begin && key < range.end)
                << len_q << "x" << len_k << " row " << row << " key " << key;
            EXPECT_EQ(alibi_bias_at(0.5f, diagonal, key), alibi_bias(0.5f, row, key, len_q, len_k));
          }
        }
      }
  EXPECT_GT(windows, 20);
}

TEST(Mask, NormalisationFollowsFlashAttention2) {
  EXPECT_FALSE(normalize_window(-1, -1, false, 8).active());
  EXPECT_FALSE(normalize_window(8, 8, false, 8).active());    // sides >= seqlen_k are unbounded
  EXPECT_EQ(normalize_window(-1, -1, true, 8).right, 0);      // causal = window (left, 0)
  EXPECT_EQ(normalize_window(-1, -1, true, 8).left, 8);       // ... with the open side = max_seqlen_k
  EXPECT_EQ(normalize_window(3, -1, false, 8).right, 8);
  EXPECT_EQ(normalize_window(3, 5, true, 8).right, 0);
  EXPECT_EQ(normalize_window(3, 5, true, 8).left, 3);
}

TEST(Mask, AlibiIsMinusSlopeTimesDistanceToTheDiagonal) {
  EXPECT_FLOAT_EQ(alibi_bias(0.5f, 0, 3, 2, 5), -0.0f);  // diagonal of row 0 is key 3
  EXPECT_FLOAT_EQ(alibi_bias(0.5f, 0, 0, 2, 5), -1.5f);
  EXPECT_FLOAT_EQ(alibi_bias(0.5f, 1, 2, 2, 5), -1.0f);
}

}  // namespace
}  // namespace fap
