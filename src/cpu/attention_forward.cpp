// CPU forward: one task per (batch, head, block of kBlockM query rows). For each key tile the task forms
// S = Q K^T (tile_gemm), turns it into scores (score_tile.h), updates the running row max m and sum l (online
// softmax), and accumulates O += P V; at the end O /= l and lse = m + log(l). S = Q K^T multiplies bf16 inputs
// directly where the machine can (exact products, fp32 sums: the fp32 path's numerics); P V is fp32.
#include <algorithm>
#include <cmath>
#include <limits>

#include "core/half.h"
#include "src/cpu/cpu_attention.h"
#include "src/cpu/score_tile.h"
#include "src/cpu/vector_math.h"

namespace fap::cpu {
namespace {

constexpr float kMinusInf = -std::numeric_limits<float>::infinity();

// Per-thread tiles, carved from the workspace. T: the element type of S = Q K^T's operands (float or Bf16).
template <typename T>
struct ForwardScratch {
  T* q;                // kBlockM x contraction_dim(head_dim)
  float* scores;       // kBlockM x kBlockN
  float* acc;          // kBlockM x round_up_to_panel(head_dim)
  float* row_max;      // kBlockM
  float* row_sum;      // kBlockM
  float* multipliers;  // kBlockN

  static ForwardScratch carve(WorkspaceCarver& carver, int64_t head_dim) {
    return {carver.take<T>(kBlockM * contraction_dim<T>(head_dim)), carver.take<float>(kBlockM * kBlockN),
            carver.take<float>(kBlockM * round_up_to_panel(head_dim)), carver.take<float>(kBlockM),
            carver.take<float>(kBlockM),          carver.take<float>(kBlockN)};
  }
};

template <typename T>
struct ForwardInputs {
  KeyPanels<T> k;
  HeadDimPanels v;
};

// The query tile as S = Q K^T reads it: fp32, or a bf16 operand's bits with the head dim padded to even.
template <typename T>
void load_query_tile(const AttentionProblem& p, int64_t b, int64_t head, int64_t first_row, int64_t rows, T* q) {
  const int64_t ld = contraction_dim<T>(p.head_dim);
  for (int64_t r = 0; r < rows; ++r)
    stage_row(p, p.q, b * p.q.batch_stride + (first_row + r) * p.q.row_stride + head * p.q.head_stride, q + r * ld);
}

template <typename T>
void write_probs_tile(const AttentionProblem& p, const TileCoordinates& tile, int64_t row_begin, int64_t rows,
                      const ForwardScratch<T>& s) {
  for (int64_t r = 0; r < rows; ++r) {
    float* scores = s.scores + r * kBlockN;
    const int64_t row = row_begin + r;
    const bool any = transform_score_row(p, tile, row, scores);
    const float row_max_value = s.row_max[r];
    if (!any || row_max_value == kMinusInf) continue;  // the tensor was zero-filled
    exp_below_max_sum(scores, static_cast<size_t>(tile.key_count), exp_scale(p), row_max_value);
    if (p.dropout_p > 0.0f) dropout_multipliers(p, tile, row, s.multipliers);
    const int64_t base = tile.batch * p.probs.batch_stride + tile.head * p.probs.head_stride + row * p.probs.row_stride;
    for (int64_t c = 0; c < tile.key_count; ++c) {
      // FlashAttention-2's S_dmask encoding: exp(score - row max), negated where dropout dropped it.
      const float value = p.dropout_p > 0.0f && s.multipliers[c] == 0.0f ? -scores[c] : scores[c];
      store_from_float(p.dtype, p.probs.data, base + (tile.key_begin + c) * p.probs.col_stride, value);
    }
  }
}

template <typename T>
void run_tile_products(const AttentionProblem& p, const ForwardInputs<T>& in, const TileCoordinates& tile,
                       int64_t kv_head, int64_t rows, const ForwardScratch<T>& s) {
  const int64_t ld = contraction_dim<T>(p.head_dim);
  tile_gemm(rows, tile.key_count, ld, {s.q, ld, 1}, in.k.keys_from(tile.batch, kv_head, tile.key_begin), s.scores,
            kBlockN, false);
}

template <typename T>
void attend_query_block(const AttentionProblem& p, const ForwardInputs<T>& in, int64_t b, int64_t head,
                        int64_t block, const ForwardScratch<T>& s) {
  const SequenceExtent seq = p.sequence(b);
  const int64_t row_begin = block * kBlockM;
  if (row_begin >= seq.len_q) return;
  const int64_t rows = std::min(kBlockM, seq.len_q - row_begin);
  const int64_t d = p.head_dim, ld = round_up_to_panel(d);
  const int64_t kv_head = p.kv_head(head);
  load_query_tile(p, b, head, seq.q_start + row_begin, rows, s.q);
  std::fill(s.acc, s.acc + rows * ld, 0.0f);
  std::fill(s.row_max, s.row_max + rows, kMinusInf);
  std::fill(s.row_sum, s.row_sum + rows, 0.0f);

  const float scale = exp_scale(p);  // scores and row maxima are in units of scale
  const KeyRange keys = tile_key_range(p, seq, row_begin, row_begin + rows);
  // Tiles start on panel boundaries of the staged keys; keys before keys.begin are masked like any other.
  const int64_t first_key = keys.begin - keys.begin % kPanel;
  for (int64_t key = first_key; key < keys.end; key += kBlockN) {
    const TileCoordinates tile{b, head, seq, key, std::min<int64_t>(kBlockN, keys.end - key)};
    run_tile_products(p, in, tile, kv_head, rows, s);
    for (int64_t r = 0; r < rows; ++r) {
      float* scores = s.scores + r * kBlockN;
      if (!transform_score_row(p, tile, row_begin + r, scores)) {
        std::fill(scores, scores + tile.key_count, 0.0f);  // no allowed key in this tile: P row is zero
        continue;
      }
      const float new_max = std::max(s.row_max[r], row_max(scores, static_cast<size_t>(tile.key_count)));
      // 0 on the first visited tile; 1 while the max stays -inf (no finite score yet: not exp(-inf + inf)).
      const float correction = new_max == s.row_max[r] ? 1.0f : std::exp(scale * (s.row_max[r] - new_max));
      const float tile_sum = exp_below_max_sum(scores, static_cast<size_t>(tile.key_count), scale, new_max);
      s.row_sum[r] = s.row_sum[r] * correction + tile_sum;
      s.row_max[r] = new_max;
      // Once the row maximum settles, most tiles leave it unchanged: no rescaling then.
      if (correction != 1.0f) scale_in_place(s.acc + r * ld, static_cast<size_t>(d), correction);
      if (p.dropout_p > 0.0f) {
        dropout_multipliers(p, tile, row_begin + r, s.multipliers);
        for (int64_t c = 0; c < tile.key_count; ++c) scores[c] *= s.multipliers[c];
      }
    }
    tile_gemm(rows, d, tile.key_count, {s.scores, kBlockN, 1}, in.v.rows_from(b, kv_head, key), s.acc, ld, true);
  }

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = row_begin + r;
    const bool empty = s.row_sum[r] == 0.0f;
    const float inverse = empty ? 0.0f : 1.0f / s.row_sum[r];  // a NaN sum makes the row NaN
    const int64_t offset = b * p.out.batch_stride + (seq.q_start + row) * p.out.row_stride + head * p.out.head_stride;
    for (int64_t c = 0; c < d; ++c) store_from_float(p.dtype, p.out.data, offset + c, s.acc[r * ld + c] * inverse);
    if (p.lse.data) {
      // FlashAttention-2's rule: +inf for an empty row and for a NaN one.
      const float lse = empty || std::isnan(s.row_sum[r]) ? std::numeric_limits<float>::infinity()
                                                          : scale * s.row_max[r] + std::log(s.row_sum[r]);
      p.lse.data[b * p.lse.batch_stride + head * p.lse.head_stride + (seq.q_start + row) * p.lse.row_stride] = lse;
    }
  }

