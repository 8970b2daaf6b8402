// The bad-input suite: every validation rule, broken one at a time on an otherwise valid call. Each must
// return the right status, a message naming the argument, and leave every output untouched.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "flash_attn_plus/flash_attn_plus.h"
#include "tests/support/attention_case.h"

namespace fap::test {
namespace {

struct Call {
  AttentionCase& data;
  fap_fwd_args fwd;
  fap_bwd_args bwd;
  fap_options options;
};

struct Rule {
  const char* name;
  bool varlen;
  bool backward;
  std::function<void(Call&)> breaks;
  const char* message;  // a fragment the error message must contain
  fap_status status = FAP_ERROR_INVALID_ARGUMENT;
};

CaseConfig valid_config(bool varlen) {
  CaseConfig config;
  config.dtype = FAP_DTYPE_FLOAT16;
  config.varlen = varlen;
  config.batch = 2;
  config.heads_q = 4;
  config.heads_kv = 2;
  config.head_dim = 16;
  config.len_q = {5, 3};
  config.len_k = {7, 6};
  if (!varlen) config.len_q = {5, 5}, config.len_k = {7, 7};
  config.want_probs = true;
  config.seed = 7;
  return config;
}

fap_tensor with_shape(fap_tensor t, int dim, int64_t size) {
  t.shape[dim] = size;
  return t;
}

fap_tensor with_stride(fap_tensor t, int dim, int64_t stride) {
  t.strides[dim] = stride;
  return t;
}

fap_tensor with_dtype(fap_tensor t, int32_t dtype) {
  t.dtype = dtype;
  return t;
}

fap_tensor on_cuda(fap_tensor t) {
  t.device_type = FAP_DEVICE_CUDA;
  return t;
}

std::vector<float> alibi_storage(64, 0.5f);
std::vector<int32_t> bad_offsets;

fap_tensor alibi(int rank, const std::vector<int64_t>& shape, fap_dtype dtype = FAP_DTYPE_FLOAT32) {
  return fap_make_tensor(alibi_storage.data(), dtype, FAP_DEVICE_CPU, 0, rank, shape.data());
}

fap_tensor offsets(std::vector<int32_t> values) {
  bad_offsets = std::move(values);
  const int64_t shape[] = {static_cast<int64_t>(bad_offsets.size())};
  return fap_make_tensor(bad_offsets.data(), FAP_DTYPE_INT32, FAP_DEVICE_CPU, 0, 1, shape);
}

const std::vector<Rule>& rules() {
  static const std::vector<Rule> list = {
      {"q absent", false, false, [](Call& c) { c.fwd.q = fap_tensor{}; }, "q: required"},
      {"k absent", false, false, [](Call& c) { c.fwd.k = fap_tensor{}; }, "k: required"},
      {"v absent", false, false, [](Call& c) { c.fwd.v = fap_tensor{}; }, "v: required"},
      {"out absent", false, false, [](Call& c) { c.fwd.out = fap_tensor{}; }, "out: required"},
      {"q rank", false, false, [](Call& c) { c.fwd.q.rank = 3; }, "q: expected a rank-4 tensor"},
      {"k rank", false, false, [](Call& c) { c.fwd.k.rank = 5; }, "k: expected a rank-4 tensor"},
      {"q int32", false, false, [](Call& c) { c.fwd.q.dtype = FAP_DTYPE_INT32; }, "q: expected dtype float16, bfloat16"},
      {"q unknown dtype", false, false, [](Call& c) { c.fwd.q.dtype = 99; }, "q: expected a dtype of fap_dtype"},
      {"k dtype", false, false, [](Call& c) { c.fwd.k = with_dtype(c.fwd.k, FAP_DTYPE_BFLOAT16); },
       "k: expected dtype float16, got bfloat16"},
      {"v dtype", false, false, [](Call& c) { c.fwd.v = with_dtype(c.fwd.v, FAP_DTYPE_FLOAT32); },
       "v: expected dtype float16, got float32"},
      {"out dtype", false, false, [](Call& c) { c.fwd.out = with_dtype(c.fwd.out, FAP_DTYPE_BFLOAT16); },
       "out: expected dtype float16"},
      {"head_dim 0", false, false, [](Call& c) { c.fwd.q.shape[3] = 0; }, "head_dim (last dimension) must be in [1, 256]"},
      {"head_dim 257", false, false, [](Call& c) { c.fwd.q.shape[3] = 257; }, "must be in [1, 256], got 257"},
      {"heads not divisible", false, false, [](Call& c) { c.fwd.k.shape[2] = 3; }, "heads_k must divide the 4 query heads"},
      {"batch 0", false, false, [](Call& c) { c.fwd.q.shape[0] = 0; }, "batch size must be in [1, 65535]"},
      // Calls without rows loop over batch and heads: both are bounded (FA2's grid limit).
      {"batch 65536", false, false, [](Call& c) { c.fwd.q.shape[0] = 65536; }, "batch size must be in [1, 65535]"},
      {"heads 2^32 + 1", false, false, [](Call& c) { c.fwd.q.shape[2] = (int64_t{1} << 32) + 1; },
       "q: heads must be in [1, 65535]"},
      {"k batch", false, false, [](Call& c) { c.fwd.k = with_shape(c.fwd.k, 0, 3); }, "k: expected shape"},
      {"v seqlen", false, false, [](Call& c) { c.fwd.v = with_shape(c.fwd.v, 1, 6); }, "v: expected shape"},
      {"v head_dim", false, false, [](Call& c) { c.fwd.v = with_shape(c.fwd.v, 3, 8); }, "v: expected shape"},
      {"out seqlen", false, false, [](Call& c) { c.fwd.out = with_shape(c.fwd.out, 1, 4); }, "out: expected shape"},
      {"k heads_kv vs v", false, false, [](Call& c) { c.fwd.v = with_shape(c.fwd.v, 2, 4); }, "v: expected shape"},
      {"last stride", false, false, [](Call& c) { c.fwd.k = with_stride(c.fwd.k, 3, 2); },
       "k: the last dimension must be contiguous"},
      {"negative stride", false, false, [](Call& c) { c.fwd.v = with_stride(c.fwd.v, 1, -1); },
       "v: strides[1] must be >= 0"},
      {"negative size", false, false, [](Call& c) { c.fwd.k = with_shape(c.fwd.k, 1, -1); }, "k: shape[1] must be >= 0"},
      {"huge stride", false, false, [](Call& c) { c.fwd.q = with_stride(c.fwd.q, 0, int64_t{1} << 62); },
       "q: shape[0]"},
      {"overflowing span", false, false,
       [](Call& c) {
         c.fwd.out = with_stride(c.fwd.out, 0, int64_t{1} << 47);
         c.fwd.out = with_stride(c.fwd.out, 1, int64_t{1} << 47);
       },
       "out: shape"},
      {"null data", false, false, [](Call& c) { c.fwd.v.data = nullptr; }, "v: data is NULL"},
      {"element count past int64", false, false,
       [](Call& c) {
         for (fap_tensor* t : {&c.fwd.q, &c.fwd.out}) {
           *t = with_stride(with_shape(*t, 1, int64_t{1} << 47), 1, 0);
           *t = with_stride(with_shape(*t, 2, int64_t{1} << 15), 2, 0);
           *t = with_stride(*t, 0, 0);
         }
       },
       "q: shape (2, 140737488355328, 32768, 16) has more than 2^48 elements"},
      {"device mismatch", false, false, [](Call& c) { c.fwd.k = on_cuda(c.fwd.k); }, "k: expected a tensor on cpu"},
      {"unknown device", false, false, [](Call& c) { c.fwd.v.device_type = 5; },
       "v: unknown device type"},
      {"k misaligned", false, false, [](Call& c) { c.fwd.k.data = static_cast<char*>(c.fwd.k.data) + 1; },
       "k: data pointer 0x"},
      {"lse misaligned", false, false,
       [](Call& c) { c.fwd.softmax_lse.data = static_cast<char*>(c.fwd.softmax_lse.data) + 2; },
       "is not aligned to its 4-byte elements"},
      {"dout misaligned", false, true, [](Call& c) { c.bwd.dout.data = static_cast<char*>(c.bwd.dout.data) + 1; },
       "dout: data pointer 0x"},
      {"varlen cu_seqlens_k misaligned", true, false,
       [](Call& c) { c.fwd.cu_seqlens_k.data = static_cast<char*>(c.fwd.cu_seqlens_k.data) + 2; },
       "cu_seqlens_k: data pointer 0x"},
      {"lse dtype", false, false, [](Call& c) { c.fwd.softmax_lse = with_dtype(c.fwd.softmax_lse, FAP_DTYPE_FLOAT16); },
       "softmax_lse: expected dtype float32"},
      {"lse shape", false, false, [](Call& c) { c.fwd.softmax_lse = with_shape(c.fwd.softmax_lse, 2, 4); },
       "softmax_lse: expected shape (batch, heads, seqlen_q)"},
      {"lse rank", false, false, [](Call& c) { c.fwd.softmax_lse.rank = 2; }, "softmax_lse: expected a rank-3 tensor"},
      {"probs too small", false, false, [](Call& c) { c.fwd.attn_probs = with_shape(c.fwd.attn_probs, 3, 6); },
       "attn_probs: expected at least 5 rows and 7 columns"},
      {"probs dtype", false, false, [](Call& c) { c.fwd.attn_probs = with_dtype(c.fwd.attn_probs, FAP_DTYPE_FLOAT32); },
       "attn_probs: expected dtype float16"},
      {"cu_seqlens on dense", false, false, [](Call& c) { c.fwd.cu_seqlens_q = offsets({0, 5, 10}); },
       "only varlen calls take them"},
      {"dropout 1", false, false, [](Call& c) { c.options.dropout_p = 1.0f; }, "dropout_p: expected a value in [0, 1)"},
      {"dropout negative", false, false, [](Call& c) { c.options.dropout_p = -0.1f; }, "dropout_p"},
      {"dropout NaN", false, false, [](Call& c) { c.options.dropout_p = std::nanf(""); }, "dropout_p"},
      {"softcap negative", false, false, [](Call& c) { c.options.softcap = -1.0f; }, "softcap: expected a finite value >= 0"},
      {"softcap inf", false, false, [](Call& c) { c.options.softcap = std::numeric_limits<float>::infinity(); },
       "softcap"},
      {"scale inf", false, false, [](Call& c) { c.options.softmax_scale = -std::numeric_limits<float>::infinity(); },
       "softmax_scale: expected a finite value"},
      {"alibi shape", false, false, [](Call& c) { c.options.alibi_slopes = alibi(1, {3}); },
       "alibi_slopes: expected shape (heads)"},
      {"alibi batch", false, false, [](Call& c) { c.options.alibi_slopes = alibi(2, {3, 4}); },
       "alibi_slopes: expected shape (batch, heads)"},
      {"alibi rank", false, false, [](Call& c) { c.options.alibi_slopes = alibi(3, {2, 4, 1}); },
       "alibi_slopes: expected shape (heads) or (batch, heads)"},
      {"alibi dtype", false, false, [](Call& c) { c.options.alibi_slopes = alibi(1, {4}, FAP_DTYPE_FLOAT16); },
       "alibi_slopes: expected dtype float32"},
      {"alibi device", false, false, [](Call& c) { c.options.alibi_slopes = on_cuda(alibi(1, {4})); },
       "alibi_slopes: expected a tensor on cpu"},
      {"varlen cu_seqlens_q absent", true, false, [](Call& c) { c.fwd.cu_seqlens_q = fap_tensor{}; }, "cu_seqlens_q"},
      {"varlen cu_seqlens_k absent", true, false, [](Call& c) { c.fwd.cu_seqlens_k = fap_tensor{}; },
       "cu_seqlens_k: required for varlen"},
      {"varlen q rank", true, false, [](Call& c) { c.fwd.q.rank = 4; }, "q: expected a rank-3 tensor (total_q"},
      {"varlen offsets dtype", true, false,
       [](Call& c) { c.fwd.cu_seqlens_k = with_dtype(c.fwd.cu_seqlens_k, FAP_DTYPE_FLOAT32); },
       "cu_seqlens_k: expected dtype int32"},
      {"varlen offsets start", true, false, [](Call& c) { c.fwd.cu_seqlens_q = offsets({1, 5, 8}); },
       "cu_seqlens_q[0]: expected 0, got 1"},
      {"varlen offsets decrease", true, false, [](Call& c) { c.fwd.cu_seqlens_k = offsets({0, 7, 6}); },
       "cu_seqlens_k: expected non-decreasing offsets"},
      {"varlen offsets beyond", true, false, [](Call& c) { c.fwd.cu_seqlens_k = offsets({0, 7, 14}); },
       "cu_seqlens_k[2] = 14 exceeds the 13 rows"},
      {"varlen longer than max", true, false, [](Call& c) { c.fwd.max_seqlen_q = 4; },
       "cu_seqlens_q: sequence 0 has length 5, more than max_seqlen_q = 4"},
      {"varlen negative max", true, false, [](Call& c) { c.fwd.max_seqlen_k = -1; }, "max_seqlen_k: expected >= 0"},
      // Issue-18 regressions: work sized by max_seqlen_* alone (2^63 - 1 returned without writing out, 2^40 ran for
      // minutes), and element counts past int64 from stride-0 dimensions that each pass.
      {"varlen max above the rows", true, false, [](Call& c) { c.fwd.max_seqlen_q = INT64_MAX; },
       "max_seqlen_q: expected at most total_q = 8 (the rows of q)"},
      {"varlen max near the limit", true, false, [](Call& c) { c.fwd.max_seqlen_q = INT64_MAX - 100; },
       "max_seqlen_q: expected at most total_q"},
      {"varlen key max above the rows", true, false, [](Call& c) { c.fwd.max_seqlen_k = int64_t{1} << 40; },
       "max_seqlen_k: expected at most total_k = 13 (the rows of k)"},
      {"varlen batch mismatch", true, false, [](Call& c) { c.fwd.cu_seqlens_k = offsets({0, 13}); },
       "cu_seqlens_k: expected shape (batch + 1)"},
      {"varlen single offset", true, false, [](Call& c) { c.fwd.cu_seqlens_q = offsets({0}); },
       "cu_seqlens_q: expected batch + 1 in [2, 65536] entries"},
      {"varlen lse layout", true, false, [](Call& c) { c.fwd.softmax_lse.rank = 3; },
       "softmax_lse: expected a rank-2 tensor (heads, total_q)"},
      {"bwd lse absent", false, true, [](Call& c) { c.bwd.softmax_lse = fap_tensor{}; }, "softmax_lse: required by the backward"},
      {"bwd dout absent", false, true, [](Call& c) { c.bwd.dout = fap_tensor{}; }, "dout: required"},
      {"bwd dq shape", false, true, [](Call& c) { c.bwd.dq = with_shape(c.bwd.dq, 2, 2); }, "dq: expected shape"},
      {"bwd dk dtype", false, true, [](Call& c) { c.bwd.dk = with_dtype(c.bwd.dk, FAP_DTYPE_BFLOAT16); },
       "dk: expected dtype float16"},
      {"bwd dv stride", false, true, [](Call& c) { c.bwd.dv = with_stride(c.bwd.dv, 3, 3); },
       "dv: the last dimension must be contiguous"},
      {"bwd out shape", false, true, [](Call& c) { c.bwd.out = with_shape(c.bwd.out, 2, 2); }, "out: expected shape"},
      {"varlen bwd dk rows", true, true, [](Call& c) { c.bwd.dk = with_shape(c.bwd.dk, 0, 12); }, "dk: expected shape"},
      // Issue-18 regression: outputs broadcast by stride 0 (expand() views) overlap their own writes, and a dense
      // stride-0 q and out of 2^28 rows ran for minutes over a few bytes.
      {"out broadcast rows", false, false, [](Call& c) { c.fwd.out = with_stride(c.fwd.out, 1, 0); },
       "out: an output must not overlap itself, got stride 0 for dimension 1"},
      {"lse broadcast rows", false, false,
       [](Call& c) { c.fwd.softmax_lse = with_stride(c.fwd.softmax_lse, 2, 0); },
       "softmax_lse: an output must not overlap itself"},
      {"probs broadcast columns", false, false,
       [](Call& c) { c.fwd.attn_probs = with_stride(c.fwd.attn_probs, 3, 0); },
       "attn_probs: an output must not overlap itself"},
      {"varlen out broadcast heads", true, false, [](Call& c) { c.fwd.out = with_stride(c.fwd.out, 1, 0); },
       "out: an output must not overlap itself, got stride 0 for dimension 1"},
      {"bwd dk broadcast rows", false, true, [](Call& c) { c.bwd.dk = with_stride(c.bwd.dk, 1, 0); },
       "dk: an output must not overlap itself"},
      {"bwd dq broadcast batch", false, true, [](Call& c) { c.bwd.dq = with_stride(c.bwd.dq, 0, 0); },
       "dq: an output must not overlap itself, got stride 0 for dimension 0"},
      {"cpu backend, cuda tensors", false, false,
       [](Call& c) {
         for (fap_tensor* t : {&c.fwd.q, &c.fwd.k, &c.fwd.v, &c.fwd.out, &c.fwd.softmax_lse, &c.fwd.attn_probs})
           t->device_type = FAP_DEVICE_CUDA;
       },
       "no usable backend for cuda tensors", FAP_ERROR_BACKEND_UNAVAILABLE},
  };
  return list;
}

class BadInput : public ::testing::TestWithParam<size_t> {};

TEST_P(BadInput, FailsCleanlyNamingTheArgument) {
  const Rule& rule = rules()[GetParam()];
  AttentionCase data(valid_config(rule.varlen));
  Call call{data, data.forward_args(), data.backward_args(), data.options()};
  // The unbroken call must be accepted, or the rule would prove nothing.
  size_t bytes = 0;
  ASSERT_EQ(rule.backward ? (rule.varlen ? fap_mha_varlen_bwd_workspace_size(&call.bwd, &call.options, &bytes)
                                         : fap_mha_bwd_workspace_size(&call.bwd, &call.options, &bytes))
                          : (rule.varlen ? fap_mha_varlen_fwd_workspace_size(&call.fwd, &call.options, &bytes)
                                         : fap_mha_fwd_workspace_size(&call.fwd, &call.options, &bytes)),
            FAP_SUCCESS)
      << fap_last_error();
  rule.breaks(call);
  std::vector<unsigned char> workspace(bytes + (1 << 20));
  const std::vector<unsigned char> out_before = data.out.bytes, dq_before = data.dq.bytes;
  const std::vector<float> lse_before = data.lse;
  const fap_status status =
      rule.backward
          ? (rule.varlen ? fap_mha_varlen_bwd(&call.bwd, &call.options, nullptr, workspace.data(), workspace.size())
                         : fap_mha_bwd(&call.bwd, &call.options, nullptr, workspace.data(), workspace.size()))
          : (rule.varlen ? fap_mha_varlen_fwd(&call.fwd, &call.options, nullptr, workspace.data(), workspace.size())
                         : fap_mha_fwd(&call.fwd, &call.options, nullptr, workspace.data(), workspace.size()));
  EXPECT_EQ(status, rule.status) << rule.name << ": " << fap_last_error();
  EXPECT_NE(std::string(fap_last_error()).find(rule.message), std::string::npos)
      << rule.name << ": message was \"" << fap_last_error() << "\", expected it to contain \"" << rule.message << "\"";
  EXPECT_EQ(data.out.bytes, out_before) << rule.name << " wrote to out";
  EXPECT_EQ(data.dq.bytes, dq_before) << rule.name << " wrote to dq";
  EXPECT_EQ(std::memcmp(data.lse.data(), lse_before.data(), lse_before.size() * sizeof(float)), 0);
}

INSTANTIATE_TEST_SUITE_P(Rules, BadInput, ::testing::Range<size_t>(0, rules().size()),
                         [](const ::testing::TestParamInfo<size_t>& param_info) {
                           std::string name = rules()[param_info.param].name;
                           for (char& ch : name)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return name;
                         });

TEST(BadInputApi, NullPointersAreRejected) {
  AttentionCase data(valid_config(false));
  fap_fwd_args args = data.forward_args();
  const fap_options options = data.options();
  size_t bytes = 0;
  EXPECT_EQ(fap_mha_fwd_workspace_size(nullptr, &options, &bytes), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(fap_last_error()).find("args"), std::string::npos);
  EXPECT_EQ(fap_mha_fwd_workspace_size(&args, nullptr, &bytes), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(fap_last_error()).find("options"), std::string::npos);
  EXPECT_EQ(fap_mha_fwd_workspace_size(&args, &options, nullptr), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(fap_last_error()).find("bytes"), std::string::npos);
  EXPECT_EQ(fap_mha_bwd(nullptr, &options, nullptr, nullptr, 0), FAP_ERROR_INVALID_ARGUMENT);
}

TEST(BadInputApi, SmallWorkspaceIsRefusedWithoutWriting) {
  AttentionCase data(valid_config(false));
  fap_fwd_args args = data.forward_args();
  const fap_options options = data.options();
  size_t bytes = 0;
  ASSERT_EQ(fap_mha_fwd_workspace_size(&args, &options, &bytes), FAP_SUCCESS);
  std::vector<unsigned char> workspace(bytes - 1);
  const std::vector<unsigned char> before = data.out.bytes;
  EXPECT_EQ(fap_mha_fwd(&args, &options, nullptr, workspace.data(), workspace.size()), FAP_ERROR_WORKSPACE_TOO_SMALL);
  EXPECT_NE(std::string(fap_last_error()).find("workspace: backend 'cpu' needs"), std::string::npos);
  EXPECT_EQ(fap_mha_fwd(&args, &options, nullptr, nullptr, bytes), FAP_ERROR_WORKSPACE_TOO_SMALL);
  EXPECT_EQ(data.out.bytes, before);
}

TEST(BadInputApi, MisalignedWorkspaceIsRefusedWithoutWriting) {
  AttentionCase data(valid_config(false));
  fap_bwd_args args = data.backward_args();
  const fap_options options = data.options();
  size_t bytes = 0;
  ASSERT_EQ(fap_mha_bwd_workspace_size(&args, &options, &bytes), FAP_SUCCESS);
  ASSERT_GT(bytes, 0u);
  std::vector<unsigned char> workspace(bytes + 16);
  unsigned char* misaligned = workspace.data() + (reinterpret_cast<std::uintptr_t>(workspace.data()) % 16 == 0 ? 1 : 0);
  const std::vector<unsigned char> before = data.dq.bytes;
  EXPECT_EQ(fap_mha_bwd(&args, &options, nullptr, misaligned, bytes), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(fap_last_error()).find("workspace: expected a 16-byte aligned pointer"), std::string::npos);
  EXPECT_EQ(data.dq.bytes, before);
}

TEST(BadInputApi, SuccessClearsTheLastError) {
  AttentionCase data(valid_config(false));
  fap_fwd_args args = data.forward_args();
  const fap_options options = data.options();
  size_t bytes = 0;
  ASSERT_EQ(fap_mha_fwd_workspace_size(&args, nullptr, &bytes), FAP_ERROR_INVALID_ARGUMENT);
  ASSERT_EQ(fap_mha_fwd_workspace_size(&args, &options, &bytes), FAP_SUCCESS);
  EXPECT_STREQ(fap_last_error(), "");
}

}  // namespace
}  // namespace fap::test
