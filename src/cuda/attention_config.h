// Which forward kernel a problem runs: one KernelConfig names every compile-time choice, gives the cache
// key's readable name and the -D defines of the kernel source. choose_forward_config() is the dispatch
// table: a pure function, unit-tested on the CPU.
#pragma once

#include <string>
#include <vector>

#include "core/problem.h"

namespace fap::cuda {

struct ForwardConfig {
  bool bf16 = false;
  int head_dim = 64;  // the kernel's head dim: the problem's rounded up to a multiple of 16
  int block_m = 128, block_n = 64, warps = 4, row_tiles = 2;  // block_m = 16 * row_tiles * warps
  int min_blocks = 0;  // __launch_bounds__ hint: 0 none, 1 all registers to one CTA
  bool softcap = false, alibi = false, dropout = false, window = false;

  std::string name() const;  // e.g. attention_fwd_bf16_d128_m128_n64_w4_window
  std::vector<std::string> defines() const;
  int shared_bytes() const;
};

// The backward kernels (attention_bwd.cuh): one CTA per block_n keys, warps of 16 keys (times head_dim /
// dkv_split columns of dK and dV), block_m queries per step.
struct BackwardConfig {
  bool bf16 = false;
  int head_dim = 64;  // the kernel's head dim: the problem's rounded up to a multiple of 16 * dkv_split
  int block_m = 64, block_n = 64, warps = 8, dkv_split = 2;  // block_n = 16 * warps / dkv_split
  int q_stages = 2;                                           // 2: Q/dO tiles double-buffered
  bool softcap = false, alibi = false, dropout = false, window = false;  // deterministic mode is a run-time flag

  std::string name() const;  // e.g. attention_bwd_bf16_d128_m64_n64_w8_s2_q2_window
  std::vector<std::string> defines() const;
  int shared_bytes() const;
};

// compute_capability: e.g. 90 for sm_90.
ForwardConfig choose_forward_config(const AttentionProblem& problem, int compute_capability);
BackwardConfig choose_backward_config(const AttentionProblem& problem, int compute_capability);

// Every configuration choose_forward_config can return (for compile tests and precompilation).
std::vector<ForwardConfig> all_forward_configs();
std::vector<BackwardConfig> all_backward_configs();

// The embedded files each kernel family is compiled from, in order.
std::vector<std::string> forward_kernel_sources();
std::vector<std::string> backward_kernel_sources();

// The NVRTC architecture for a compute capability: sm_90a on Hopper (its wgmma/setmaxnreg need the "a").
std::string nvrtc_arch(int compute_capability);

}  // namespace fap::cuda
