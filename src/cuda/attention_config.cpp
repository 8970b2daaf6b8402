#include "src/cuda/attention_config.h"

#include <algorithm>
#include <set>

#include "core/error.h"
#include "src/cuda/kernel_sources.h"
#include "src/cuda/kernels/tile_layouts.h"

namespace fap::cuda {

std::string ForwardConfig::name() const {
  std::string text = concat(wgmma ? "attention_fwd_sm90_" : "attention_fwd_", bf16 ? "bf16" : "fp16", "_d", head_dim,
                            "_m", block_m, "_n", block_n, "_w", warps);
  if (wgmma || stages != 2) text += concat("_s", stages);
  if (window) text += "_window";
  if (softcap) text += "_softcap";
  if (alibi) text += "_alibi";
  if (dropout) text += "_dropout";
  if (indexed_keys) text += "_indexed";
  if (persistent) text += "_persistent";
  return text;
}

std::vector<std::string> ForwardConfig::defines() const {
  return {concat("-DFAP_HEAD_DIM=", head_dim), concat("-DFAP_BLOCK_M=", block_m), concat("-DFAP_BLOCK_N=", block_n),
          concat("-DFAP_WARPS=", warps),       concat("-DFAP_ROW_TILES=", row_tiles),
          concat("-DFAP_MIN_BLOCKS=", min_blocks),       concat("-DFAP_BF16=", int{bf16}),   concat("-DFAP_SOFTCAP=", int{softcap}),
          concat("-DFAP_ALIBI=", int{alibi}),  concat("-DFAP_DROPOUT=", int{dropout}), concat("-DFAP_WINDOW=", int{window}),
          concat("-DFAP_STAGES=", stages),    concat("-DFAP_INDEXED_KEYS=", int{indexed_keys}),
          concat("-DFAP_PERSISTENT=", int{persistent}), concat("-DFAP_CTA_KEYS_BYTES=", kCtaKeysBytes)};
}

std::string ForwardConfig::source_file() const { return wgmma ? "attention_fwd_sm90.cuh" : "attention_fwd.cuh"; }

int ForwardConfig::shared_bytes() const {
  return wgmma ? HopperForwardSharedLayout{block_m, block_n, head_dim, stages}.bytes()
               : ForwardSharedLayout{block_m, block_n, head_dim, stages, kCtaKeysBytes}.bytes();
}

std::string BackwardConfig::name() const {
  std::string text = concat(wgmma ? "attention_bwd_sm90_" : "attention_bwd_", bf16 ? "bf16" : "fp16", "_d", head_dim,
                            "_m", block_m, "_n", block_n, "_w", warps, "_s", dkv_split, "_q", q_stages);
  if (do_stages != q_stages) text += concat("_do", do_stages);
  if (key_tile != 16) text += concat("_k", key_tile);
  if (window) text += "_window";
  if (softcap) text += "_softcap";
  if (alibi) text += "_alibi";
  if (dropout) text += "_dropout";
  return text;
}

std::vector<std::string> BackwardConfig::defines() const {
  return {concat("-DFAP_HEAD_DIM=", head_dim),   concat("-DFAP_BLOCK_M=", block_m),
          concat("-DFAP_BLOCK_N=", block_n),     concat("-DFAP_WARPS=", warps),
          concat("-DFAP_DKV_SPLIT=", dkv_split), concat("-DFAP_KEY_TILE=", key_tile),
          concat("-DFAP_Q_STAGES=", q_stages),   concat("-DFAP_DO_STAGES=", do_stages),
          concat("-DFAP_BF16=", int{bf16}),
          concat("-DFAP_SOFTCAP=", int{softcap}), concat("-DFAP_ALIBI=", int{alibi}),
          concat("-DFAP_DROPOUT=", int{dropout}), concat("-DFAP_WINDOW=", int{window}),
          concat("-DFAP_DQ_TILES=", int{wgmma})};
}

int BackwardConfig::shared_bytes() const {
  if (wgmma) return hopper_backward_layout(block_m, block_n, head_dim, softcap, alibi).bytes();
  return BackwardSharedLayout{block_m, block_n, head_dim, q_stages, do_stages, dkv_split == 1}.bytes();
}

std::string DecodeConfig::name() const {
  std::string text = concat("attention_decode_", bf16 ? "bf16" : "fp16", "_d", head_dim, "_n", block_n, "_s", stages,
                            "_w", warps);
  if (window) text += "_window";
  if (softcap) text += "_softcap";
  if (alibi) text += "_alibi";
  return text;
}

std::vector<std::string> DecodeConfig::defines() const {
  return {concat("-DFAP_HEAD_DIM=", head_dim),  concat("-DFAP_BLOCK_N=", block_n),  concat("-DFAP_STAGES=", stages),
          concat("-DFAP_WARPS=", warps),        concat("-DFAP_BF16=", int{bf16}),   concat("-DFAP_SOFTCAP=", int{softcap}),
          concat("-DFAP_ALIBI=", int{alibi}),   std::string("-DFAP_DROPOUT=0"),    concat("-DFAP_WINDOW=", int{window})};
}

int DecodeConfig::shared_bytes() const { return DecodeSharedLayout{head_dim, block_n, stages, warps}.bytes(); }

std::string ProbsConfig::name() const {
  std::string text = concat("attention_probs_", bf16 ? "bf16" : "fp16");
  if (window) text += "_window";
  if (softcap) text += "_softcap";
  if (alibi) text += "_alibi";
  if (dropout) text += "_dropout";
  return text;
}

std::vector<std::string> ProbsConfig::defines() const {
  return {std::string("-DFAP_HEAD_DIM=16"),  concat("-DFAP_WARPS=", kWarps),       concat("-DFAP_BF16=", int{bf16}),
          concat("-DFAP_SOFTCAP=", int{softcap}), concat("-DFAP_ALIBI=", int{alibi}), concat("-DFAP_DROPOUT=", int{dropout}),
          concat("-DFAP_WINDOW=", int{window})};
}

namespace {

// The shared memory one block may opt into: sm_90 and sm_100 227 KB, sm_80 and sm_87 163 KB, sm_75 64 KB, the
// others (sm_86, sm_89, sm_120) 99 KB.
int shared_memory_budget(int compute_capability) {
  switch (compute_capability) {
    case 90: case 100: case 103: return 227 * 1024;
    case 80: case 87: return 163 * 1024;
    case 75: return 64 * 1024;
    default: return 99 * 1024;
  }
}

// Whether two CTAs of `shared_bytes` fit one SM, whose shared memory is the block budget plus 1 KB, of which
// each CTA reserves 1 KB.
bool fits_twice_per_sm(int shared_bytes, int compute_capability) {
  return 2 * (shared_bytes + 1024) <= shared_memory_budget(compute_capability) + 1024;
}

[[noreturn]] void no_kernel_for(int compute_capability) {
  fail(FAP_ERROR_UNSUPPORTED, "backend 'cuda': no kernel runs on compute capability ", compute_capability / 10, ".",
       compute_capability % 10);
}

// Every family runs from sm_75 (Turing) on, where the tensor cores have no bfloat16: that is refused by name.
void require_kernels_for(const KernelFeatures& features, int compute_capability) {
  if (compute_capability < 75) no_kernel_for(compute_capability);
  if (compute_capability < 80 && features.dtype == FAP_DTYPE_BFLOAT16) {
    fail(FAP_ERROR_UNSUPPORTED, "backend 'cuda': bfloat16 needs compute capability 8.0 (Ampere) or newer; this GPU (",
         compute_capability / 10, ".", compute_capability % 10, ") runs float16");
  }
}

// Calls visit(features) for every dtype the compute capability runs (float16, and bfloat16 from sm_80) x head
// dim (multiples of 16 up to 256) x combination of the first `flags` of window, softcap, alibi, dropout.
template <typename Visit>
void for_each_feature_set(int compute_capability, int flags, Visit&& visit) {
  for (int bf16 = 0; bf16 < (compute_capability >= 80 ? 2 : 1); ++bf16)
    for (int head_dim = 16; head_dim <= 256; head_dim += 16)
      for (int bits = 0; bits < (1 << flags); ++bits) {
        KernelFeatures features;
        features.dtype = bf16 ? FAP_DTYPE_BFLOAT16 : FAP_DTYPE_FLOAT16;
        features.head_dim = head_dim;
        features.window = bits & 1;
        features.softcap = bits & 2;
        features.alibi = bits & 4;
        features.dropout = bits & 8;
        visit(features);
      }
}

}  // namespace

DecodeConfig choose_decode_config(const KernelFeatures& features, int compute_capability, int64_t ctas,
                                  int multiprocessors) {
  require_kernels_for(features, compute_capability);
  DecodeConfig config;
  config.bf16 = features.dtype == FAP_DTYPE_BFLOAT16;
  config.head_dim = static_cast<int>((features.head_dim + 15) / 16 * 16);
  config.softcap = features.softcap, config.alibi = features.alibi, config.window = features.window;
  // Decoding is bound by the bandwidth of reading K and V: what matters is how many bytes are in flight. 16-key
  // tiles, 8 warps of 3 stages each where the device's shared memory per block holds them, else 2 stages, else
  // fewer warps (measured on the H200: bench/RESULTS.md).
  const int budget = shared_memory_budget(compute_capability);
  const auto fits_twice = [&] { return fits_twice_per_sm(config.shared_bytes(), compute_capability); };
  config.block_n = 16, config.warps = 8, config.stages = 3;
  // With a CTA for every SM before any key split, two CTAs of 4 warps per SM beat one of 8 (one's start and end
  // pass while the other streams keys), where two fit.
  if (ctas >= multiprocessors && !fits_twice()) {
    config.warps = 4;
    if (!fits_twice()) config.warps = 8;
  }
  if (config.shared_bytes() > budget) config.stages = 2;
  while (config.shared_bytes() > budget && config.warps > 1) config.warps /= 2;
  // sm_75's 64 KB hold one warp's stages above d = 208, and that single warp spills registers with ALiBi.
  if (config.warps == 1 && config.alibi) {
    fail(FAP_ERROR_UNSUPPORTED, "backend 'cuda': KV-cache calls with alibi_slopes take head dims up to 208 on compute "
         "capability ", compute_capability / 10, ".", compute_capability % 10, ", got ", features.head_dim);
  }
  return config;
}

std::vector<DecodeConfig> all_decode_configs(int compute_capability) {
  std::set<DecodeConfig> configs;
  for_each_feature_set(compute_capability, 3, [&](const KernelFeatures& features) {  // no dropout in decode calls
    try {
      configs.insert(choose_decode_config(features, compute_capability, 0, 1));  // few CTAs
      configs.insert(choose_decode_config(features, compute_capability, 1, 1));  // a CTA for every SM
    } catch (const Error&) {  // a combination this compute capability does not run (above)
    }
  });
  return {configs.begin(), configs.end()};
}

ProbsConfig choose_probs_config(const KernelFeatures& features, int compute_capability) {
  require_kernels_for(features, compute_capability);
  ProbsConfig config;
  config.bf16 = features.dtype == FAP_DTYPE_BFLOAT16;
  config.softcap = features.softcap, config.alibi = features.alibi, config.dropout = features.dropout;
  config.window = features.window;
  return config;
}

std::vector<ProbsConfig> all_probs_configs(int compute_capability) {
  std::set<ProbsConfig> configs;
  for_each_feature_set(compute_capability, 4, [&](const KernelFeatures& features) {
    configs.insert(choose_probs_config(features, compute_capability));
  });
  return {configs.begin(), configs.end()};
}

namespace {

// Backward tiles: the first of these shapes that fits the block's shared memory (the compile test checks that
// none spills and that each fits its architecture's shared memory):
// - sm_80's 164 KB: FlashAttention-2's tiles, 128 keys x 64 queries per step up to d = 128 (128 queries at d <= 64
//   with the dO tile single-buffered, Q double: +2-4 %; except with dropout, which spills there) and 64 x 64 at
//   d = 192 and 256, 32 keys per group of 2 (4 at d = 192/256) warps sharing them (1.03-1.18x the 16-key tiles
//   below on an H200; bench/RESULTS.md). With dropout above d = 64 they spill on sm_80, and d = 160/224 would pad
//   to 192/256. Above d = 64 the Q and dO tiles are single-buffered (Q double-buffered was 1-4 % slower at d = 128).
// - Up to d = 128, 8 warps, one warp per 16 keys (dkv_split = 1: P^T and dS^T stay in its registers for dV and
//   dK), 128 keys per CTA and 128 queries per step at d <= 64, 64 above (dK and dV take the registers the wider
//   step would need), the Q/dO tiles double-buffered.
// - Warps sharing keys (dK and dV of 16 keys at d > 128 do not fit one warp's registers; 99 KB (sm_86/sm_89) or
//   64 KB (sm_75) do not hold 128 keys): dkv_split warps per 16 keys, each computing S^T and dP^T for
//   1/dkv_split of the step's queries (at least 16) and keeping dK, dV for 1/dkv_split of the head dim. Above
//   d = 128, 2 warps per 16 keys and single-buffered Q/dO tiles of 64 queries (32 with dropout, whose Philox
//   rounds need registers), else 4 per 16 keys; up to d = 128, 2 warps per 16 keys and 32 queries per step (64
//   spill at d = 112, 128), double- then single-buffered; then fewer warps (fewer keys per CTA).
void set_backward_tiles(BackwardConfig& config, int compute_capability) {
  struct Shape {
    int warps, dkv_split, key_tile, block_m, q_stages, do_stages;
  };
  const int head_dim = config.head_dim;
  std::vector<Shape> shapes;
  if (head_dim <= 128) {
    if (head_dim <= 64 && !config.dropout) shapes.push_back({8, 2, 32, 128, 2, 1});
    if (!(config.dropout && head_dim > 64)) {
      const int stages = head_dim <= 64 ? 2 : 1;
      shapes.push_back({8, 2, 32, 64, stages, stages});
    }
    shapes.insert(shapes.end(), {{8, 1, 16, head_dim <= 64 ? 128 : 64, 2, 2},
                                 {8, 1, 16, 64, 2, 2},
                                 {8, 2, 16, head_dim <= 64 ? 64 : 32, 2, 2},
                                 {8, 2, 16, head_dim <= 64 ? 64 : 32, 1, 1},
                                 {4, 2, 16, 32, 1, 1},
                                 {2, 2, 16, 32, 1, 1}});
  } else {
    if (!config.dropout && head_dim % 64 == 0) shapes.push_back({8, 4, 32, 64, 1, 1});
    shapes.insert(shapes.end(), {{8, 2, 16, config.dropout ? 32 : 64, 1, 1},
                                 {8, 4, 16, 64, 1, 1},
                                 {4, 2, 16, 32, 1, 1},
                                 {2, 2, 16, 32, 1, 1}});
  }
  for (const Shape& shape : shapes) {
    config.warps = shape.warps, config.dkv_split = shape.dkv_split, config.key_tile = shape.key_tile;
    config.block_m = shape.block_m, config.q_stages = shape.q_stages, config.do_stages = shape.do_stages;
    config.block_n = shape.key_tile * shape.warps / shape.dkv_split;
    // Head dims padded (with zero columns) to multiples of 32, FlashAttention-2's, and so that each warp's dK/dV
    // columns are whole 16-column MMA tiles.
    const int multiple = std::max(32, 16 * shape.dkv_split);
    config.head_dim = (head_dim + multiple - 1) / multiple * multiple;
    if (config.shared_bytes() <= shared_memory_budget(compute_capability)) return;
  }
}

// The sm_90 backward without dropout: head dims padded to 64, 128 or 256 (the workspace size asked for covers
// this). Up to d = 128 two warpgroups of 64 keys, 64 queries per step at d = 128 and 128 at d = 64 (the
// registers d = 128 keeps for dK and dV hold the wider scores instead); at d = 256 two warpgroups of 128
// columns on 64 keys, 64 queries per step. Dropout: the mma.sync tiles.
void set_sm90_backward_tiles(BackwardConfig& config, int) {
  config.wgmma = true;
  config.head_dim = config.head_dim <= 64 ? 64 : config.head_dim <= 128 ? 128 : 256;
  config.warps = 8, config.dkv_split = 1, config.q_stages = 2, config.do_stages = 2;
  if (config.head_dim == 256) {
    config.block_m = 64, config.block_n = 64;
  } else {
    config.block_m = 8192 / config.head_dim, config.block_n = 128;
  }
}

// The mma.sync forward's tile shapes where FlashAttention-2's do not apply (tests/cuda/test_attention_config.cpp
// fails on spills; measured on the H100 and H200: bench/RESULTS.md): by default one warp per 16 rows, 8 warps,
// 64-key tiles, K and V double-buffered. Without any score feature and for 64 < d <= 128, a warp takes two
// 16-row tiles with 32-key tiles. Softcap, ALiBi and dropout need registers of their own. Above d = 128, 8 warps
// and 32-key tiles. Where the block's shared memory does not hold that (sm_86/sm_89's 99 KB at the largest head
// dims, sm_75's 64 KB), smaller tiles.
void set_compact_tiles(ForwardConfig& config, int compute_capability) {
  const bool plain_scores = !config.window && !config.softcap && !config.alibi && !config.dropout;
  config.stages = 2;
  if (config.dropout) {
    // Philox rounds for every score: all registers to one CTA (else ptxas spills at some head dims), and
    // above d = 64 the 4-warp, 32-key shape.
    config.min_blocks = 1;
    if (config.head_dim <= 64) {
      config.block_n = 64, config.warps = 8, config.row_tiles = 1;
    } else {
      config.block_n = 32, config.warps = 4, config.row_tiles = 1;
    }
  } else if (config.head_dim > 64 && config.head_dim <= 128 && plain_scores) {
    config.block_n = 32, config.warps = 4, config.row_tiles = 2;
  } else if (config.head_dim <= 128) {
    config.block_n = 64, config.warps = 8, config.row_tiles = 1;
    // The window's per-row bounds spill a few registers at d <= 64 when ptxas keeps two CTAs per SM.
    if (config.window && config.head_dim <= 64) config.min_blocks = 1;
  } else {
    config.block_n = 32, config.warps = 8, config.row_tiles = 1, config.min_blocks = 1;
  }
  // sm_75 (64 KB of shared memory per SM: one CTA of these tiles) gives the CTA every register; two CTAs' worth
  // spilled at d = 64 with softcap.
  if (compute_capability < 80) config.min_blocks = 1;
  // Where the block's shared memory does not hold the tiles: one row tile per warp, 4 warps, narrower key tiles,
  // then fewer warps.
  const int budget = shared_memory_budget(compute_capability);
  auto fits = [&] {
    config.block_m = 16 * config.row_tiles * config.warps;
    return config.shared_bytes() <= budget;
  };
  if (!fits() && config.row_tiles == 2) config.row_tiles = 1;
  if (!fits() && config.warps == 8) config.warps = 4;
  while (!fits() && config.block_n > 16) config.block_n /= 2;
  while (!fits() && config.warps > 2) config.warps /= 2;
}

// Tile shapes per head dim. On GPUs with sm_80's shared memory (A100, and Hopper running these kernels) and
// without softcap, ALiBi or dropout, FlashAttention-2's: 128 rows of 4 warps with two 16-row tiles each (every
// K/V fragment read from shared memory feeds two MMAs) and 128 keys up to d = 64, 64 keys up to d = 128; above,
// 8 warps of one row tile and 64 keys. K and V double-buffered where two CTAs still fit an SM, else
// FlashAttention-2's single-buffered pipeline (an H200 running the sm_80 shapes, bf16, 16k tokens, against
// FlashAttention-2's kernels: d = 64 0.91-0.96x, d = 128 0.88-0.93x, d = 256 0.72-0.88x, before 0.64-0.84x;
// bench/RESULTS.md). Elsewhere set_compact_tiles.
void set_tiles(ForwardConfig& config, int compute_capability) {
  const int budget = shared_memory_budget(compute_capability);
  if (budget < 163 * 1024 || config.softcap || config.alibi || config.dropout) {
    set_compact_tiles(config, compute_capability);
    return;
  }
  config.min_blocks = config.head_dim > 128;
  config.warps = config.head_dim > 128 ? 8 : 4;
  config.row_tiles = config.head_dim > 128 ? 1 : 2;
  config.block_n = config.head_dim <= 64 ? 128 : 64;
  config.block_m = 16 * config.row_tiles * config.warps;
  config.stages = 2;
  if (!fits_twice_per_sm(config.shared_bytes(), compute_capability)) config.stages = 1;
}

// The sm_90 kernel: a producer warpgroup and consumer warpgroups of 64 rows each, head dims in whole 64-column
// blocks of the 128-byte swizzle.
void set_sm90_consumers(ForwardConfig& config, int consumers) {
  config.block_m = 64 * consumers;
  config.warps = 4 * (1 + consumers);
}

// Three consumers (192 x 128 tiles, FlashAttention-3's shape) at d = 64, where a consumer thread's 160 registers
// hold its output, scores and P (+12-16 % over two at 4k-16k tokens on an H200); two elsewhere. A consumer thread
// holds d / 2 registers of output and block_n / 2 of scores: 128-key tiles up to d = 128; at d = 256 80 keys, the
// most whose two stages fit beside the Q tile (+3-7 % over 64), and 64 at d = 192 (80 would leave it 2 stages of
// 3); dropout's Philox rounds take registers too, so it gets two consumers and fewer keys (the compile test checks
// that nothing spills).
void set_sm90_tiles(ForwardConfig& config, int) {
  config.wgmma = true;
  config.head_dim = (config.head_dim + 63) / 64 * 64;
  config.row_tiles = 1, config.min_blocks = 1;
  set_sm90_consumers(config, config.head_dim == 64 && !config.dropout ? 3 : 2);
  if (config.head_dim <= 128)
    config.block_n = config.dropout ? 64 : 128;
  else
    config.block_n = config.dropout ? 32 : config.head_dim == 256 ? 80 : 64;
  // Three stages where they fit in the 227 KB a block may have on sm_90, so that the producer runs ahead.
  config.stages = 3;
  if (config.shared_bytes() > 227 * 1024) config.stages = 2;
}

// A grid's y extent.
constexpr int64_t kMaxGridY = 65535;

}  // namespace

Grid forward_grid(bool window, int64_t blocks, int64_t batch, int64_t heads) {
  if (window && blocks <= kMaxGridY) return {batch, blocks, heads};
  return {blocks, batch, heads};
}

Grid backward_grid(bool window, int64_t blocks, int64_t batch, int64_t heads) {
  if (window) return {batch, std::min(blocks, kMaxGridY), heads};
  return {blocks, batch, heads};
}

namespace {

// The kernel families of each direction, in the order the dispatch tries them: the first that runs the call's
// features on the device's compute capability is chosen, and its tile rule shapes the configuration. A new
// family is one entry here (and its kernel file).
template <typename Config>
struct KernelFamily {
  bool (*runs)(const KernelFeatures& features, int compute_capability);
  void (*set_tile_shape)(Config& config, int compute_capability);
};

bool on_hopper(const KernelFeatures&, int compute_capability) { return compute_capability == 90; }
bool on_hopper_without_dropout(const KernelFeatures& features, int compute_capability) {
  return compute_capability == 90 && !features.dropout;  // dropout's backward stays on mma.sync
}
bool on_sm75_and_later(const KernelFeatures&, int compute_capability) { return compute_capability >= 75; }

const KernelFamily<ForwardConfig> kForwardFamilies[] = {
    {on_hopper, set_sm90_tiles},          // attention_fwd_sm90.cuh: wgmma, warp-specialised
    {on_sm75_and_later, set_tiles},       // attention_fwd.cuh: mma.sync
};

const KernelFamily<BackwardConfig> kBackwardFamilies[] = {
    {on_hopper_without_dropout, set_sm90_backward_tiles},  // attention_bwd_sm90(_wide).cuh: wgmma
    {on_sm75_and_later, set_backward_tiles},               // attention_bwd.cuh: mma.sync
};

// The dtype, head dim (rounded up to a multiple of 16) and features, then the first family's tile shape.
template <typename Config, size_t N>
Config choose(const KernelFamily<Config> (&families)[N], const KernelFeatures& features, int compute_capability) {
  require_kernels_for(features, compute_capability);
  for (const KernelFamily<Config>& family : families) {
    if (!family.runs(features, compute_capability)) continue;
    Config config;
    config.bf16 = features.dtype == FAP_DTYPE_BFLOAT16;
    config.head_dim = static_cast<int>((features.head_dim + 15) / 16 * 16);
    config.softcap = features.softcap;
    config.alibi = features.alibi;
    config.dropout = features.dropout;
    config.window = features.window;
    family.set_tile_shape(config, compute_capability);
    return config;
  }
  no_kernel_for(compute_capability);
}

// Every configuration the dispatch can choose on a compute capability: each dtype x head dim (multiples of 16) x
// feature combination, without repeats (head dims a tile rule pads share the padded one's configuration).
template <typename Config, size_t N>
std::vector<Config> every_config(const KernelFamily<Config> (&families)[N], int compute_capability) {
  std::vector<Config> configs;
  for_each_feature_set(compute_capability, 4, [&](const KernelFeatures& features) {
    const Config config = choose(families, features, compute_capability);
    if (config.head_dim == features.head_dim) configs.push_back(config);
  });
  return configs;
}

}  // namespace

ForwardConfig choose_forward_config(const KernelFeatures& features, int compute_capability) {
  return choose(kForwardFamilies, features, compute_capability);
}

BackwardConfig choose_backward_config(const KernelFeatures& features, int compute_capability) {
  return choose(kBackwardFamilies, features, compute_capability);
}

namespace {
// The capability whose mma.sync configurations a GPU gets: its own, but Hopper's is sm_80's (its own family is
// wgmma).
int mma_sync_capability(int compute_capability) { return compute_capability == 90 ? 80 : compute_capability; }
}  // namespace

ForwardConfig choose_indexed_forward_config(const KernelFeatures& features, int compute_capability) {
  KernelFeatures mma_sync = features;
  mma_sync.dropout = false;
  ForwardConfig config = choose_forward_config(mma_sync, mma_sync_capability(compute_capability));
  config.indexed_keys = true;
  set_compact_tiles(config, mma_sync_capability(compute_capability));  // K and V rows are looked up together
  // Every register to one CTA: the per-row cache addressing spilled a few bytes at d <= 64 with 8 warps otherwise.
  config.min_blocks = 1;
  return config;
}

std::vector<ForwardConfig> all_indexed_forward_configs(int compute_capability) {
  std::vector<ForwardConfig> configs;
  for (ForwardConfig config : all_forward_configs(mma_sync_capability(compute_capability))) {
    if (config.dropout) continue;
    KernelFeatures features;
    features.dtype = config.bf16 ? FAP_DTYPE_BFLOAT16 : FAP_DTYPE_FLOAT16;
    features.head_dim = config.head_dim;
    features.window = config.window, features.softcap = config.softcap, features.alibi = config.alibi;
    configs.push_back(choose_indexed_forward_config(features, compute_capability));
  }
  return configs;
}

ForwardConfig with_forward_schedule(ForwardConfig config, int64_t seqlen_q) {
  // The persistent loop's state does not fit beside dropout's Philox rounds (attention_fwd_sm90.cuh), nor beside
  // three consumers' 160 registers: a three-consumer configuration (d = 64) runs it with two, and only up to 1k
  // queries, where that was faster than three without it (4k: 0.86-0.91x; an H200, bench/RESULTS.md).
  const bool three_consumers = config.block_m == 3 * 64;
  config.persistent =
      config.wgmma && !config.dropout && config.head_dim <= 128 && seqlen_q <= (three_consumers ? 1024 : 4096);
  if (config.persistent) set_sm90_consumers(config, 2);
  return config;
}

std::vector<ForwardConfig> all_forward_configs(int compute_capability) {
  std::vector<ForwardConfig> configs = every_config(kForwardFamilies, compute_capability);
  const size_t chosen = configs.size();
  for (size_t i = 0; i < chosen; ++i) {
    const ForwardConfig persistent = with_forward_schedule(configs[i], 1);
    if (persistent.persistent) configs.push_back(persistent);
  }
  return configs;
}
std::vector<BackwardConfig> all_backward_configs(int compute_capability) {
  return every_config(kBackwardFamilies, compute_capability);
}

std::string BackwardConfig::source_file() const {
  if (!wgmma) return "attention_bwd.cuh";
  return head_dim == 256 ? "attention_bwd_sm90_wide.cuh" : "attention_bwd_sm90.cuh";
}

std::string nvrtc_arch(int compute_capability) {
  return concat("sm_", compute_capability, compute_capability == 90 ? "a" : "");
}

template <typename Config>
CompileRequest compile_request(const Config& config, const std::string& arch) {
  return {config.name(), kernel_translation_unit(config.source_file()), config.defines(), arch, kernel_headers()};
}

template CompileRequest compile_request(const ForwardConfig&, const std::string&);
template CompileRequest compile_request(const BackwardConfig&, const std::string&);
template CompileRequest compile_request(const DecodeConfig&, const std::string&);
template CompileRequest compile_request(const ProbsConfig&, const std::string&);

}  // namespace fap::cuda
