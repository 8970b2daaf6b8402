#include "src/cpu/score_tile.h"

#include <algorithm>
#include <limits>

#include "core/mask.h"
#include "core/philox.h"
#include "src/cpu/vector_math.h"

namespace fap::cpu {

float exp_scale(const AttentionProblem& problem) {
  const bool plain = problem.softcap == 0.0f && !problem.alibi_slopes && problem.softmax_scale > 0.0f;
  return plain ? problem.softmax_scale : 1.0f;
}

bool transform_score_row(const AttentionProblem& problem, const TileCoordinates& tile, int64_t row, float* scores,
                         float* capped) {
  const SequenceExtent& seq = tile.sequence;
  const KeyRange allowed = allowed_keys(problem.window, row, seq.len_q, seq.len_k);
  const int64_t begin = std::clamp<int64_t>(allowed.begin - tile.key_begin, 0, tile.key_count);
  const int64_t end = std::clamp<int64_t>(allowed.end - tile.key_begin, 0, tile.key_count);
  constexpr float kMasked = -std::numeric_limits<float>::infinity();
  if (begin >= end) {
    std::fill(scores, scores + tile.key_count, kMasked);
    return false;
  }
  if (exp_scale(problem) == 1.0f) {
    scale_and_softcap(scores + begin, static_cast<size_t>(end - begin), problem.softmax_scale, problem.softcap);
  }
  if (capped) std::copy(scores + begin, scores + end, capped + begin);
  std::fill(scores, scores + begin, kMasked);
  std::fill(scores + end, scores + tile.key_count, kMasked);
  if (problem.alibi_slopes) {
    const float slope = problem.alibi_slope(tile.batch, tile.head);
    for (int64_t c = begin; c < end; ++c) {
      scores[c] += alibi_bias(slope, row, tile.key_begin + c, seq.len_q, seq.len_k);
    }
  }
  return true;
}

void dropout_multipliers(const AttentionProblem& problem, const TileCoordinates& tile, int64_t row,
                         float* multipliers) {
  const unsigned int threshold = dropout_threshold(problem.dropout_p);
  const float kept = 1.0f / (1.0f - problem.dropout_p);
  const auto batch_head = static_cast<unsigned int>(tile.batch * problem.heads_q + tile.head);
  int64_t c = 0;
  while (c < tile.key_count) {
    const int64_t key = tile.key_begin + c;
    const Philox4 words = dropout_words(problem.dropout_seed, problem.dropout_offset, batch_head,
                                        static_cast<unsigned int>(row), static_cast<unsigned int>(key / 4));
    for (int64_t word = key % 4; word < 4 && c < tile.key_count; ++word, ++c) {
      multipliers[c] = philox_word(words, static_cast<unsigned int>(word)) >= threshold ? kept : 0.0f;
    }
  }
}

KeyRange tile_key_range(const AttentionProblem& problem, const SequenceExtent& sequence, int64_t row_begin,
                        int64_t row_end) {
  const KeyRange first = allowed_keys(problem.window, row_begin, sequence.len_q, sequence.len_k);
  const KeyRange last = allowed_keys(problem.window, row_end - 1, sequence.len_q, sequence.len_k);
  return {std::max<long long>(first.begin, 0), std::min<long long>(last.end, sequence.len_k)};
}

}  // namespace fap::cpu
