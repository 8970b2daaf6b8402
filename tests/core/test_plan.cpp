// The plan-then-run C API (fap_plan_*), fap_check_fwd and fap_precompile: a plan runs the call it validated,
// any number of times, with the results of the one-call entry points; bad arguments fail naming themselves.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "flash_attn_plus/flash_attn_plus.h"
#include "flash_attn_plus/flash_attn_plus.hpp"
#include "tests/support/attention_case.h"

namespace fap::test {
namespace {

CaseConfig small_case(bool varlen) {
  CaseConfig config;
  config.dtype = FAP_DTYPE_BFLOAT16;
  config.varlen = varlen;
  config.batch = 2, config.heads_q = 4, config.heads_kv = 2, config.head_dim = 32;
  config.len_q = varlen ? std::vector<int64_t>{9, 4} : std::vector<int64_t>{9, 9};
  config.len_k = varlen ? std::vector<int64_t>{12, 5} : std::vector<int64_t>{12, 12};
  config.causal = true;
  config.seed = 11;
  return config;
}

bool contains(const char* text, const std::string& part) { return std::string(text).find(part) != std::string::npos; }

class PlanTest : public ::testing::TestWithParam<bool> {};

TEST_P(PlanTest, ForwardPlanRunsTwiceLikeFapMhaFwd) {
  const bool varlen = GetParam();
  AttentionCase planned(small_case(varlen)), direct(small_case(varlen));
  fap_fwd_args args = planned.forward_args();
  const fap_options options = planned.options();
  fap_plan* plan = nullptr;
  ASSERT_EQ(fap_plan_fwd(&args, &options, varlen ? 1 : 0, &plan), FAP_SUCCESS) << fap_last_error();
  const char *backend = nullptr, *kernel = nullptr;
  ASSERT_EQ(fap_plan_describe(plan, &backend, &kernel), FAP_SUCCESS);
  EXPECT_STREQ(backend, "cpu");
  EXPECT_STREQ(kernel, "");
  size_t bytes = 0;
  ASSERT_EQ(fap_plan_workspace_size(plan, &bytes), FAP_SUCCESS);
  std::vector<unsigned char> workspace(bytes + 16);
  ASSERT_EQ(fap_plan_run(plan, nullptr, workspace.data(), bytes), FAP_SUCCESS) << fap_last_error();
  const std::vector<unsigned char> first = planned.out.bytes;
  std::memset(planned.out.bytes.data(), 0xff, planned.out.bytes.size());  // NaN poison again
  ASSERT_EQ(fap_plan_run(plan, nullptr, workspace.data(), bytes), FAP_SUCCESS) << fap_last_error();
  EXPECT_EQ(planned.out.bytes, first);
  fap_plan_destroy(plan);

  fap_fwd_args direct_args = direct.forward_args();
  std::vector<unsigned char> direct_workspace(bytes + 16);
  ASSERT_EQ(varlen ? fap_mha_varlen_fwd(&direct_args, &options, nullptr, direct_workspace.data(), bytes)
                   : fap_mha_fwd(&direct_args, &options, nullptr, direct_workspace.data(), bytes),
            FAP_SUCCESS)
      << fap_last_error();
  EXPECT_EQ(direct.out.bytes, first);
  EXPECT_EQ(direct.lse, planned.lse);
}

TEST_P(PlanTest, BackwardPlanMatchesFapMhaBwd) {
  const bool varlen = GetParam();
  AttentionCase planned(small_case(varlen)), direct(small_case(varlen));
  const fap_options options = planned.options();
  for (AttentionCase* data : {&planned, &direct}) {
    fap_fwd_args args = data->forward_args();
    std::vector<unsigned char> workspace(1 << 20);
    ASSERT_EQ(varlen ? fap_mha_varlen_fwd(&args, &options, nullptr, workspace.data(), workspace.size())
                     : fap_mha_fwd(&args, &options, nullptr, workspace.data(), workspace.size()),
              FAP_SUCCESS)
        << fap_last_error();
  }
  fap_bwd_args args = planned.backward_args();
  fap_plan* plan = nullptr;
  ASSERT_EQ(fap_plan_bwd(&args, &options, varlen ? 1 : 0, &plan), FAP_SUCCESS) << fap_last_error();
  size_t bytes = 0;
  ASSERT_EQ(fap_plan_workspace_size(plan, &bytes), FAP_SUCCESS);
  std::vector<unsigned char> workspace(bytes + 16);
  ASSERT_EQ(fap_plan_run(plan, nullptr, workspace.data(), bytes), FAP_SUCCESS) << fap_last_error();
  fap_plan_destroy(plan);

  fap_bwd_args direct_args = direct.backward_args();
  ASSERT_EQ(varlen ? fap_mha_varlen_bwd(&direct_args, &options, nullptr, workspace.data(), bytes)
                   : fap_mha_bwd(&direct_args, &options, nullptr, workspace.data(), bytes),
            FAP_SUCCESS)
      << fap_last_error();
  EXPECT_EQ(direct.dq.bytes, planned.dq.bytes);
  EXPECT_EQ(direct.dk.bytes, planned.dk.bytes);
  EXPECT_EQ(direct.dv.bytes, planned.dv.bytes);
}

INSTANTIATE_TEST_SUITE_P(Layouts, PlanTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& param_info) { return param_info.param ? "varlen" : "dense"; });

TEST(PlanApi, BadArgumentsFailNamingThemAndLeaveNoPlan) {
  AttentionCase data(small_case(false));
  fap_fwd_args args = data.forward_args();
  const fap_options options = data.options();
  EXPECT_EQ(fap_plan_fwd(&args, &options, 0, nullptr), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(contains(fap_last_error(), "plan: expected a pointer"));
  fap_plan* plan = reinterpret_cast<fap_plan*>(&data);  // must be overwritten with NULL on failure
  EXPECT_EQ(fap_plan_fwd(&args, &options, 2, &plan), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(contains(fap_last_error(), "varlen: expected 0 (dense) or 1 (varlen), got 2"));
  EXPECT_EQ(plan, nullptr);
  args.k.shape[3] = 16;  // head dim differs from q's
  EXPECT_EQ(fap_plan_fwd(&args, &options, 0, &plan), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(contains(fap_last_error(), "k: expected shape"));
  EXPECT_EQ(plan, nullptr);
  EXPECT_EQ(fap_plan_bwd(nullptr, &options, 0, &plan), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(contains(fap_last_error(), "args: expected a pointer to fap_bwd_args"));

  size_t bytes = 0;
  EXPECT_EQ(fap_plan_workspace_size(nullptr, &bytes), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(contains(fap_last_error(), "plan: expected a plan"));
  EXPECT_EQ(fap_plan_run(nullptr, nullptr, nullptr, 0), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(fap_plan_describe(nullptr, nullptr, nullptr), FAP_ERROR_INVALID_ARGUMENT);
  fap_plan_destroy(nullptr);
}

TEST(PlanApi, CppPlanRunsAndThrowsNamingTheArgument) {
  AttentionCase planned(small_case(true)), direct(small_case(true));
  fap_fwd_args args = planned.forward_args();
  const fap_options options = planned.options();
  const flash_attn_plus::Plan plan(args, options, flash_attn_plus::Layout::kVarlen);
  EXPECT_EQ(plan.backend(), "cpu");
  EXPECT_EQ(plan.kernel(), "");
  std::vector<unsigned char> workspace(plan.workspace_size() + 16);
  plan.run(nullptr, workspace.data(), workspace.size());
  fap_fwd_args direct_args = direct.forward_args();
  flash_attn_plus::forward(direct_args, options, flash_attn_plus::Layout::kVarlen);
  EXPECT_EQ(planned.out.bytes, direct.out.bytes);
  args.max_seqlen_k = 1;  // shorter than the sequences
  try {
    flash_attn_plus::Plan bad(args, options, flash_attn_plus::Layout::kVarlen);
    FAIL() << "expected an error";
  } catch (const flash_attn_plus::Error& error) {
    EXPECT_EQ(error.status(), FAP_ERROR_INVALID_ARGUMENT);
    EXPECT_TRUE(contains(error.what(), "cu_seqlens_k")) << error.what();
  }
}

TEST(PlanApi, RunRefusesASmallWorkspaceWithoutWriting) {
  AttentionCase data(small_case(false));
  fap_bwd_args args = data.backward_args();
  const fap_options options = data.options();
  fap_plan* plan = nullptr;
  ASSERT_EQ(fap_plan_bwd(&args, &options, 0, &plan), FAP_SUCCESS) << fap_last_error();
  size_t bytes = 0;
  ASSERT_EQ(fap_plan_workspace_size(plan, &bytes), FAP_SUCCESS);
  ASSERT_GT(bytes, 0u);
  std::vector<unsigned char> workspace(bytes);
  const std::vector<unsigned char> before = data.dq.bytes;
  EXPECT_EQ(fap_plan_run(plan, nullptr, workspace.data(), bytes - 1), FAP_ERROR_WORKSPACE_TOO_SMALL);
  EXPECT_TRUE(contains(fap_last_error(), "workspace: backend 'cpu' needs"));
  EXPECT_EQ(data.dq.bytes, before);
  fap_plan_destroy(plan);
}

TEST(CheckForward, ValidatesWithoutChoosingABackend) {
  AttentionCase data(small_case(true));
  fap_fwd_args args = data.forward_args();
  const fap_options options = data.options();
  ASSERT_EQ(fap_check_fwd(&args, &options, 1), FAP_SUCCESS) << fap_last_error();
  // Device tensors pass validation even where no CUDA backend could run them (nothing is prepared), and a
  // bad one is still named.
  AttentionCase dense(small_case(false));
  fap_fwd_args device_args = dense.forward_args();
  for (fap_tensor* t : {&device_args.q, &device_args.k, &device_args.v, &device_args.out, &device_args.softmax_lse})
    t->device_type = FAP_DEVICE_CUDA;
  EXPECT_EQ(fap_check_fwd(&device_args, &options, 0), FAP_SUCCESS) << fap_last_error();
  device_args.v.device_index = 1;
  EXPECT_EQ(fap_check_fwd(&device_args, &options, 0), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(contains(fap_last_error(), "v: expected a tensor on cuda:0 like q, got cuda:1"));
  args.max_seqlen_q = -1;
  EXPECT_EQ(fap_check_fwd(&args, &options, 1), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(contains(fap_last_error(), "max_seqlen_q: expected >= 0"));
  EXPECT_EQ(fap_check_fwd(&args, &options, 5), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(contains(fap_last_error(), "varlen: expected 0 (dense) or 1 (varlen)"));
}

TEST(Precompile, BadSpecsFailNamingTheEntryAndField) {
  fap_kernel_spec specs[2] = {{0, FAP_DTYPE_BFLOAT16, 128, 1, 0, 0, 0}, {1, FAP_DTYPE_FLOAT16, 64, 0, 0, 0, 0}};
  const struct {
    void (*breaks)(fap_kernel_spec&);
    const char* message;
  } cases[] = {
      {[](fap_kernel_spec& s) { s.dtype = FAP_DTYPE_FLOAT32; }, "specs[1].dtype: expected float16 or bfloat16"},
      {[](fap_kernel_spec& s) { s.dtype = 42; }, "specs[1].dtype: expected float16 or bfloat16 (the CUDA kernels' "
                                                 "types), got unknown"},
      {[](fap_kernel_spec& s) { s.head_dim = 0; }, "specs[1].head_dim: expected a value in [1, 256], got 0"},
      {[](fap_kernel_spec& s) { s.head_dim = 257; }, "specs[1].head_dim"},
      {[](fap_kernel_spec& s) { s.dropout = 2; }, "specs[1].dropout: expected 0 or 1, got 2"},
      {[](fap_kernel_spec& s) { s.backward = -1; }, "specs[1].backward: expected 0 or 1, got -1"},
  };
  for (const auto& entry : cases) {
    fap_kernel_spec broken[2] = {specs[0], specs[1]};
    entry.breaks(broken[1]);
    EXPECT_EQ(fap_precompile(broken, 2, 0), FAP_ERROR_INVALID_ARGUMENT);
    EXPECT_TRUE(contains(fap_last_error(), entry.message)) << fap_last_error();
  }
  EXPECT_EQ(fap_precompile(nullptr, 1, 0), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(contains(fap_last_error(), "specs: expected an array of 1"));
  EXPECT_EQ(fap_precompile(specs, -1, 0), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(contains(fap_last_error(), "count: expected >= 0, got -1"));
  EXPECT_EQ(fap_precompile(specs, 2, -3), FAP_ERROR_INVALID_ARGUMENT);
  EXPECT_TRUE(contains(fap_last_error(), "device_index: expected a CUDA device ordinal >= 0, got -3"));
  // Valid specs: compiled where a CUDA GPU and NVRTC are usable, otherwise refused with the reason.
  const fap_status status = fap_precompile(specs, 2, 0);
  EXPECT_TRUE(status == FAP_SUCCESS || status == FAP_ERROR_BACKEND_UNAVAILABLE) << fap_last_error();
  if (status == FAP_ERROR_BACKEND_UNAVAILABLE) {
    EXPECT_STRNE(fap_last_error(), "");
  }
}

}  // namespace
}  // namespace fap::test
