// Which forward kernel a problem runs: one KernelConfig names every compile-time choice, gives the cache
// key's readable name and the -D defines of the kernel source. choose_forward_config() is the dispatch
// table: a pure function, unit-tested on the CPU.
#pragma once

#include <string>
#include <tuple>
#include <vector>

#include "core/problem.h"
#include "src/cuda/jit_cache.h"

namespace fap::cuda {

// Two kernels implement the forward: attention_fwd.cuh (mma.sync, sm_80 and later) and, on sm_90,
// attention_fwd_sm90.cuh (warpgroup MMAs, one warpgroup per 64 rows).
struct ForwardConfig {
  bool wgmma = false;  // the sm_90 kernel
  bool bf16 = false;
  int head_dim = 64;   // the kernel's head dim: the problem's rounded up to a multiple of 16 (64 for wgmma)
  int block_m = 128, block_n = 64, warps = 4, row_tiles = 2;  // mma.sync: block_m = 16 * row_tiles * warps
  int min_blocks = 0;  // __launch_bounds__ hint: 0 none, 1 all registers to one CTA
  int stages = 2;      // wgmma: K/V tiles in flight
  bool softcap = false, alibi = false, dropout = false, window = false;
  bool indexed_keys = false;  // mma.sync: keys through device-resident indices (paged caches, used key counts)
  bool persistent = false;    // wgmma: a grid of at most one CTA per SM, each taking row blocks in turn
  // mma.sync: shared-memory bytes after the tiles for the CTA's keys and sequence (FAP_CTA_KEYS_BYTES).
  static constexpr int kCtaKeysBytes = 64;

  std::string name() const;  // e.g. attention_fwd_bf16_d128_m128_n64_w4_window, attention_fwd_sm90_bf16_d128_...
  std::vector<std::string> defines() const;
  std::string source_file() const;  // the embedded kernel file (it includes what it needs)
  std::vector<std::string> kernels() const { return {"attention_fwd"}; }  // the module's kernels, main one first
  int shared_bytes() const;

  auto fields() const {
    return std::tie(wgmma, bf16, head_dim, block_m, block_n, warps, row_tiles, min_blocks, stages, softcap, alibi,
                    dropout, window, indexed_keys, persistent);
  }
  bool operator<(const ForwardConfig& other) const { return fields() < other.fields(); }
};

// The backward kernels: attention_bwd.cuh (mma.sync, sm_80+): one CTA per block_n keys, groups of dkv_split warps
// sharing key_tile keys (each warp head_dim / dkv_split columns of their dK and dV), block_m queries per step; on
// sm_90 without dropout, attention_bwd_sm90.cuh (wgmma, d padded to 64 or 128: two warpgroups of 64 keys) and
// attention_bwd_sm90_wide.cuh (d padded to 256: two warpgroups of 128 columns). All share
// attention_bwd_common.cuh's preprocess and conversion kernels.
struct BackwardConfig {
  bool wgmma = false;
  bool bf16 = false;
  int head_dim = 64;  // the problem's, padded (mma.sync: to a multiple of 32 and of 16 * dkv_split; wgmma: to 64, 128, 256)
  int block_m = 64, block_n = 64, warps = 8, dkv_split = 2;  // block_n = key_tile * warps / dkv_split
  int key_tile = 16;                                          // mma.sync: keys per group of dkv_split warps (16, 32)
  int q_stages = 2, do_stages = 2;                            // mma.sync: Q and dO tiles single- or double-buffered
  bool softcap = false, alibi = false, dropout = false, window = false;  // deterministic mode is a run-time flag

  std::string name() const;  // e.g. attention_bwd_bf16_d128_m64_n64_w8_s2_q2_window
  std::vector<std::string> defines() const;
  std::string source_file() const;  // the embedded kernel file (it includes what it needs)
  std::vector<std::string> kernels() const {  // the module's kernels, main one first
    return {"attention_bwd", "attention_bwd_preprocess", "attention_bwd_convert"};
  }
  int shared_bytes() const;

  auto fields() const {
    return std::tie(wgmma, bf16, head_dim, block_m, block_n, warps, dkv_split, key_tile, q_stages, do_stages, softcap,
                    alibi, dropout, window);
  }
  bool operator<(const BackwardConfig& other) const { return fields() < other.fields(); }
};

// The decode / KV-cache kernels (attention_decode.cuh, which includes kv_cache_append.cuh), sm_80+: every forward
// whose keys are found through device-resident indices (a paged cache, used key counts, the KV-cache call).
// Each of `warps` warps streams its own key tiles of block_n keys through `stages` shared-memory stages.
struct DecodeConfig {
  bool bf16 = false;
  int head_dim = 64;  // the problem's rounded up to a multiple of 16
  int block_n = 16, stages = 3, warps = 4;
  bool softcap = false, alibi = false, window = false;

