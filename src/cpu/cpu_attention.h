// The CPU backend: the FlashAttention algorithm (Dao et al., 2022; FlashAttention-2, Dao 2023) on tiles of
// BLOCK_M query rows x BLOCK_N keys with an online softmax, fp32 accumulation and O(seqlen) extra memory.
// It defines the semantics every other backend must reproduce.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/problem.h"
#include "src/cpu/tile_gemm.h"

namespace fap::cpu {

constexpr int64_t kBlockM = 64;   // query rows per tile
constexpr int64_t kBlockN = 256;  // keys per tile (a multiple of kPanel)

// A (batch, row, head, dim) operand in fp32: the caller's tensor when it is fp32, else a converted copy.
struct FloatOperand {
  float* data = nullptr;
  int64_t batch_stride = 0, row_stride = 0, head_stride = 0;
  float* row(int64_t b, int64_t absolute_row, int64_t head) const {
    return data + b * batch_stride + absolute_row * row_stride + head * head_stride;
  }
};

// An operand staged for tile_gemm's B side. Each sequence (a batch entry, or a varlen sequence) starts at
// a staged position that is a multiple of kPanel, so that key tiles starting at multiples of kPanel within
// a sequence start on a panel boundary; padding positions hold zeros.
struct StagedOperand {
  float* data = nullptr;
  int64_t positions = 0;   // staged rows per head: every sequence rounded up to kPanel
  int64_t head_dim = 0;
  std::vector<int64_t> sequence_start;  // staged position of each sequence's first row

  float* head_block(int64_t head) const { return data + head * positions * round_up_to_panel(head_dim); }
};

// Rows (sequence positions) x head_dim, in panels of kPanel head-dim columns: the B of P^T dO, dS^T Q, dS K.
struct HeadDimPanels : StagedOperand {
  PanelMatrix rows_from(int64_t b, int64_t head, int64_t first_row) const {
    return {head_block(head) + (sequence_start[b] + first_row) * kPanel, positions * kPanel};
  }
};

// head_dim x keys (the operand transposed), in panels of kPanel keys: the B of Q K^T and dO V^T.
// first_key must be a multiple of kPanel.
struct KeyPanels : StagedOperand {
  PanelMatrix keys_from(int64_t b, int64_t head, int64_t first_key) const {
    return {head_block(head) + (sequence_start[b] + first_key) * head_dim, kPanel * head_dim};
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
// Returns an fp32 view of operand (a copy carved from the workspace when the dtype is not fp32).
FloatOperand stage_as_float(const AttentionProblem& problem, const Operand& operand, int64_t heads, int64_t rows,
                            WorkspaceCarver& carver);

// Which sequences an operand's rows belong to: the query side (q, out, dout) or the key side (k, v).
enum class Side { kQuery, kKey };
// fp32 copies of operand in the two panel layouts, carved from the workspace.
HeadDimPanels stage_head_dim_panels(const AttentionProblem& problem, const Operand& operand, int64_t heads, Side side,
                                    WorkspaceCarver& carver);
KeyPanels stage_key_panels(const AttentionProblem& problem, const Operand& operand, int64_t heads, Side side,
                           WorkspaceCarver& carver);

// The KV-cache call's append (k rotated) and q's rotation into the workspace; *attention gets the problem the
// attention then runs (q: the rotated copy). workspace == nullptr: size only.
size_t prepare_kv_cache(const AttentionProblem& problem, void* workspace, AttentionProblem* attention);
size_t forward(const AttentionProblem& problem, void* workspace);   // workspace == nullptr: size only
size_t backward(const AttentionProblem& problem, void* workspace);  // workspace == nullptr: size only

}  // namespace fap::cpu
