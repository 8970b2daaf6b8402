// The CPU backend: the FlashAttention algorithm (Dao et al., 2022; FlashAttention-2, Dao 2023) on tiles of
// BLOCK_M query rows x BLOCK_N keys with an online softmax, fp32 accumulation and O(seqlen) extra memory.
// It defines the semantics every other backend must reproduce.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "core/half.h"
#include "core/problem.h"
#include "src/cpu/tile_gemm.h"

namespace fap::cpu {

constexpr int64_t kBlockM = 64;   // query rows per tile
constexpr int64_t kBlockN = 256;  // keys per tile (a multiple of kPanel)

// A (batch, row, head, dim) operand as the tile products' A side reads it: fp32 (the caller's tensor when it is
// fp32, else a converted copy) or bf16 (a copy with the head dim padded to even).
template <typename T>
struct RowOperand {
  T* data = nullptr;
  int64_t batch_stride = 0, row_stride = 0, head_stride = 0;
  T* row(int64_t b, int64_t absolute_row, int64_t head) const {
    return data + b * batch_stride + absolute_row * row_stride + head * head_stride;
  }
};

// An operand staged for tile_gemm's B side, in fp32 or (bf16 inputs on a machine that multiplies bf16) in bf16
// pairs (tile_gemm.h's layouts). Each sequence (a batch entry, or a varlen sequence) starts at a staged position
// that is a multiple of kPanel, so that key tiles starting at multiples of kPanel within a sequence start on a
// panel boundary; padding positions hold zeros.
template <typename T>
struct StagedOperand {
  T* data = nullptr;
  int64_t positions = 0;   // staged rows per head: every sequence rounded up to kPanel
  int64_t head_dim = 0;    // staged head dim: the operand's, rounded up to even for bf16 pairs
  std::vector<int64_t> sequence_start;  // staged position of each sequence's first row

  T* head_block(int64_t head) const { return data + head * positions * round_up_to_panel(head_dim); }
};

// Rows (sequence positions) x head_dim in fp32, in panels of kPanel head-dim columns: the B of P V, P^T dO,
// dS^T Q, dS K.
struct HeadDimPanels : StagedOperand<float> {
  PanelMatrix<float> rows_from(int64_t b, int64_t head, int64_t first_row) const {
    return {head_block(head) + (sequence_start[b] + first_row) * kPanel, positions * kPanel};
  }
};

// head_dim x keys (the operand transposed), in panels of kPanel keys: the B of Q K^T and dO V^T.
// first_key must be a multiple of kPanel.
template <typename T>
struct KeyPanels : StagedOperand<T> {
  PanelMatrix<T> keys_from(int64_t b, int64_t head, int64_t first_key) const {
    return {this->head_block(head) + (this->sequence_start[b] + first_key) * this->head_dim,
            kPanel * this->head_dim};
  }
};

// Carves the caller's workspace into named regions; the same code sizes it (data == nullptr) and uses it.
class WorkspaceCarver {
 public:
  static constexpr size_t kAlignment = 64;
  // The region starts at the first aligned address of the caller's buffer, hence kAlignment bytes of slack.
  explicit WorkspaceCarver(void* base)
      : base_(base ? reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(base) + kAlignment - 1) / kAlignment *
                                             kAlignment)
                   : nullptr) {}
  template <typename T>
  T* take(size_t count) {
    offset_ = (offset_ + kAlignment - 1) / kAlignment * kAlignment;
    T* region = base_ ? reinterpret_cast<T*>(base_ + offset_) : nullptr;
    offset_ += count * sizeof(T);
    return region;
  }
  size_t bytes() const { return offset_ + kAlignment; }

 private:
  char* base_;
  size_t offset_ = 0;
};

int worker_count();
int worker_index();
// Returns operand as a RowOperand<T> (a copy carved from the workspace unless it is the caller's fp32 tensor).
template <typename T>
RowOperand<T> stage_rows(const AttentionProblem& problem, const Operand& operand, int64_t heads, int64_t rows,
                         WorkspaceCarver& carver);

// Which sequences an operand's rows belong to: the query side (q, out, dout) or the key side (k, v).
enum class Side { kQuery, kKey };
// The batch entries (sequences) that have rows on the given side, in order.
std::vector<int64_t> sequences_with_rows(const AttentionProblem& problem, Side side);
// Copies of operand in the two panel layouts, carved from the workspace (key panels: fp32, or bf16 pairs for
// bf16 operands).
HeadDimPanels stage_head_dim_panels(const AttentionProblem& problem, const Operand& operand, int64_t heads, Side side,
                                    WorkspaceCarver& carver);
template <typename T>
KeyPanels<T> stage_key_panels(const AttentionProblem& problem, const Operand& operand, int64_t heads, Side side,
                              WorkspaceCarver& carver);
// Whether S = Q K^T and dP = dO V^T multiply the problem's operands in bf16 (bf16 operands on a machine that
// multiplies bf16), else in fp32.
bool bf16_tiles(const AttentionProblem& problem);
// Element `index` of operand as a staged type: converted to fp32, or a bf16 operand's bits as they are.
template <typename T>
T staged_value(const AttentionProblem& problem, const Operand& operand, int64_t index) {
  if constexpr (std::is_same_v<T, Bf16>) {
    return {static_cast<const uint16_t*>(operand.data)[index]};
  } else {
    return load_as_float(problem.dtype, operand.data, index);
  }
}
// The head dim as a tile product's contraction: rounded up to even for bf16 pairs.
template <typename T>
int64_t contraction_dim(int64_t head_dim) {
  return std::is_same_v<T, Bf16> ? (head_dim + 1) / 2 * 2 : head_dim;
}

// Row `source` (its first element's offset) of operand as a staged row of contraction_dim<T> elements: the
// head_dim values, then zeros.
template <typename T>
void stage_row(const AttentionProblem& problem, const Operand& operand, int64_t source, T* target) {
  const int64_t d = problem.head_dim;
  for (int64_t c = 0; c < d; ++c) target[c] = staged_value<T>(problem, operand, source + c);
  for (int64_t c = d; c < contraction_dim<T>(d); ++c) target[c] = T{};
}

// The KV-cache call's append (k rotated) and q's rotation into the workspace; *attention gets the problem the
// attention then runs (q: the rotated copy). workspace == nullptr: size only.
size_t prepare_kv_cache(const AttentionProblem& problem, void* workspace, AttentionProblem* attention);
size_t forward(const AttentionProblem& problem, void* workspace);   // workspace == nullptr: size only
size_t backward(const AttentionProblem& problem, void* workspace);  // workspace == nullptr: size only

}  // namespace fap::cpu
