// The one place where arguments are checked. Each builder checks every tensor and option against the
// FlashAttention-2 contract and returns the normalised AttentionProblem; on bad input it throws
// fap::Error(FAP_ERROR_INVALID_ARGUMENT) whose message names the argument and says expected vs got.
#pragma once

#include "core/problem.h"

namespace fap {

AttentionProblem make_forward_problem(const fap_fwd_args& args, const fap_options& options, bool varlen);
AttentionProblem make_backward_problem(const fap_bwd_args& args, const fap_options& options, bool varlen);
// One entry of fap_precompile's list; errors name it as specs[index].
KernelFeatures make_kernel_features(const fap_kernel_spec& spec, int32_t index);

const char* dtype_name(int32_t dtype);

}  // namespace fap
