// The CPU backend's entry: registration, the fp32 staging of inputs, and the parts of a call common to the
// forward and the backward.
#include <omp.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <string>

#include "core/backend.h"
#include "core/error.h"
#include "core/half.h"
#include "src/cpu/cpu_attention.h"
#include "src/cpu/instruction_sets.h"

namespace fap::cpu {

int worker_count() { return std::max(1, omp_get_max_threads()); }
int worker_index() { return omp_get_thread_num(); }

template <typename T>
RowOperand<T> stage_rows(const AttentionProblem& p, const Operand& operand, int64_t heads, int64_t rows,
                         WorkspaceCarver& carver) {
  if constexpr (std::is_same_v<T, float>) {
    if (p.dtype == FAP_DTYPE_FLOAT32) {
      return {static_cast<float*>(operand.data), operand.batch_stride, operand.row_stride, operand.head_stride};
    }
  }
  const int64_t slices = p.varlen ? 1 : p.batch;
  const int64_t ld = contraction_dim<T>(p.head_dim);
  RowOperand<T> staged{carver.take<T>(static_cast<size_t>(slices * rows * heads * ld)), p.varlen ? 0 : rows * heads * ld,
                       heads * ld, ld};
  if (!staged.data) return staged;
#pragma omp parallel for num_threads(worker_count()) schedule(static) collapse(2)
  for (int64_t b = 0; b < slices; ++b)
    for (int64_t row = 0; row < rows; ++row)
      for (int64_t h = 0; h < heads; ++h)
        stage_row(p, operand, b * operand.batch_stride + row * operand.row_stride + h * operand.head_stride,
                  staged.row(b, row, h));
  return staged;
}

template RowOperand<float> stage_rows(const AttentionProblem&, const Operand&, int64_t, int64_t, WorkspaceCarver&);
template RowOperand<Bf16> stage_rows(const AttentionProblem&, const Operand&, int64_t, int64_t, WorkspaceCarver&);

namespace {

// Staged positions: each sequence of the given side starts at a multiple of kPanel; zero-filled (the padding).
template <typename T>
StagedOperand<T> plan_staging(const AttentionProblem& p, Side side, WorkspaceCarver& carver, int64_t heads) {
  StagedOperand<T> staged;
  staged.head_dim = contraction_dim<T>(p.head_dim);
  for (int64_t b = 0; b < p.batch; ++b) {
    const SequenceExtent seq = p.sequence(b);
    staged.sequence_start.push_back(staged.positions);
    staged.positions += round_up_to_panel(side == Side::kQuery ? seq.len_q : seq.len_k);
  }
  const auto elements = static_cast<size_t>(heads * staged.positions * round_up_to_panel(p.head_dim));
  staged.data = carver.take<T>(elements);
  if (staged.data) std::fill(staged.data, staged.data + elements, T{});
  return staged;
}

// Calls write(head, staged position, source element offset of the row) for every row of every sequence. Only
// the sequences that have rows on this side take part: a call may hold very many empty (sequence, head) pairs.
template <typename Write>
void for_each_row(const AttentionProblem& p, const Operand& operand, int64_t heads, Side side,
                  const std::vector<int64_t>& sequence_start, Write&& write) {
  const std::vector<int64_t> filled = sequences_with_rows(p, side);
  const auto count = static_cast<int64_t>(filled.size());
#pragma omp parallel for num_threads(worker_count()) schedule(static) collapse(2)
  for (int64_t i = 0; i < count; ++i)
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t b = filled[static_cast<size_t>(i)];
      const SequenceExtent seq = p.sequence(b);
      if (side == Side::kKey) {
        for (int64_t row = 0; row < seq.len_k; ++row)
          write(h, sequence_start[b] + row, p.key_offset(operand, b, seq, row, h));
      } else {
        for (int64_t row = 0; row < seq.len_q; ++row) {
          write(h, sequence_start[b] + row,
                b * operand.batch_stride + (seq.q_start + row) * operand.row_stride + h * operand.head_stride);
        }
      }
    }
}

// Where element (row k, column j) of a panel sits: fp32 rows of kPanel, or bf16 pairs interleaved along k.
template <typename T>
int64_t panel_offset(int64_t k, int64_t j) {
  if constexpr (std::is_same_v<T, Bf16>) {
    return (k / 2) * 2 * kPanel + j * 2 + k % 2;
  } else {
    return k * kPanel + j;
  }
}

}  // namespace

std::vector<int64_t> sequences_with_rows(const AttentionProblem& p, Side side) {
  std::vector<int64_t> filled;
  for (int64_t b = 0; b < p.batch; ++b) {
    const SequenceExtent seq = p.sequence(b);
    if ((side == Side::kQuery ? seq.len_q : seq.len_k) > 0) filled.push_back(b);
  }
  return filled;
}

bool bf16_tiles(const AttentionProblem& p) { return p.dtype == FAP_DTYPE_BFLOAT16 && bf16_tile_products(); }

