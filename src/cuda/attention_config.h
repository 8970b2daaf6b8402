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
  bool softcap = false, alibi = false, dropout = false, window = false;

  std::string name() const;  // e.g. attention_fwd_bf16_d128_m128_n64_w4_window
  std::vector<std::string> defines() const;
  int shared_bytes() const;
};

// compute_capability: e.g. 90 for sm_90.
ForwardConfig choose_forward_config(const AttentionProblem& problem, int compute_capability);

// Every configuration choose_forward_config can return (for compile tests and precompilation).
std::vector<ForwardConfig> all_forward_configs();

// The NVRTC architecture for a compute capability: sm_90a on Hopper (its wgmma/setmaxnreg need the "a").
std::string nvrtc_arch(int compute_capability);

}  // namespace fap::cuda
