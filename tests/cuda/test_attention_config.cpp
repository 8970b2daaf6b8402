// The forward and backward dispatch tables (pure functions, checked here without a GPU) and the
// compilation of the kernels they select through NVRTC for sm_75, sm_80, sm_86/sm_89 and sm_90a, failing on compile errors, register spills and
// local memory (ptxas warnings promoted to errors). NVRTC needs no GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "src/cuda/attention_config.h"
#include "src/cuda/cuda_api.h"
#include "src/cuda/jit_cache.h"
#include "src/cuda/kernel_sources.h"

namespace fap::cuda {
namespace {

AttentionProblem problem(fap_dtype dtype, int64_t head_dim) {
  AttentionProblem p;
  p.dtype = dtype;
  p.head_dim = head_dim;
  p.heads_q = p.heads_kv = 1;
  return p;
}

TEST(AttentionConfig, HeadDimIsRoundedUpToSixteenForMmaSync) {
  for (int compute_capability : {80, 86, 89, 100, 120})
    for (int64_t d = 1; d <= 256; ++d) {
      const ForwardConfig config = choose_forward_config(problem(FAP_DTYPE_BFLOAT16, d).features(), compute_capability);
      EXPECT_FALSE(config.wgmma);
      EXPECT_GE(config.head_dim, d);
      EXPECT_LT(config.head_dim, d + 16);
      EXPECT_EQ(config.head_dim % 16, 0);
      EXPECT_EQ(config.block_m, 16 * config.row_tiles * config.warps) << "a warp takes row_tiles tiles of 16 rows";
      EXPECT_EQ(config.block_n % 16, 0);
    }
}

TEST(AttentionConfig, HopperRunsTheWgmmaKernelOnWhole64ColumnBlocks) {
  for (int64_t d = 1; d <= 256; ++d)
    for (bool dropout : {false, true}) {
      AttentionProblem p = problem(FAP_DTYPE_FLOAT16, d);
      p.dropout_p = dropout ? 0.1f : 0.0f;
      const ForwardConfig config = choose_forward_config(p.features(), 90);
      EXPECT_TRUE(config.wgmma);
      EXPECT_GE(config.head_dim, d);
      EXPECT_LT(config.head_dim, d + 64);
      EXPECT_EQ(config.head_dim % 64, 0) << "the 128-byte swizzle takes 64 columns at a time";
      EXPECT_EQ(config.block_m, 16 * (config.warps - 4)) << "a producer warpgroup, and consumers of 4 warps x 16 rows";
      EXPECT_TRUE(config.block_n == 32 || config.block_n == 64 || config.block_n == 80 || config.block_n == 128)
          << "wgmma_ss widths";
      EXPECT_EQ(config.source_file(), "attention_fwd_sm90.cuh");
    }
  EXPECT_EQ(choose_forward_config(problem(FAP_DTYPE_BFLOAT16, 128).features(), 90).name(), "attention_fwd_sm90_bf16_d128_m128_n128_w12_s3");
  EXPECT_EQ(choose_forward_config(problem(FAP_DTYPE_BFLOAT16, 256).features(), 90).name(), "attention_fwd_sm90_bf16_d256_m128_n80_w12_s2");
}

TEST(AttentionConfig, HopperForwardTakesThreeConsumersAtHeadDim64) {
  for (int64_t d : {1, 33, 64}) {
    const ForwardConfig config = choose_forward_config(problem(FAP_DTYPE_BFLOAT16, d).features(), 90);
    EXPECT_EQ(config.block_m, 192) << d;
    EXPECT_EQ(config.warps, 16) << d;
  }
  for (int64_t d : {65, 128, 256}) EXPECT_EQ(choose_forward_config(problem(FAP_DTYPE_BFLOAT16, d).features(), 90).block_m, 128) << d;
  AttentionProblem dropout = problem(FAP_DTYPE_BFLOAT16, 64);
  dropout.dropout_p = 0.1f;
  EXPECT_EQ(choose_forward_config(dropout.features(), 90).block_m, 128) << "Philox's registers leave room for two";
}

TEST(AttentionConfig, FeaturesFollowTheProblem) {
  AttentionProblem p = problem(FAP_DTYPE_FLOAT16, 128);
  EXPECT_EQ(choose_forward_config(p.features(), 80).name(), "attention_fwd_fp16_d128_m128_n64_w4_s1");
  EXPECT_EQ(choose_forward_config(problem(FAP_DTYPE_BFLOAT16, 64).features(), 80).name(), "attention_fwd_bf16_d64_m128_n128_w4_s1");
  p.window = normalize_window(-1, -1, true, 100);
  p.softcap = 30.0f;
  p.dropout_p = 0.1f;
  const float slopes[] = {0.5f};
  p.alibi_slopes = slopes;
  const ForwardConfig config = choose_forward_config(p.features(), 80);
  EXPECT_EQ(config.name(), "attention_fwd_fp16_d128_m64_n32_w4_window_softcap_alibi_dropout");
  const std::vector<std::string> defines = config.defines();
  EXPECT_NE(std::find(defines.begin(), defines.end(), "-DFAP_MIN_BLOCKS=1"), defines.end());
  EXPECT_NE(std::find(defines.begin(), defines.end(), "-DFAP_DROPOUT=1"), defines.end());
  EXPECT_NE(std::find(defines.begin(), defines.end(), "-DFAP_HEAD_DIM=128"), defines.end());
}

TEST(AttentionConfig, BatchAndSequenceLengthsNeverSelectAnotherKernel) {
  // The compiled kernel is keyed by the configuration alone: sizes are kernel arguments.
  AttentionProblem base = problem(FAP_DTYPE_BFLOAT16, 128);
  base.window = normalize_window(-1, -1, true, 4096);
  const std::string name = choose_forward_config(base.features(), 90).name();
  for (int64_t batch : {1, 3, 64})
    for (int64_t seqlen : {1, 17, 1000, 16384}) {
      AttentionProblem p = base;
      p.batch = batch;
      p.seqlen_q = p.total_q = seqlen;
      p.seqlen_k = p.total_k = seqlen + 5;
      p.window = normalize_window(-1, -1, true, p.seqlen_k);
      EXPECT_EQ(choose_forward_config(p.features(), 90).name(), name) << batch << " x " << seqlen;
    }
}

// Of the sizes, only a call's (maximum) query length picks between two compiled variants of the sm_90 forward:
// persistent up to 4k rows at d <= 128 without dropout; every other kernel keeps its configuration.
TEST(AttentionConfig, QueryLengthPicksTheHopperForwardSchedule) {
  const ForwardConfig d128 = choose_forward_config(problem(FAP_DTYPE_BFLOAT16, 128).features(), 90);
  EXPECT_TRUE(with_forward_schedule(d128, 1).persistent);
  EXPECT_TRUE(with_forward_schedule(d128, 4096).persistent);
  EXPECT_FALSE(with_forward_schedule(d128, 4097).persistent);
  EXPECT_EQ(with_forward_schedule(d128, 4097).name(), d128.name());
  EXPECT_NE(with_forward_schedule(d128, 1).name(), d128.name());  // compiled and cached apart
  EXPECT_FALSE(with_forward_schedule(choose_forward_config(problem(FAP_DTYPE_BFLOAT16, 256).features(), 90), 1)
                   .persistent);
  EXPECT_FALSE(with_forward_schedule(choose_forward_config(problem(FAP_DTYPE_BFLOAT16, 128).features(), 80), 1)
                   .persistent);
  AttentionProblem dropout = problem(FAP_DTYPE_BFLOAT16, 64);
  dropout.dropout_p = 0.1f;
  EXPECT_FALSE(with_forward_schedule(choose_forward_config(dropout.features(), 90), 1).persistent);
  // d = 64: persistent with two consumers up to 1k queries, three consumers without it above.
  const ForwardConfig d64 = choose_forward_config(problem(FAP_DTYPE_BFLOAT16, 64).features(), 90);
  const ForwardConfig short_d64 = with_forward_schedule(d64, 1024), long_d64 = with_forward_schedule(d64, 1025);
  EXPECT_TRUE(short_d64.persistent);
  EXPECT_EQ(short_d64.block_m, 128);
  EXPECT_EQ(short_d64.warps, 12);
  EXPECT_FALSE(long_d64.persistent);
  EXPECT_EQ(long_d64.name(), d64.name());
}

// The shared memory one block may opt into, per compute capability (the CUDA programming guide's table).
int opt_in_shared_bytes(int compute_capability) {
  return (compute_capability == 90 ? 227 : compute_capability == 80 ? 163 : compute_capability == 75 ? 64 : 99) * 1024;
}

template <typename Config>
void expect_fits_and_unique(const std::vector<Config>& configs, int compute_capability) {
  std::set<std::string> names;
  for (const Config& config : configs) {
    EXPECT_LE(config.shared_bytes(), opt_in_shared_bytes(compute_capability))
        << config.name() << " on sm_" << compute_capability;
    EXPECT_TRUE(names.insert(config.name()).second) << "duplicate " << config.name();
  }
}

TEST(AttentionConfig, EveryConfigurationFitsItsArchitecturesSharedMemory) {
  for (int compute_capability : {75, 80, 86, 89, 90}) {
    expect_fits_and_unique(all_forward_configs(compute_capability), compute_capability);
    expect_fits_and_unique(all_backward_configs(compute_capability), compute_capability);
    expect_fits_and_unique(all_decode_configs(compute_capability), compute_capability);
  }
  // Forward: every multiple of 16 up to 256 x 16 feature sets x 2 dtypes (mma.sync), and on sm_90 head dims 64,
  // 128, 192, 256 (wgmma), plus the persistent schedule of d = 64 and 128 without dropout.
  EXPECT_EQ(all_forward_configs(80).size(), 2u * 16u * 16u);
  EXPECT_EQ(all_forward_configs(90).size(), 2u * 4u * 16u + 2u * 2u * 8u);
  // Backward (mma.sync): head dims padded to multiples of 32; on sm_90 the wgmma kernels (d = 64, 128, 256)
  // without dropout and mma.sync with it.
  EXPECT_EQ(all_backward_configs(80).size(), 2u * 8u * 16u);
  for (const BackwardConfig& config : all_backward_configs(80)) {
    EXPECT_EQ(config.block_n * config.dkv_split, config.key_tile * config.warps) << config.name();
    EXPECT_TRUE(config.key_tile == 16 || (config.key_tile == 32 && config.dkv_split > 1)) << config.name();
    EXPECT_EQ(config.head_dim % (16 * config.dkv_split), 0) << config.name();  // whole MMA tiles per warp
    EXPECT_EQ(config.head_dim % 32, 0) << config.name();
  }
  size_t wgmma = 0;
  for (const BackwardConfig& config : all_backward_configs(90)) {
    EXPECT_EQ(config.wgmma, !config.dropout) << config.name();
    wgmma += config.wgmma;
  }
  EXPECT_EQ(wgmma, 2u * 3u * 8u);
}

// The mma.sync kernels' shared memory, from kernels/tile_layouts.h, against the sum of its parts written out: the Q
// tile and the stages of K and V tiles (rows padded by 8 elements of 2 bytes) and the CTA's keys (forward); K, V,
// the Q and dO stages, dS^T (and P^T where warps share keys) and a float per staged query row (backward); the 16
// packed query rows and each warp's stages of K and V tiles (decode; its merge buffers are smaller). The decode
// kernel at d = 128 with 4 warps of 3 stages asks for 108800 bytes, as ncu reported for it on the H200.
TEST(AttentionConfig, SharedMemoryIsTheSumOfTheLayoutsTiles) {
  for (int compute_capability : {75, 80, 86, 89, 90}) {
    for (const ForwardConfig& c : all_forward_configs(compute_capability)) {
      if (c.wgmma) continue;
      EXPECT_EQ(c.shared_bytes(), (c.block_m + 2 * c.stages * c.block_n) * (c.head_dim + 8) * 2 +
                                      ForwardConfig::kCtaKeysBytes) << c.name();
    }
    for (const BackwardConfig& c : all_backward_configs(compute_capability)) {
      if (c.wgmma) continue;
      const int staged_rows = (c.q_stages + c.do_stages) * c.block_m;
      EXPECT_EQ(c.shared_bytes(), (2 * c.block_n + staged_rows) * (c.head_dim + 8) * 2 +
                                      (c.dkv_split == 1 ? 1 : 2) * c.block_n * (c.block_m + 8) * 2 + staged_rows * 4)
          << c.name();
    }
    for (const DecodeConfig& c : all_decode_configs(compute_capability)) {
      EXPECT_EQ(c.shared_bytes(), 16 * (c.head_dim + 8) * 2 + c.warps * c.stages * 2 * c.block_n * (c.head_dim + 8) * 2)
          << c.name();
    }
  }
  DecodeConfig decode;
  decode.head_dim = 128, decode.block_n = 16, decode.stages = 3, decode.warps = 4;
  EXPECT_EQ(decode.shared_bytes(), 108800);
}

// The wgmma kernels' shared memory, from kernels/tile_layouts.h, against the sum of its parts written out, plus
// the 1024 bytes that align the swizzled tiles: the Q tile, the stages of K and V tiles and 128 bytes of mbarriers
// (forward); K, V, two Q and two dO stages, two stages of LSE and D rows, four mbarriers, then at d = 256 two P^T
// and two dS^T tiles, below that one or two dS^T tiles and one or two 32 KB dQ staging buffers (two dS^T tiles
// where the stages are handed over through mbarriers: always at d = 128, at d = 64 without softcap and ALiBi).
TEST(AttentionConfig, HopperSharedMemoryIsTheSumOfTheLayoutsTiles) {
  for (const ForwardConfig& c : all_forward_configs(90)) {
    if (!c.wgmma) continue;
    EXPECT_EQ(c.shared_bytes(), (c.block_m + 2 * c.stages * c.block_n) * c.head_dim * 2 + 128 + 1024) << c.name();
  }
  for (const BackwardConfig& c : all_backward_configs(90)) {
    if (!c.wgmma) continue;
    const int tiles = (2 * c.block_n + 4 * c.block_m) * c.head_dim * 2 + 4 * c.block_m * 4 + 4 * 8 + 1024;
    const int score_tile = c.block_n * c.block_m * 2;
    const bool stage_mbarriers = c.head_dim == 128 || !(c.softcap || c.alibi);
    const int expected = c.head_dim == 256
                             ? tiles + 4 * score_tile
                             : tiles + (stage_mbarriers ? 2 : 1) * score_tile +
                                   (c.head_dim == 128 || !stage_mbarriers ? 2 : 1) * 2 * 64 * 64 * 4;
    EXPECT_EQ(c.shared_bytes(), expected) << c.name();
  }
  KernelFeatures features;
  features.dtype = FAP_DTYPE_BFLOAT16, features.head_dim = 64;
  EXPECT_EQ(choose_backward_config(features, 90).shared_bytes(), 199712);
  features.head_dim = 128;
  EXPECT_EQ(choose_backward_config(features, 90).shared_bytes(), 231456);
}

// sm_80's shared memory takes FlashAttention-2's backward tiles, groups of warps sharing 32 keys, except where they
// spill (dropout above d = 64) or would pad the head dim further (d = 160, 224); sm_86/sm_89's 99 KB do not hold them.
// At d <= 64 without dropout, 128 queries per step with the dO tile single-buffered (the Q tile double).
TEST(AttentionConfig, BackwardKeyTilesOf32WhereSharedMemoryHoldsThem) {
  const auto backward = [](int64_t d, int compute_capability, bool dropout = false) {
    AttentionProblem p = problem(FAP_DTYPE_BFLOAT16, d);
    if (dropout) p.dropout_p = 0.1f;
    return choose_backward_config(p.features(), compute_capability);
  };
  for (int64_t d : {64, 128, 192, 256}) {
    const BackwardConfig config = backward(d, 80);
    EXPECT_EQ(config.key_tile, 32) << config.name();
    EXPECT_EQ(config.block_n, d <= 128 ? 128 : 64) << config.name();
    EXPECT_EQ(config.block_m, d <= 64 ? 128 : 64) << config.name();
    EXPECT_EQ(config.q_stages, d <= 64 ? 2 : 1) << config.name();
    EXPECT_EQ(config.do_stages, 1) << config.name();
    EXPECT_EQ(config.head_dim, d) << config.name();  // no padding beyond the problem's
  }
  EXPECT_EQ(backward(64, 80, true).key_tile, 32);
  EXPECT_EQ(backward(64, 80, true).block_m, 64);
  EXPECT_EQ(backward(64, 80, true).do_stages, 2);
  EXPECT_EQ(backward(128, 80, true).key_tile, 16);
  EXPECT_EQ(backward(256, 80, true).key_tile, 16);
  EXPECT_EQ(backward(160, 80).key_tile, 16);
  EXPECT_EQ(backward(160, 80).head_dim, 160);
  for (int64_t d : {64, 128, 256}) EXPECT_EQ(backward(d, 86).key_tile, 16);
}

// sm_86 and sm_89 (99 KB per block) get the sm_80 tiles where they fit and smaller ones where they do not.
TEST(AttentionConfig, SmallerSharedMemoryGetsSmallerTilesOnlyWhereNeeded) {
  for (int64_t d : {64, 128, 256}) {
    const KernelFeatures features = problem(FAP_DTYPE_BFLOAT16, d).features();
    for (int compute_capability : {86, 89}) {
      const BackwardConfig backward = choose_backward_config(features, compute_capability);
      const ForwardConfig forward = choose_forward_config(features, compute_capability);
      EXPECT_LE(backward.shared_bytes(), 99 * 1024) << backward.name();
      EXPECT_LE(forward.shared_bytes(), 99 * 1024) << forward.name();
      if (d == 64) {
        EXPECT_EQ(backward.name(), "attention_bwd_bf16_d64_m64_n128_w8_s1_q2");  // 64 queries per step
      }
    }
  }
  // sm_86/sm_89 keep the compact shapes: FlashAttention-2's 128 x 128 tiles at d = 64 would leave one CTA per SM.
  EXPECT_EQ(choose_forward_config(problem(FAP_DTYPE_BFLOAT16, 64).features(), 86).name(), "attention_fwd_bf16_d64_m128_n64_w8");
  EXPECT_EQ(choose_forward_config(problem(FAP_DTYPE_BFLOAT16, 128).features(), 89).name(), "attention_fwd_bf16_d128_m128_n32_w4");
  // sm_80's 164 KB: FlashAttention-2's 64 x 128 backward tile, 32 keys per pair of warps.
  EXPECT_EQ(choose_backward_config(problem(FAP_DTYPE_BFLOAT16, 128).features(), 80).name(),
            "attention_bwd_bf16_d128_m64_n128_w8_s2_q1_k32");
  EXPECT_EQ(choose_backward_config(problem(FAP_DTYPE_BFLOAT16, 128).features(), 86).name(),
            "attention_bwd_bf16_d128_m32_n64_w8_s2_q2");
}

// With sm_80's shared memory (what Hopper runs when the mma.sync kernels are forced), FlashAttention-2's tile
// shapes, K and V double-buffered only where two CTAs still fit the SM's 164 KB: up to d = 128 two CTAs always
// fit (single-buffered, the key tiles take half the room).
TEST(AttentionConfig, LargeSharedMemoryTakesFlashAttention2TilesTwoCtasPerSm) {
  for (int64_t d = 16; d <= 256; d += 16)
    for (bool causal : {false, true}) {
      AttentionProblem p = problem(FAP_DTYPE_BFLOAT16, d);
      if (causal) p.window = normalize_window(-1, -1, true, 100);
      const ForwardConfig config = choose_forward_config(p.features(), 80);
      EXPECT_EQ(config.block_m, 128) << config.name();
      EXPECT_EQ(config.block_n, d <= 64 ? 128 : 64) << config.name();
      EXPECT_EQ(config.row_tiles, d <= 128 ? 2 : 1) << config.name();
      const auto fits_twice = [](const ForwardConfig& c) { return 2 * (c.shared_bytes() + 1024) <= 164 * 1024; };
      ForwardConfig double_buffered = config;
      double_buffered.stages = 2;
      EXPECT_EQ(config.stages == 2, fits_twice(double_buffered)) << config.name();
      if (d <= 128) {
        EXPECT_TRUE(fits_twice(config)) << config.name();
      }
    }
}

TEST(AttentionConfig, HopperBackwardPadsTheHeadDimAndLeavesDropoutToMmaSync) {
  for (int64_t d = 1; d <= 256; ++d)
    for (bool deterministic : {false, true})
      for (bool dropout : {false, true}) {
        AttentionProblem p = problem(FAP_DTYPE_BFLOAT16, d);
        p.deterministic = deterministic;
        p.dropout_p = dropout ? 0.1f : 0.0f;
        const BackwardConfig hopper = choose_backward_config(p.features(), 90), portable = choose_backward_config(p.features(), 80);
        EXPECT_EQ(hopper.wgmma, !dropout) << d;
        if (hopper.wgmma) {
          EXPECT_EQ(hopper.head_dim, d <= 64 ? 64 : d <= 128 ? 128 : 256) << d;
        }
        EXPECT_GE(portable.head_dim, d);
        EXPECT_FALSE(portable.wgmma);
      }
}

// The decision list: Hopper's families first (the backward's without dropout), mma.sync from sm_75 on (float16
// only on sm_75), and nothing below it.
TEST(AttentionConfig, FamiliesAreTriedInOrder) {
  AttentionProblem p = problem(FAP_DTYPE_BFLOAT16, 128);
  EXPECT_TRUE(choose_forward_config(p.features(), 90).wgmma);
  EXPECT_FALSE(choose_forward_config(p.features(), 89).wgmma);
  EXPECT_TRUE(choose_backward_config(p.features(), 90).wgmma);
  p.dropout_p = 0.1f;
  EXPECT_TRUE(choose_forward_config(p.features(), 90).wgmma);
  EXPECT_FALSE(choose_backward_config(p.features(), 90).wgmma);
  auto expect_unsupported = [](auto choose, const std::string& text) {
    try {
      choose();
      ADD_FAILURE() << "expected: " << text;
    } catch (const Error& error) {
      EXPECT_EQ(error.status(), FAP_ERROR_UNSUPPORTED);
      EXPECT_NE(std::string(error.what()).find(text), std::string::npos) << error.what();
    }
  };
  expect_unsupported([&] { choose_forward_config(p.features(), 70); }, "compute capability 7.0");
  expect_unsupported([&] { choose_backward_config(p.features(), 75); }, "bfloat16 needs compute capability 8.0");
  expect_unsupported([&] { choose_decode_config(p.features(), 75); }, "bfloat16 needs compute capability 8.0");
  AttentionProblem half = problem(FAP_DTYPE_FLOAT16, 128);
  EXPECT_FALSE(choose_forward_config(half.features(), 75).wgmma);
  EXPECT_LE(choose_backward_config(half.features(), 75).shared_bytes(), 64 * 1024);
  AttentionProblem wide_alibi = problem(FAP_DTYPE_FLOAT16, 224);
  const float slopes[] = {0.5f};
  wide_alibi.alibi_slopes = slopes;
  expect_unsupported([&] { choose_decode_config(wide_alibi.features(), 75); }, "take head dims up to 208");
  EXPECT_EQ(choose_decode_config(wide_alibi.features(), 80).head_dim, 224);
}

// Two CTAs of 4 warps per SM when the call has a CTA for every SM before any key split and two fit the SM's
// shared memory; one CTA of 8 warps otherwise, or when two of 8 fit already.
TEST(AttentionConfig, DecodeWarpsFollowTheCallsCtas) {
  const KernelFeatures d128 = problem(FAP_DTYPE_BFLOAT16, 128).features();
  EXPECT_EQ(choose_decode_config(d128, 90, 8, 132).warps, 8);     // batch 1: key splits fill the GPU
  EXPECT_EQ(choose_decode_config(d128, 90, 131, 132).warps, 8);
  EXPECT_EQ(choose_decode_config(d128, 90, 132, 132).warps, 4);
  EXPECT_EQ(choose_decode_config(d128, 90, 1024, 132).warps, 4);
  EXPECT_LE(2 * (choose_decode_config(d128, 90, 1024, 132).shared_bytes() + 1024), 228 * 1024);
  EXPECT_EQ(choose_decode_config(d128, 80, 1024, 108).warps, 8);  // sm_80's 164 KB hold one CTA of either
  EXPECT_EQ(choose_decode_config(problem(FAP_DTYPE_BFLOAT16, 64).features(), 90, 1024, 132).warps, 8);  // 2 fit
  EXPECT_EQ(choose_decode_config(problem(FAP_DTYPE_BFLOAT16, 192).features(), 90, 1024, 132).stages, 2);
}

// Without a window the main kernels' grids run one (batch, head) after the other; with one (a causal mask) each
// head's blocks rank by rank across the batch (place_in_grid), except where the blocks outgrow a grid's y extent.
TEST(AttentionConfig, MainGridsPutTheBatchFirstUnderAMask) {
  const auto expect_grid = [](Grid grid, int64_t x, int64_t y, int64_t z) {
    EXPECT_EQ(grid.x, x);
    EXPECT_EQ(grid.y, y);
    EXPECT_EQ(grid.z, z);
  };
  expect_grid(forward_grid(false, 32, 4, 16), 32, 4, 16);
  expect_grid(forward_grid(true, 32, 4, 16), 4, 32, 16);
  expect_grid(forward_grid(true, 65535, 4, 16), 4, 65535, 16);
  expect_grid(forward_grid(true, 65536, 4, 16), 65536, 4, 16);  // the kernel tells by gridDim.x > 65535
  expect_grid(backward_grid(false, 32, 4, 8), 32, 4, 8);
  expect_grid(backward_grid(true, 32, 4, 8), 4, 32, 8);
  expect_grid(backward_grid(true, 70000, 4, 8), 4, 65535, 8);  // its CTAs loop over every 65535th key block
}

TEST(AttentionConfig, ArchitectureNames) {
  EXPECT_EQ(nvrtc_arch(80), "sm_80");
  EXPECT_EQ(nvrtc_arch(86), "sm_86");
  EXPECT_EQ(nvrtc_arch(90), "sm_90a");
}

// Compiles every (configuration, architecture) pair on all cores; returns the number that compiled and
// reports each failure. With FAP_COMPILE_TEST_CACHE set (scripts/test.sh sets it to a directory beside its cached
// virtual environment), the compiles go through a KernelCache there, like ccache for the C++: its key holds NVRTC's
// version, the architecture, the options (the spill checks among them) and hashes of the kernel source and of
// every header, so a configuration compiles again whenever anything it is built from changes, and a failed one is
// never stored.
template <typename Config>
size_t compile_all(const std::vector<std::pair<Config, const char*>>& targets) {
  const Compiler compiler = nvrtc_compiler();
  std::optional<KernelCache> cache;
  if (const char* directory = std::getenv("FAP_COMPILE_TEST_CACHE"); directory && *directory)
    cache.emplace(compiler, directory);
  std::vector<CompileRequest> requests;
  for (const auto& [config, arch] : targets) {
    CompileRequest request = compile_request(config, arch);
    for (const char* option : {"--ptxas-options=--warn-on-spills", "--ptxas-options=--warn-on-local-memory-usage",
                               "--ptxas-options=--warning-as-error"}) {
      request.options.emplace_back(option);
    }
    requests.push_back(request);
  }
  std::atomic<size_t> next{0};
  std::vector<std::string> failures(requests.size());
  std::vector<std::thread> workers;
  const unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  for (unsigned t = 0; t < threads; ++t) {
    workers.emplace_back([&] {
      for (size_t i = next++; i < requests.size(); i = next++) {
        try {
          const std::string cubin = cache ? cache->cubin(requests[i]) : compiler.compile(requests[i]);
          if (cubin.substr(1, 3) != "ELF") failures[i] = "not an ELF image";
        } catch (const Error& error) {
          failures[i] = error.what();
        }
      }
    });
  }
  for (std::thread& worker : workers) worker.join();
  size_t failed = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    if (failures[i].empty()) continue;
    ++failed;
    ADD_FAILURE() << requests[i].name << " for " << requests[i].arch << ": " << failures[i];
  }
  return requests.size() - failed;
}

// The configurations sm_86 and sm_89 (99 KB of shared memory per block) get where they differ from sm_80's, each
// compiled for both: the others are sm_80's, compiled for sm_80 (the same instruction set and register file).
template <typename Config>
void add_small_shared_memory_targets(std::vector<std::pair<Config, const char*>>& targets,
                                     const std::vector<Config>& sm80, const std::vector<Config>& sm86) {
  std::set<std::string> names;
  for (const Config& config : sm80) names.insert(config.name());
  for (const Config& config : sm86)
    if (!names.count(config.name()))
      for (const char* arch : {"sm_86", "sm_89"}) targets.emplace_back(config, arch);
}

// Each architecture compiles what its own dispatch selects: sm_80 its mma.sync configurations, sm_86/sm_89 theirs
// where they differ, sm_90a the wgmma ones and the mma.sync ones Hopper runs (the indexed forward, the
// backward with dropout). FLASH_ATTENTION_PLUS_PORTABLE_KERNELS=1 on Hopper (a benchmarking aid: sm_80's
// configurations compiled for sm_90a) is not covered beyond those.
TEST(AttentionKernelCompile, ForwardConfigurationsCompileWithoutSpills) {
  std::string reason;
  if (!nvrtc(&reason)) GTEST_SKIP() << reason;
  std::vector<std::pair<ForwardConfig, const char*>> targets;
  for (const ForwardConfig& config : all_forward_configs(80)) targets.emplace_back(config, "sm_80");
  add_small_shared_memory_targets(targets, all_forward_configs(80), all_forward_configs(86));
  for (const ForwardConfig& config : all_indexed_forward_configs(80)) targets.emplace_back(config, "sm_80");
  add_small_shared_memory_targets(targets, all_indexed_forward_configs(80), all_indexed_forward_configs(86));
  for (const ForwardConfig& config : all_indexed_forward_configs(90)) targets.emplace_back(config, "sm_90a");
  const size_t mma_sync = targets.size();
  for (const ForwardConfig& config : all_forward_configs(90)) targets.emplace_back(config, "sm_90a");
  const size_t compiled = compile_all(targets);
  std::printf("NVRTC compiled %zu of %zu forward kernels (%zu mma.sync ones: sm_80, sm_86/sm_89 where their "
              "configuration differs, the indexed ones for sm_90a; %zu wgmma configurations x sm_90a)\n", compiled,
              targets.size(), mma_sync, targets.size() - mma_sync);
}

TEST(AttentionKernelCompile, BackwardConfigurationsCompileWithoutSpills) {
  std::string reason;
  if (!nvrtc(&reason)) GTEST_SKIP() << reason;
  std::vector<std::pair<BackwardConfig, const char*>> targets;
  for (const BackwardConfig& config : all_backward_configs(80)) targets.emplace_back(config, "sm_80");
  add_small_shared_memory_targets(targets, all_backward_configs(80), all_backward_configs(86));
  for (const BackwardConfig& config : all_backward_configs(90))
    if (!config.wgmma) targets.emplace_back(config, "sm_90a");
  const size_t mma_sync = targets.size();
  for (const BackwardConfig& config : all_backward_configs(90))
    if (config.wgmma) targets.emplace_back(config, "sm_90a");
  const size_t compiled = compile_all(targets);
  std::printf("NVRTC compiled %zu of %zu backward kernels (%zu mma.sync ones: sm_80, sm_86/sm_89 where their "
              "configuration differs, those with dropout for sm_90a; %zu wgmma configurations x sm_90a)\n", compiled,
              targets.size(), mma_sync, targets.size() - mma_sync);
}

TEST(AttentionKernelCompile, DecodeConfigurationsCompileWithoutSpills) {
  std::string reason;
  if (!nvrtc(&reason)) GTEST_SKIP() << reason;
  std::vector<std::pair<DecodeConfig, const char*>> targets;
  for (const DecodeConfig& config : all_decode_configs(80)) targets.emplace_back(config, "sm_80");
  add_small_shared_memory_targets(targets, all_decode_configs(80), all_decode_configs(86));
  for (const DecodeConfig& config : all_decode_configs(90)) targets.emplace_back(config, "sm_90a");
  const size_t compiled = compile_all(targets);
  std::printf("NVRTC compiled %zu of %zu decode kernels (sm_80, sm_86/sm_89 where their configuration differs, "
              "sm_90a)\n", compiled, targets.size());
}

TEST(AttentionKernelCompile, ProbsConfigurationsCompileWithoutSpills) {
  std::string reason;
  if (!nvrtc(&reason)) GTEST_SKIP() << reason;
  std::vector<std::pair<ProbsConfig, const char*>> targets;
  for (const ProbsConfig& config : all_probs_configs(80)) targets.emplace_back(config, "sm_80");
  for (const ProbsConfig& config : all_probs_configs(90)) targets.emplace_back(config, "sm_90a");
  for (const ProbsConfig& config : all_probs_configs(75)) targets.emplace_back(config, "sm_75");
  const size_t compiled = compile_all(targets);
  std::printf("NVRTC compiled %zu of %zu S_dmask kernels (sm_80, sm_90a; float16 for sm_75)\n", compiled,
              targets.size());
}

// Turing (sm_75, float16 only, 64 KB of shared memory per block): every configuration its dispatch selects, in
// each family, compiled for sm_75 (where the kernels take their synchronous-copy and m16n8k8 paths).
TEST(AttentionKernelCompile, TuringConfigurationsCompileWithoutSpills) {
  std::string reason;
  if (!nvrtc(&reason)) GTEST_SKIP() << reason;
  std::vector<std::pair<ForwardConfig, const char*>> forward;
  for (const ForwardConfig& config : all_forward_configs(75)) forward.emplace_back(config, "sm_75");
  for (const ForwardConfig& config : all_indexed_forward_configs(75)) forward.emplace_back(config, "sm_75");
  std::vector<std::pair<BackwardConfig, const char*>> backward;
  for (const BackwardConfig& config : all_backward_configs(75)) backward.emplace_back(config, "sm_75");
  std::vector<std::pair<DecodeConfig, const char*>> decode;
  for (const DecodeConfig& config : all_decode_configs(75)) decode.emplace_back(config, "sm_75");
  const size_t compiled = compile_all(forward) + compile_all(backward) + compile_all(decode);
  std::printf("NVRTC compiled %zu of %zu Turing kernels (forward, indexed forward, backward, decode; float16)\n",
              compiled, forward.size() + backward.size() + decode.size());
}

}  // namespace
}  // namespace fap::cuda
