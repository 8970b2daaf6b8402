// CPU backward (FlashAttention-2's algorithm): a pass computing row_dot = rowsum(dO * O); then one task per
// (batch, kv head, chunk of key tiles) that recomputes P = exp(S - lse) tile by tile, accumulates dK and dV
// for its keys over every query head of the group, and adds dS K into the chunk's own fp32 dQ partial; a
// last pass sums the partials in chunk order. No two tasks write the same memory, and the reduction order
// is fixed, so the gradients are bitwise reproducible for a given thread count. S = Q K^T and dP = dO V^T
// multiply bf16 inputs directly where the machine can (exact products, fp32 sums); the products of P and dS
// are fp32.
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

struct BackwardScratch {
  float* p;            // kBlockM x kBlockN: scores, then probabilities
  float* dp;           // kBlockM x kBlockN: dP, then dS
  float* p_dropped;    // kBlockM x kBlockN: P with dropout applied (dropout only)
  float* capped;       // kBlockM x kBlockN: capped scores (softcap only)
  float* multipliers;  // kBlockN
  float* dk;           // kBlockN x round_up_to_panel(head_dim)
  float* dv;           // kBlockN x round_up_to_panel(head_dim)

  static BackwardScratch carve(WorkspaceCarver& carver, int64_t head_dim) {
    constexpr size_t kTile = kBlockM * kBlockN;
    return {carver.take<float>(kTile), carver.take<float>(kTile), carver.take<float>(kTile),
            carver.take<float>(kTile), carver.take<float>(kBlockN),
            carver.take<float>(kBlockN * round_up_to_panel(head_dim)),
            carver.take<float>(kBlockN * round_up_to_panel(head_dim))};
  }
};

// T: the element type of S = Q K^T's and dP = dO V^T's operands (float or Bf16).
template <typename T>
struct BackwardInputs {
  RowOperand<T> q, dout;                           // A of S = Q K^T and dP = dO V^T (row-major)
  KeyPanels<T> k_keys, v_keys;                     // B of S = Q K^T and dP = dO V^T
  HeadDimPanels q_rows, dout_rows, k_rows;  // B of dK += dS^T Q, dV += P^T dO, dQ += dS K
  float* row_dot;       // (batch_slices, heads, total_q)
  float* dq_partials;   // chunks x (batch_slices, total_q, heads, round_up_to_panel(head_dim))
  int64_t chunks;
  int64_t batch_slices;  // batch for dense problems, 1 for varlen (rows are absolute)
};

int64_t batch_slices(const AttentionProblem& p) { return p.varlen ? 1 : p.batch; }
int64_t slice_of(const AttentionProblem& p, int64_t b) { return p.varlen ? 0 : b; }

template <typename T>
float* row_dot_at(const AttentionProblem& p, const BackwardInputs<T>& in, int64_t b, int64_t head, int64_t row) {
  return in.row_dot + (slice_of(p, b) * p.heads_q + head) * p.total_q + row;
}

template <typename T>
float* dq_partial_at(const AttentionProblem& p, const BackwardInputs<T>& in, int64_t chunk, int64_t b, int64_t row,
                     int64_t head) {
  const int64_t ld = round_up_to_panel(p.head_dim);
  const int64_t per_chunk = in.batch_slices * p.total_q * p.heads_q * ld;
  return in.dq_partials + chunk * per_chunk + ((slice_of(p, b) * p.total_q + row) * p.heads_q + head) * ld;
}

float lse_at(const AttentionProblem& p, int64_t b, int64_t head, int64_t row) {
  return p.lse.data[b * p.lse.batch_stride + head * p.lse.head_stride + row * p.lse.row_stride];
}

template <typename T>
void compute_row_dots(const AttentionProblem& p, const BackwardInputs<T>& in, int workers) {
  const int64_t d = p.head_dim;
#pragma omp parallel for num_threads(workers) schedule(static)
  for (int64_t b = 0; b < p.batch; ++b) {
    const SequenceExtent seq = p.sequence(b);
    for (int64_t row = seq.q_start; row < seq.q_start + seq.len_q; ++row)
      for (int64_t h = 0; h < p.heads_q; ++h) {
        const int64_t dout_offset = b * p.dout.batch_stride + row * p.dout.row_stride + h * p.dout.head_stride;
        const int64_t out_offset = b * p.out.batch_stride + row * p.out.row_stride + h * p.out.head_stride;
        float sum = 0.0f;
        for (int64_t c = 0; c < d; ++c) {
          sum += load_as_float(p.dtype, p.dout.data, dout_offset + c) * load_as_float(p.dtype, p.out.data, out_offset + c);
        }
        *row_dot_at(p, in, b, h, row) = sum;
      }
  }
}