HeadDimPanels stage_head_dim_panels(const AttentionProblem& p, const Operand& operand, int64_t heads, Side side,
                                    WorkspaceCarver& carver) {
  HeadDimPanels staged{plan_staging<float>(p, side, carver, heads)};
  if (!staged.data) return staged;
  for_each_row(p, operand, heads, side, staged.sequence_start, [&](int64_t h, int64_t position, int64_t source) {
    float* block = staged.head_block(h);
    for (int64_t c = 0; c < p.head_dim; ++c) {
      block[(c / kPanel) * staged.positions * kPanel + position * kPanel + c % kPanel] =
          load_as_float(p.dtype, operand.data, source + c);
    }
  });
  return staged;
}

template <typename T>
KeyPanels<T> stage_key_panels(const AttentionProblem& p, const Operand& operand, int64_t heads, Side side,
                              WorkspaceCarver& carver) {
  KeyPanels<T> staged{plan_staging<T>(p, side, carver, heads)};
  if (!staged.data) return staged;
  for_each_row(p, operand, heads, side, staged.sequence_start, [&](int64_t h, int64_t position, int64_t source) {
    T* panel = staged.head_block(h) + (position / kPanel) * kPanel * staged.head_dim;
    for (int64_t c = 0; c < p.head_dim; ++c) {
      panel[panel_offset<T>(c, position % kPanel)] = staged_value<T>(p, operand, source + c);
    }
  });
  return staged;
}

template KeyPanels<float> stage_key_panels(const AttentionProblem&, const Operand&, int64_t, Side, WorkspaceCarver&);
template KeyPanels<Bf16> stage_key_panels(const AttentionProblem&, const Operand&, int64_t, Side, WorkspaceCarver&);

namespace {

void zero_rows(const AttentionProblem& p, const Operand& target, int64_t heads, int64_t first, int64_t last) {
  for (int64_t row = first; row < last; ++row)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t c = 0; c < p.head_dim; ++c)
        store_from_float(p.dtype, target.data, row * target.row_stride + h * target.head_stride + c, 0.0f);
}

// Varlen tensors may have rows after the last sequence; they belong to no sequence and get zeros (and an
// lse of +inf, as an empty row), so that every element of every output is written.
void clear_rows_after_sequences(const AttentionProblem& p) {
  if (!p.varlen) return;
  const int64_t end_q = p.cu_seqlens_q[p.batch], end_k = p.cu_seqlens_k[p.batch];
  if (p.direction == Direction::kForward) {
    zero_rows(p, p.out, p.heads_q, end_q, p.total_q);
    for (int64_t row = end_q; p.lse.data && row < p.total_q; ++row)
      for (int64_t h = 0; h < p.heads_q; ++h)
        p.lse.data[h * p.lse.head_stride + row * p.lse.row_stride] = std::numeric_limits<float>::infinity();
  } else {
    zero_rows(p, p.dq, p.heads_q, end_q, p.total_q);
    zero_rows(p, p.dk, p.heads_kv, end_k, p.total_k);
    zero_rows(p, p.dv, p.heads_kv, end_k, p.total_k);
  }
}

// The CPU's work needs no choice made ahead: the workspace size is the passes' own count (their null-workspace
// mode), and run() runs them on the calling thread's OpenMP team.
class CpuCall final : public PreparedCall {
 public:
  explicit CpuCall(const AttentionProblem& problem)
      : problem_(problem),
        cache_bytes_(problem.kv_cache ? prepare_kv_cache(problem, nullptr, nullptr) : 0),
        workspace_bytes_(cache_bytes_ + (problem.direction == Direction::kForward ? forward(problem, nullptr)
                                                                                  : backward(problem, nullptr))) {}
  size_t workspace_size() const override { return workspace_bytes_; }
  const char* kernel() const override { return ""; }
  void run(void*, void* workspace) const override {
    clear_rows_after_sequences(problem_);
    if (problem_.direction == Direction::kBackward) {
      backward(problem_, workspace);
    } else if (problem_.kv_cache) {
      AttentionProblem attention;
      prepare_kv_cache(problem_, workspace, &attention);
      forward(attention, static_cast<char*>(workspace) + cache_bytes_);
    } else {
      forward(problem_, workspace);
    }
  }

 private:
  const AttentionProblem& problem_;
  size_t cache_bytes_;  // the KV-cache call's part of the workspace, before the forward's
  size_t workspace_bytes_;
};

class CpuBackend final : public Backend {
 public:
  CpuBackend() { limit_instruction_sets(); }
  const char* name() const override { return "cpu"; }
  bool usable(std::string*) const override { return true; }
  bool runs_on(fap_device_type device) const override { return device == FAP_DEVICE_CPU; }
  std::string details() const override {
    return concat("OpenMP threads: ", worker_count(), "; instruction sets: ", instruction_sets());
  }
  std::string unsupported_reason(const AttentionProblem&) const override { return {}; }

  std::unique_ptr<PreparedCall> prepare(const AttentionProblem& problem) const override {
    return std::make_unique<CpuCall>(problem);
  }
};

}  // namespace
}  // namespace fap::cpu

namespace fap {
const Backend& cpu_backend() {
  static const cpu::CpuBackend backend;
  return backend;
}
}  // namespace fap