  std::string name() const;  // e.g. attention_decode_bf16_d128_n16_s3_w4_window
  std::vector<std::string> defines() const;
  std::string source_file() const { return "attention_decode.cuh"; }
  std::vector<std::string> kernels() const {  // the module's kernels, main one first
    return {"attention_decode", "attention_decode_combine", "kv_cache_append"};
  }
  int shared_bytes() const;

  auto fields() const { return std::tie(bf16, head_dim, block_n, stages, warps, softcap, alibi, window); }
  bool operator<(const DecodeConfig& other) const { return fields() < other.fields(); }
};

// FlashAttention-2's S_dmask (attention_probs.cuh), written after a forward that returns it; the head dim is a
// run-time value (the kernel reads q and k from global memory).
struct ProbsConfig {
  bool bf16 = false;
  bool softcap = false, alibi = false, dropout = false, window = false;

  std::string name() const;  // e.g. attention_probs_bf16_window_dropout
  std::vector<std::string> defines() const;
  std::string source_file() const { return "attention_probs.cuh"; }
  std::vector<std::string> kernels() const { return {"attention_probs"}; }
  int shared_bytes() const { return 0; }
  static constexpr int kWarps = 4;  // rows per block: one warp each

  auto fields() const { return std::tie(bf16, softcap, alibi, dropout, window); }
  bool operator<(const ProbsConfig& other) const { return fields() < other.fields(); }
};

// compute_capability: e.g. 90 for sm_90.
ForwardConfig choose_forward_config(const KernelFeatures& features, int compute_capability);
BackwardConfig choose_backward_config(const KernelFeatures& features, int compute_capability);
// ctas: the decode call's CTAs before any key split (batch x kv heads x blocks of 16 packed rows); with at least
// one per multiprocessor two smaller CTAs per SM are chosen where they fit.
DecodeConfig choose_decode_config(const KernelFeatures& features, int compute_capability, int64_t ctas = 0,
                                  int multiprocessors = 1);
ProbsConfig choose_probs_config(const KernelFeatures& features, int compute_capability);
// The forward for prefill chunks whose keys are found through device-resident indices: the mma.sync kernel with
// FAP_INDEXED_KEYS, on every GPU (no dropout).
ForwardConfig choose_indexed_forward_config(const KernelFeatures& features, int compute_capability);
// The sm_90 forward's schedule for a call of seqlen_q query rows (at most: varlen): persistent up to d = 128 and
// 4k rows, where it measured faster on an H200 (bench/RESULTS.md), else one CTA per row block.
ForwardConfig with_forward_schedule(ForwardConfig config, int64_t seqlen_q);

// The grid of the forward and backward main kernels over `blocks` (row blocks, key blocks or the deterministic
// backward's slices) x batch x heads: (blocks, batch, heads), or with a window (a causal mask included)
// (batch, blocks, heads), the costliest blocks of every batch entry first (place_in_grid in attention_core.cuh).
// A grid's y extent stops at 65535: past it the backward's CTAs take every 65535th block (they loop over key
// blocks) and the forward's grid stays (blocks, batch, heads), which its kernel tells by its x extent
// (above 65535, which batch sizes never are).
struct Grid {
  int64_t x, y, z;
};
Grid forward_grid(bool window, int64_t blocks, int64_t batch, int64_t heads);
Grid backward_grid(bool window, int64_t blocks, int64_t batch, int64_t heads);

// Every configuration choose_forward_config can return for a compute capability (for compile tests and
// precompilation).
std::vector<ForwardConfig> all_forward_configs(int compute_capability);
std::vector<BackwardConfig> all_backward_configs(int compute_capability);
std::vector<DecodeConfig> all_decode_configs(int compute_capability);
std::vector<ProbsConfig> all_probs_configs(int compute_capability);
std::vector<ForwardConfig> all_indexed_forward_configs(int compute_capability);

// The NVRTC architecture for a compute capability: sm_90a on Hopper (its wgmma/setmaxnreg need the "a").
std::string nvrtc_arch(int compute_capability);

// What NVRTC compiles for a configuration on an architecture ("sm_80", "sm_90a"): its kernel file's translation
// unit with every embedded file as a header, and its defines.
template <typename Config>
CompileRequest compile_request(const Config& config, const std::string& arch);

}  // namespace fap::cuda