// One query tile against one key tile: the core of the backward.
template <typename T>
void accumulate_tile(const AttentionProblem& p, const BackwardInputs<T>& in, const TileCoordinates& tile,
                     int64_t kv_head, int64_t row_begin, int64_t rows, int64_t chunk, const BackwardScratch& s) {
  const int64_t d = p.head_dim, ld = round_up_to_panel(d), n = tile.key_count, contraction = contraction_dim<T>(d);
  const int64_t b = tile.batch, head = tile.head;
  const SequenceExtent& seq = tile.sequence;
  const T* q = in.q.row(b, seq.q_start + row_begin, head);
  const T* dout = in.dout.row(b, seq.q_start + row_begin, head);
  tile_gemm(rows, n, contraction, {q, in.q.row_stride, 1}, in.k_keys.keys_from(b, kv_head, tile.key_begin), s.p,
            kBlockN, false);
  tile_gemm(rows, n, contraction, {dout, in.dout.row_stride, 1}, in.v_keys.keys_from(b, kv_head, tile.key_begin),
            s.dp, kBlockN, false);
  const bool dropout = p.dropout_p > 0.0f;
  for (int64_t r = 0; r < rows; ++r) {
    float* probs = s.p + r * kBlockN;
    float* dp = s.dp + r * kBlockN;
    const int64_t row = row_begin + r;
    transform_score_row(p, tile, row, probs, p.softcap > 0.0f ? s.capped + r * kBlockN : nullptr);
    // P = exp(score - lse); an empty row has lse = +inf and so P = 0. FlashAttention-2 shifts by 0 where the
    // lse is -inf (its exponential's rule for a row max of -inf); a NaN lse makes the row's P NaN.
    const float lse = lse_at(p, b, head, seq.q_start + row);
    exp_affine_sum(probs, static_cast<size_t>(n), exp_scale(p), lse == kMinusInf ? 0.0f : lse);
    if (dropout) {
      dropout_multipliers(p, tile, row, s.multipliers);
      float* dropped = s.p_dropped + r * kBlockN;
      for (int64_t c = 0; c < n; ++c) {
        dropped[c] = probs[c] * s.multipliers[c];
        dp[c] *= s.multipliers[c];
      }
    }
    softmax_grad(dp, probs, s.capped + r * kBlockN, static_cast<size_t>(n), *row_dot_at(p, in, b, head, seq.q_start + row),
                 p.softmax_scale, p.softcap);
  }
  const float* p_used = dropout ? s.p_dropped : s.p;
  tile_gemm(n, d, rows, {p_used, 1, kBlockN}, in.dout_rows.rows_from(b, head, row_begin), s.dv, ld, true);  // dV
  tile_gemm(n, d, rows, {s.dp, 1, kBlockN}, in.q_rows.rows_from(b, head, row_begin), s.dk, ld, true);        // dK
  float* dq = dq_partial_at(p, in, chunk, b, seq.q_start + row_begin, head);
  tile_gemm(rows, d, n, {s.dp, kBlockN, 1}, in.k_rows.rows_from(b, kv_head, tile.key_begin), dq, p.heads_q * ld,
            true);  // dQ += dS K
}

// Rows of values (leading dimension round_up_to_panel(head_dim)) into an output operand.
void store_rows(const AttentionProblem& p, const Operand& target, int64_t b, int64_t first_row, int64_t rows,
                int64_t head, const float* values) {
  const int64_t d = p.head_dim, ld = round_up_to_panel(d);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t offset = b * target.batch_stride + (first_row + r) * target.row_stride + head * target.head_stride;
    for (int64_t c = 0; c < d; ++c) store_from_float(p.dtype, target.data, offset + c, values[r * ld + c]);
  }
}

template <typename T>
void process_key_chunk(const AttentionProblem& p, const BackwardInputs<T>& in, int64_t b, int64_t kv_head,
                       int64_t chunk, const BackwardScratch& s) {
  const SequenceExtent seq = p.sequence(b);
  const int64_t key_blocks = (seq.len_k + kBlockN - 1) / kBlockN;
  const int64_t per_chunk = (key_blocks + in.chunks - 1) / in.chunks;
  const int64_t ld = round_up_to_panel(p.head_dim);
  for (int64_t kb = chunk * per_chunk; kb < std::min(key_blocks, (chunk + 1) * per_chunk); ++kb) {
    const int64_t key_begin = kb * kBlockN, key_count = std::min(kBlockN, seq.len_k - key_begin);
    std::fill(s.dk, s.dk + kBlockN * ld, 0.0f);
    std::fill(s.dv, s.dv + kBlockN * ld, 0.0f);
    for (int64_t head = kv_head * p.group_size(); head < (kv_head + 1) * p.group_size(); ++head) {
      const TileCoordinates tile{b, head, seq, key_begin, key_count};
      for (int64_t row_begin = 0; row_begin < seq.len_q; row_begin += kBlockM) {
        const int64_t rows = std::min(kBlockM, seq.len_q - row_begin);
        const KeyRange keys = tile_key_range(p, seq, row_begin, row_begin + rows);
        if (keys.end <= key_begin || keys.begin >= key_begin + key_count) continue;
        accumulate_tile(p, in, tile, kv_head, row_begin, rows, chunk, s);
      }
    }
    store_rows(p, p.dk, b, seq.k_start + key_begin, key_count, kv_head, s.dk);
    store_rows(p, p.dv, b, seq.k_start + key_begin, key_count, kv_head, s.dv);
  }
}

