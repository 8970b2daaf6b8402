// The varlen forward over a paged KV cache (block_table) with used key counts (seqused_k): the same call over
// keys scattered into shuffled blocks of a NaN-filled cache, with spare keys after each sequence's used ones,
// gives the contiguous call's out and lse bit for bit (a key read that should not be would bring its NaN in);
// bad tables and counts fail naming the argument.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "flash_attn_plus/flash_attn_plus.h"
#include "tests/support/attention_case.h"

namespace fap::test {
namespace {

constexpr int64_t kPage = 3;

CaseConfig used_keys_case(bool causal) {
  CaseConfig config;
  config.dtype = FAP_DTYPE_FLOAT16;
  config.varlen = true;
  config.batch = 3, config.heads_q = 4, config.heads_kv = 2, config.head_dim = 32;
  config.len_q = {5, 1, 7};
  config.len_k = {9, 4, 13};  // the used keys
  config.causal = causal;
  config.seed = causal ? 21 : 22;
  return config;
}

// A paged copy of a contiguous varlen case's keys and values: sequence b holds len_k[b] + spare[b] keys
// (cu_seqlens_k counts them all), of which seqused_k[b] = len_k[b] are used; the spare keys and unused blocks are
// NaN.
struct PagedCache {
  std::vector<uint16_t> k, v;
  std::vector<int32_t> block_table, cu_seqlens_k, seqused_k;
  int64_t num_blocks = 0, max_blocks = 0;
  std::vector<uint16_t> out;
  std::vector<float> lse;

  PagedCache(const AttentionCase& data, const std::vector<int64_t>& spare) {
    const CaseConfig& c = data.config();
    const int64_t row = c.heads_kv * c.head_dim;  // elements per key row
    std::vector<int64_t> capacity(c.batch);
    cu_seqlens_k.push_back(0);
    for (int64_t b = 0; b < c.batch; ++b) {
      capacity[b] = c.len_k[b] + spare[b];
      cu_seqlens_k.push_back(static_cast<int32_t>(cu_seqlens_k.back() + capacity[b]));
      seqused_k.push_back(static_cast<int32_t>(c.len_k[b]));
      max_blocks = std::max(max_blocks, (capacity[b] + kPage - 1) / kPage);
    }
    num_blocks = c.batch * max_blocks + 2;
    std::vector<int32_t> order(num_blocks);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), std::mt19937(7));
    block_table.assign(c.batch * max_blocks, 0);
    for (int64_t i = 0; i < c.batch * max_blocks; ++i) block_table[i] = order[i];
    k.assign(num_blocks * kPage * row, 0x7e00);  // fp16 NaN
    v = k;
    const auto* k_source = reinterpret_cast<const uint16_t*>(data.k.bytes.data());
    const auto* v_source = reinterpret_cast<const uint16_t*>(data.v.bytes.data());
    for (int64_t b = 0; b < c.batch; ++b)
      for (int64_t t = 0; t < c.len_k[b]; ++t) {
        const int64_t source = (data.cu_seqlens_k[b] + t) * data.k.view.strides[0];
        const int64_t target = (block_table[b * max_blocks + t / kPage] * kPage + t % kPage) * row;
        std::memcpy(&k[target], k_source + source, row * sizeof(uint16_t));
        std::memcpy(&v[target], v_source + source, row * sizeof(uint16_t));
      }
    out.assign(data.out.bytes.size() / sizeof(uint16_t), 0x7e00);
    lse.assign(data.lse.size(), 0.0f);
  }

  fap_fwd_args args(AttentionCase& data) {
    const CaseConfig& c = data.config();
    fap_fwd_args a = data.forward_args();
    const int64_t cache_shape[] = {num_blocks, kPage, c.heads_kv, c.head_dim};
    a.k = fap_make_tensor(k.data(), c.dtype, FAP_DEVICE_CPU, 0, 4, cache_shape);
    a.v = fap_make_tensor(v.data(), c.dtype, FAP_DEVICE_CPU, 0, 4, cache_shape);
    a.out.data = out.data();
    a.softmax_lse.data = lse.data();
    a.attn_probs = fap_tensor{};
    const int64_t table_shape[] = {c.batch, max_blocks}, batch_shape[] = {c.batch},
                  cu_shape[] = {c.batch + 1};
    a.block_table = fap_make_tensor(block_table.data(), FAP_DTYPE_INT32, FAP_DEVICE_CPU, 0, 2, table_shape);
    a.seqused_k = fap_make_tensor(seqused_k.data(), FAP_DTYPE_INT32, FAP_DEVICE_CPU, 0, 1, batch_shape);
    a.cu_seqlens_k = fap_make_tensor(cu_seqlens_k.data(), FAP_DTYPE_INT32, FAP_DEVICE_CPU, 0, 1, cu_shape);
    a.max_seqlen_k = *std::max_element(cu_seqlens_k.begin() + 1, cu_seqlens_k.end());  // >= every count
    return a;
  }
};

fap_status forward(const fap_fwd_args& args, const fap_options& options) {
  size_t bytes = 0;
  if (fap_status status = fap_mha_varlen_fwd_workspace_size(&args, &options, &bytes); status != FAP_SUCCESS)
    return status;
  std::vector<unsigned char> workspace(bytes + 16);
  return fap_mha_varlen_fwd(&args, &options, nullptr, workspace.data(), bytes);
}

class PagedKv : public ::testing::TestWithParam<bool> {};