  if (!p.probs.data) return;
  for (int64_t key = first_key; key < keys.end; key += kBlockN) {
    const TileCoordinates tile{b, head, seq, key, std::min<int64_t>(kBlockN, keys.end - key)};
    run_tile_products(p, in, tile, kv_head, rows, s);
    write_probs_tile(p, tile, row_begin, rows, s);
  }
}

void zero_probs(const AttentionProblem& p) {
  const ProbsView& probs = p.probs;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.heads_q; ++h)
      for (int64_t r = 0; r < probs.rows; ++r)
        for (int64_t c = 0; c < probs.cols; ++c)
          store_from_float(p.dtype, probs.data,
                           b * probs.batch_stride + h * probs.head_stride + r * probs.row_stride + c * probs.col_stride,
                           0.0f);
}

template <typename T>
size_t forward_with(const AttentionProblem& p, void* workspace) {
  WorkspaceCarver carver(workspace);
  const int workers = worker_count();
  const ForwardInputs<T> in{stage_key_panels<T>(p, p.k, p.heads_kv, Side::kKey, carver),
                            stage_head_dim_panels(p, p.v, p.heads_kv, Side::kKey, carver)};
  auto* scratch = carver.take<ForwardScratch<T>>(static_cast<size_t>(workers));
  for (int w = 0; w < workers; ++w) {
    const ForwardScratch<T> tiles = ForwardScratch<T>::carve(carver, p.head_dim);
    if (workspace) scratch[w] = tiles;
  }
  if (!workspace) return carver.bytes();

  if (p.probs.data) zero_probs(p);
  const int64_t blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
  const int64_t tasks = p.batch * p.heads_q * blocks;
#pragma omp parallel for num_threads(workers) schedule(dynamic, 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t block = task % blocks;
    const int64_t head = (task / blocks) % p.heads_q;
    const int64_t b = task / (blocks * p.heads_q);
    attend_query_block(p, in, b, head, block, scratch[worker_index()]);
  }
  return carver.bytes();
}

}  // namespace

size_t forward(const AttentionProblem& p, void* workspace) {
  return bf16_tiles(p) ? forward_with<Bf16>(p, workspace) : forward_with<float>(p, workspace);
}

}  // namespace fap::cpu
