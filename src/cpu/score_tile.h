// Turning a tile of raw products q.k into the scores FlashAttention-2 defines, shared by the CPU forward
// and backward: scale, softcap, mask (-inf outside the allowed keys), ALiBi; and the dropout multipliers.
#pragma once

#include <cstdint>

#include "core/problem.h"
#include "src/cpu/cpu_attention.h"

namespace fap::cpu {

// The sequence, head and tile a score row belongs to.
struct TileCoordinates {
  int64_t batch, head;
  SequenceExtent sequence;
  int64_t key_begin, key_count;  // keys [key_begin, key_begin + key_count) of the tile
};

// Plain scores (no softcap, no ALiBi, positive scale) stay raw products: the softmax applies the scale
// inside its exponential, exp(scale * x - scale * max), saving a pass over the tile. Returns the factor
// exponentials take: the softmax scale for plain scores, 1 for transformed ones.
float exp_scale(const AttentionProblem& problem);

// Raw products of row `row` in, scores (or masked raw products, see exp_scale) out, in place. Returns false when the row has no allowed key in
// the tile (all -inf). When capped is given it receives the scores after softcap and before the mask and
// ALiBi: the softcap derivative of the backward needs them.
bool transform_score_row(const AttentionProblem& problem, const TileCoordinates& tile, int64_t row, float* scores,
                         float* capped = nullptr);

// multipliers[c] = 1 / (1 - p) if key key_begin + c of row `row` is kept, 0 if dropped.
void dropout_multipliers(const AttentionProblem& problem, const TileCoordinates& tile, int64_t row,
                         float* multipliers);

// Keys any row in [row_begin, row_end) may attend to (the mask is monotone in the row).
KeyRange tile_key_range(const AttentionProblem& problem, const SequenceExtent& sequence, int64_t row_begin,
                        int64_t row_end);

}  // namespace fap::cpu