template <typename T>
void reduce_dq(const AttentionProblem& p, const BackwardInputs<T>& in, int workers) {
  const int64_t d = p.head_dim;
  const int64_t per_chunk = in.batch_slices * p.total_q * p.heads_q * round_up_to_panel(d);
#pragma omp parallel for num_threads(workers) schedule(static)
  for (int64_t b = 0; b < p.batch; ++b) {
    const SequenceExtent seq = p.sequence(b);
    for (int64_t row = seq.q_start; row < seq.q_start + seq.len_q; ++row)
      for (int64_t h = 0; h < p.heads_q; ++h) {
        float* sum = dq_partial_at(p, in, 0, b, row, h);
        for (int64_t chunk = 1; chunk < in.chunks; ++chunk)
          for (int64_t c = 0; c < d; ++c) sum[c] += sum[chunk * per_chunk + c];
        store_rows(p, p.dq, b, row, 1, h, sum);
      }
  }
}

// Splitting the keys of one (batch, kv head) in chunks keeps every worker busy when batch * heads_kv is small.
int64_t chunk_count(const AttentionProblem& p, int workers) {
  const int64_t key_blocks = (p.seqlen_k + kBlockN - 1) / kBlockN;
  const int64_t wanted = (2 * int64_t{workers} + p.batch * p.heads_kv - 1) / (p.batch * p.heads_kv);
  return std::clamp<int64_t>(wanted, 1, std::max<int64_t>(key_blocks, 1));
}

template <typename T>
size_t backward_with(const AttentionProblem& p, void* workspace) {
  WorkspaceCarver carver(workspace);
  const int workers = worker_count();
  BackwardInputs<T> in{stage_rows<T>(p, p.q, p.heads_q, p.total_q, carver),
                       stage_rows<T>(p, p.dout, p.heads_q, p.total_q, carver),
                       stage_key_panels<T>(p, p.k, p.heads_kv, Side::kKey, carver),
                       stage_key_panels<T>(p, p.v, p.heads_kv, Side::kKey, carver),
                       stage_head_dim_panels(p, p.q, p.heads_q, Side::kQuery, carver),
                       stage_head_dim_panels(p, p.dout, p.heads_q, Side::kQuery, carver),
                       stage_head_dim_panels(p, p.k, p.heads_kv, Side::kKey, carver),
                       nullptr,
                       nullptr,
                       chunk_count(p, workers),
                       batch_slices(p)};
  in.row_dot = carver.take<float>(static_cast<size_t>(in.batch_slices * p.heads_q * p.total_q));
  const size_t partial =
      static_cast<size_t>(in.batch_slices * p.total_q * p.heads_q * round_up_to_panel(p.head_dim));
  in.dq_partials = carver.take<float>(partial * static_cast<size_t>(in.chunks));
  BackwardScratch* scratch = carver.take<BackwardScratch>(static_cast<size_t>(workers));
  for (int w = 0; w < workers; ++w) {
    const BackwardScratch tiles = BackwardScratch::carve(carver, p.head_dim);
    if (workspace) scratch[w] = tiles;
  }
  if (!workspace) return carver.bytes();

  std::fill(in.dq_partials, in.dq_partials + partial * static_cast<size_t>(in.chunks), 0.0f);
  compute_row_dots(p, in, workers);
  // Sequences without keys have no dK, dV to write and add nothing to dQ (zeroed above).
  const std::vector<int64_t> with_keys = sequences_with_rows(p, Side::kKey);
  const int64_t tasks = static_cast<int64_t>(with_keys.size()) * p.heads_kv * in.chunks;
#pragma omp parallel for num_threads(workers) schedule(dynamic, 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t chunk = task % in.chunks;
    const int64_t kv_head = (task / in.chunks) % p.heads_kv;
    const int64_t b = with_keys[static_cast<size_t>(task / (in.chunks * p.heads_kv))];
    process_key_chunk(p, in, b, kv_head, chunk, scratch[worker_index()]);
  }
  reduce_dq(p, in, workers);
  return carver.bytes();
}

}  // namespace

size_t backward(const AttentionProblem& p, void* workspace) {
  return bf16_tiles(p) ? backward_with<Bf16>(p, workspace) : backward_with<float>(p, workspace);
}

}  // namespace fap::cpu
