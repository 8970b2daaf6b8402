// The Python extension: a thin layer over the C API. Tensors arrive as plain tuples
// (data_ptr, dtype, device_type, device_index, shape, strides) built by flash_attn_plus/_tensors.py, so
// the extension links neither torch nor any array library and one build serves every torch version.
// Calls return the fap_status; flash_attn_plus/_errors.py turns a failure and fap_last_error() into the
// matching Python exception.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "flash_attn_plus/flash_attn_plus.h"

namespace nb = nanobind;

namespace {

using TensorSpec = std::tuple<uintptr_t, int32_t, int32_t, int32_t, std::vector<int64_t>, std::vector<int64_t>>;
using OptionalTensor = std::optional<TensorSpec>;
// flash_attn_plus.ops.Options: (softmax_scale, causal, window_left, window_right, softcap, dropout_p,
// deterministic). ALiBi slopes and the dropout seed and offset travel beside it.
using OptionsSpec = std::tuple<float, bool, int32_t, int32_t, float, float, bool>;
// Asked for the workspace size in bytes, returns a tensor at least that large on the call's device (torch's
// caching allocator), kept alive here until the call returns.
using Allocator = nb::callable;

fap_tensor to_tensor(const OptionalTensor& spec, const char* name) {
  fap_tensor view{};  // absent: data == NULL
  if (!spec) return view;
  const auto& [data, dtype, device_type, device_index, shape, strides] = *spec;
  if (shape.size() > FAP_MAX_RANK || strides.size() != shape.size()) {
    throw nb::value_error((std::string(name) + ": expected at most " + std::to_string(FAP_MAX_RANK) +
                           " dimensions, got " + std::to_string(shape.size()))
                              .c_str());
  }
  view.data = reinterpret_cast<void*>(data);
  view.dtype = dtype;
  view.device_type = device_type;
  view.device_index = device_index;
  view.rank = static_cast<int32_t>(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) {
    view.shape[i] = shape[i];
    view.strides[i] = strides[i];
  }
  return view;
}

fap_options to_options(const OptionsSpec& spec, const OptionalTensor& alibi, uint64_t seed, uint64_t offset) {
  fap_options options = fap_default_options();
  const auto& [scale, causal, left, right, softcap, dropout_p, deterministic] = spec;
  options.softmax_scale = scale;
  options.causal = causal ? 1 : 0;
  options.window_size_left = left;
  options.window_size_right = right;
  options.softcap = softcap;
  options.alibi_slopes = to_tensor(alibi, "alibi_slopes");
  options.dropout_p = dropout_p;
  options.dropout_seed = seed;
  options.dropout_offset = offset;
  options.deterministic = deterministic ? 1 : 0;
  return options;
}

// Owns a plan for the length of one call.
struct PlanHandle {
  fap_plan* plan = nullptr;
  ~PlanHandle() { fap_plan_destroy(plan); }
};

// Plans the call (one validation), allocates its workspace through the caller when it needs one, and runs it.
template <typename Args, typename PlanFn>
int plan_and_run(const Args& args, const fap_options& options, bool varlen, uintptr_t stream,
                 const Allocator& allocate, PlanFn plan_fn) {
  PlanHandle handle;
  if (fap_status status = plan_fn(&args, &options, varlen ? 1 : 0, &handle.plan); status != FAP_SUCCESS) return status;
  size_t bytes = 0;
  if (fap_status status = fap_plan_workspace_size(handle.plan, &bytes); status != FAP_SUCCESS) return status;
  nb::object workspace;
  void* data = nullptr;
  if (bytes > 0) {
    workspace = allocate(bytes);
    data = reinterpret_cast<void*>(nb::cast<uintptr_t>(workspace.attr("data_ptr")()));
  }
  nb::gil_scoped_release no_gil;  // the CPU backend runs for a while; other Python threads may go on
  return fap_plan_run(handle.plan, reinterpret_cast<void*>(stream), data, bytes);
}

fap_fwd_args forward_args(const OptionalTensor& q, const OptionalTensor& k, const OptionalTensor& v,
                          const OptionalTensor& out, const OptionalTensor& softmax_lse, const OptionalTensor& attn_probs,
                          const OptionalTensor& cu_seqlens_q, const OptionalTensor& cu_seqlens_k, int64_t max_seqlen_q,
                          int64_t max_seqlen_k) {
  fap_fwd_args args{};
  args.q = to_tensor(q, "q");
  args.k = to_tensor(k, "k");
  args.v = to_tensor(v, "v");
  args.out = to_tensor(out, "out");
  args.softmax_lse = to_tensor(softmax_lse, "softmax_lse");
  args.attn_probs = to_tensor(attn_probs, "attn_probs");
  args.cu_seqlens_q = to_tensor(cu_seqlens_q, "cu_seqlens_q");
  args.cu_seqlens_k = to_tensor(cu_seqlens_k, "cu_seqlens_k");
  args.max_seqlen_q = max_seqlen_q;
  args.max_seqlen_k = max_seqlen_k;
  return args;
}

int forward(bool varlen, const OptionalTensor& q, const OptionalTensor& k, const OptionalTensor& v,
            const OptionalTensor& out, const OptionalTensor& softmax_lse, const OptionalTensor& attn_probs,
            const OptionalTensor& cu_seqlens_q, const OptionalTensor& cu_seqlens_k, int64_t max_seqlen_q,
            int64_t max_seqlen_k, const OptionalTensor& alibi_slopes, const OptionsSpec& options, uint64_t seed,
            uint64_t offset, uintptr_t stream, const Allocator& allocate) {
  const fap_fwd_args args =
      forward_args(q, k, v, out, softmax_lse, attn_probs, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  return plan_and_run(args, to_options(options, alibi_slopes, seed, offset), varlen, stream, allocate, fap_plan_fwd);
}

// The core's checks of a forward call without running it: for backends served from Python, which keep the
// one validation of the library.
int check_forward(bool varlen, const OptionalTensor& q, const OptionalTensor& k, const OptionalTensor& v,
                  const OptionalTensor& out, const OptionalTensor& softmax_lse, const OptionalTensor& cu_seqlens_q,
                  const OptionalTensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                  const OptionalTensor& alibi_slopes, const OptionsSpec& options) {
  const fap_fwd_args args =
      forward_args(q, k, v, out, softmax_lse, std::nullopt, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const fap_options opts = to_options(options, alibi_slopes, 0, 0);
  return fap_check_fwd(&args, &opts, varlen ? 1 : 0);
}

int backward(bool varlen, const OptionalTensor& q, const OptionalTensor& k, const OptionalTensor& v,
             const OptionalTensor& out, const OptionalTensor& dout, const OptionalTensor& softmax_lse,
             const OptionalTensor& dq, const OptionalTensor& dk, const OptionalTensor& dv,
             const OptionalTensor& cu_seqlens_q, const OptionalTensor& cu_seqlens_k, int64_t max_seqlen_q,
             int64_t max_seqlen_k, const OptionalTensor& alibi_slopes, const OptionsSpec& options, uint64_t seed,
             uint64_t offset, uintptr_t stream, const Allocator& allocate) {
  fap_bwd_args args{};
  args.q = to_tensor(q, "q");
  args.k = to_tensor(k, "k");
  args.v = to_tensor(v, "v");
  args.out = to_tensor(out, "out");
  args.dout = to_tensor(dout, "dout");
  args.softmax_lse = to_tensor(softmax_lse, "softmax_lse");
  args.dq = to_tensor(dq, "dq");
  args.dk = to_tensor(dk, "dk");
  args.dv = to_tensor(dv, "dv");
  args.cu_seqlens_q = to_tensor(cu_seqlens_q, "cu_seqlens_q");
  args.cu_seqlens_k = to_tensor(cu_seqlens_k, "cu_seqlens_k");
  args.max_seqlen_q = max_seqlen_q;
  args.max_seqlen_k = max_seqlen_k;
  return plan_and_run(args, to_options(options, alibi_slopes, seed, offset), varlen, stream, allocate, fap_plan_bwd);
}

// (backward, dtype, head_dim, window, softcap, alibi, dropout) per entry, as fap_kernel_spec.
using KernelSpec = std::tuple<bool, int32_t, int32_t, bool, bool, bool, bool>;

int precompile(const std::vector<KernelSpec>& list, int32_t device_index) {
  std::vector<fap_kernel_spec> specs;
  for (const auto& [backward, dtype, head_dim, window, softcap, alibi, dropout] : list)
    specs.push_back({backward, dtype, head_dim, window, softcap, alibi, dropout});
  nb::gil_scoped_release no_gil;  // compiling takes seconds
  return fap_precompile(specs.data(), static_cast<int32_t>(specs.size()), device_index);
}

// (name, usable, reason, details) for every backend the library has.
std::vector<std::tuple<std::string, bool, std::string, std::string>> backends() {
  std::vector<std::tuple<std::string, bool, std::string, std::string>> list;
  for (int32_t i = 0; i < fap_backend_count(); ++i) {
    fap_backend_info info{};
    if (fap_backend_get_info(i, &info) == FAP_SUCCESS)
      list.emplace_back(info.name, info.usable != 0, info.reason, info.details);
  }
  return list;
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "FlashAttention-Plus C API bindings (see include/flash_attn_plus/flash_attn_plus.h)";
  m.def("api_version", &fap_api_version);
  m.def("version", [] { return std::string(fap_version_string()); });
  m.def("last_error", [] { return std::string(fap_last_error()); });
  m.def("set_backend", [](const std::string& name) { return static_cast<int>(fap_set_backend(name.c_str())); });
  m.def("get_backend", [] { return std::string(fap_get_backend()); });
  m.def("backends", &backends);
  m.def("forward", &forward);
  m.def("check_forward", &check_forward);
  m.def("backward", &backward);
  m.def("precompile", &precompile);
  m.attr("SUCCESS") = static_cast<int>(FAP_SUCCESS);
  m.attr("ERROR_INVALID_ARGUMENT") = static_cast<int>(FAP_ERROR_INVALID_ARGUMENT);
  m.attr("ERROR_UNSUPPORTED") = static_cast<int>(FAP_ERROR_UNSUPPORTED);
  m.attr("ERROR_BACKEND_UNAVAILABLE") = static_cast<int>(FAP_ERROR_BACKEND_UNAVAILABLE);
  m.attr("ERROR_WORKSPACE_TOO_SMALL") = static_cast<int>(FAP_ERROR_WORKSPACE_TOO_SMALL);
  m.attr("ERROR_OUT_OF_MEMORY") = static_cast<int>(FAP_ERROR_OUT_OF_MEMORY);
  m.attr("ERROR_DEVICE") = static_cast<int>(FAP_ERROR_DEVICE);
}