TEST_P(PagedKv, MatchesTheContiguousCallBitForBit) {
  AttentionCase data(used_keys_case(GetParam()));
  const fap_options options = data.options();
  fap_fwd_args contiguous = data.forward_args();
  contiguous.attn_probs = fap_tensor{};
  ASSERT_EQ(forward(contiguous, options), FAP_SUCCESS) << fap_last_error();
  PagedCache paged(data, {2, 0, 5});
  ASSERT_EQ(forward(paged.args(data), options), FAP_SUCCESS) << fap_last_error();
  EXPECT_EQ(std::memcmp(paged.out.data(), data.out.bytes.data(), data.out.bytes.size()), 0);
  EXPECT_EQ(paged.lse, data.lse);
}

INSTANTIATE_TEST_SUITE_P(Masks, PagedKv, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& param_info) {
                           return param_info.param ? "causal" : "full";
                         });

TEST(PagedKvArguments, BadTablesAndCountsAreNamed) {
  AttentionCase data(used_keys_case(false));
  const fap_options options = data.options();
  const struct {
    const char* name;
    void (*breaks)(PagedCache&, fap_fwd_args&);
    const char* message;
  } cases[] = {
      {"block out of range", [](PagedCache& c, fap_fwd_args&) { c.block_table[c.max_blocks] = 99; },
       "block_table[1][0] = 99: expected a block index in [0, "},
      {"negative block", [](PagedCache& c, fap_fwd_args&) { c.block_table[0] = -1; },
       "block_table[0][0] = -1: expected a block index"},
      {"too few blocks", [](PagedCache&, fap_fwd_args& a) { a.block_table.shape[1] = 1; },
       "block_table: sequence 0 has 11 keys, more than its 1 blocks of 3 hold"},
      {"table dtype", [](PagedCache&, fap_fwd_args& a) { a.block_table.dtype = FAP_DTYPE_FLOAT32; },
       "block_table: expected dtype int32"},
      {"table batch", [](PagedCache&, fap_fwd_args& a) { a.block_table.shape[0] = 2; },
       "block_table: expected shape (batch, max_blocks)"},
      {"cache rank", [](PagedCache&, fap_fwd_args& a) { a.k.rank = 3; },
       "k: expected a rank-4 tensor (num_blocks, page_size, heads_k, head_dim) (a paged KV cache)"},
      {"v shape", [](PagedCache&, fap_fwd_args& a) { a.v.shape[1] = 2; }, "v: expected shape"},
      {"page size 0", [](PagedCache&, fap_fwd_args& a) { a.k.shape[1] = a.v.shape[1] = 0; },
       "k: page_size (dimension 1 of a paged KV cache) must be >= 1"},
      {"used more than counted", [](PagedCache& c, fap_fwd_args&) { c.seqused_k[2] = 19; },
       "seqused_k[2] = 19: expected a key count in [0, 18]"},
      {"used negative", [](PagedCache& c, fap_fwd_args&) { c.seqused_k[0] = -1; }, "seqused_k[0] = -1"},
      {"used dtype", [](PagedCache&, fap_fwd_args& a) { a.seqused_k.dtype = FAP_DTYPE_FLOAT16; },
       "seqused_k: expected dtype int32"},
      {"used shape", [](PagedCache&, fap_fwd_args& a) { a.seqused_k.shape[0] = 4; }, "seqused_k: expected shape"},
  };
  for (const auto& entry : cases) {
    PagedCache paged(data, {2, 0, 5});
    fap_fwd_args args = paged.args(data);
    entry.breaks(paged, args);
    const std::vector<uint16_t> before = paged.out;
    EXPECT_EQ(forward(args, options), FAP_ERROR_INVALID_ARGUMENT) << entry.name;
    EXPECT_NE(std::string(fap_last_error()).find(entry.message), std::string::npos)
        << entry.name << ": " << fap_last_error();
    EXPECT_EQ(std::memcmp(before.data(), paged.out.data(), before.size() * sizeof(uint16_t)), 0) << entry.name;
  }
}

TEST(PagedKvArguments, OnlyVarlenCallsTakeThem) {
  CaseConfig config = used_keys_case(false);
  config.varlen = false;
  config.len_q = {5, 5, 5};
  config.len_k = {9, 9, 9};
  AttentionCase data(config);
  const fap_options options = data.options();
  std::vector<int32_t> table(3, 0), used(3, 1);
  const int64_t table_shape[] = {3, 1}, used_shape[] = {3};
  fap_fwd_args args = data.forward_args();
  args.block_table = fap_make_tensor(table.data(), FAP_DTYPE_INT32, FAP_DEVICE_CPU, 0, 2, table_shape);
  size_t bytes = 0;
  EXPECT_EQ(fap_mha_fwd_workspace_size(&args, &options, &bytes), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(fap_last_error()).find("block_table: only varlen calls and KV-cache calls (cache_seqlens) take a paged KV cache"),
            std::string::npos)
      << fap_last_error();
  args.block_table = fap_tensor{};
  args.seqused_k = fap_make_tensor(used.data(), FAP_DTYPE_INT32, FAP_DEVICE_CPU, 0, 1, used_shape);
  EXPECT_EQ(fap_mha_fwd_workspace_size(&args, &options, &bytes), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(fap_last_error()).find("seqused_k: only varlen calls take it"), std::string::npos)
      << fap_last_error();
}

}  // namespace
}  // namespace fap::test
