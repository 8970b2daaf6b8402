// The Python extension: a thin layer over the C API. Tensors arrive as torch tensors and are read through their
// Python attributes (data_ptr, dtype, device, shape, stride), so the extension links neither torch nor any array
// library and one build serves every torch version.
// Calls return the fap_status; flash_attn_plus/_errors.py turns a failure and fap_last_error() into the
// matching Python exception.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "flash_attn_plus/flash_attn_plus.h"

namespace nb = nanobind;

namespace {

// flash_attn_plus.ops.Options: (softmax_scale, causal, window_left, window_right, softcap, dropout_p,
// deterministic). ALiBi slopes and the dropout seed and offset travel beside it.
using OptionsSpec = std::tuple<float, bool, int32_t, int32_t, float, float, bool>;
// Called as allocate(nbytes, like) for a call's workspace: returns a tensor of at least nbytes on like's device
// (torch's caching allocator), kept alive here until the call returns.
using Allocator = nb::callable;

// torch's dtype objects and their fap_dtype codes, given once by the Python package (register_dtypes): the
// extension reads tensors through their Python attributes and links no torch.
std::vector<std::pair<nb::object, int32_t>>& known_dtypes() {
  // Never destroyed: its references must not be released after the interpreter has finalised.
  static auto* dtypes = new std::vector<std::pair<nb::object, int32_t>>();
  return *dtypes;
}

int32_t dtype_code(nb::handle dtype) {
  for (const auto& [object, code] : known_dtypes())
    if (object.is(dtype)) return code;
  return -1;  // rejected by the core's validation, naming the argument
}

// A torch tensor (or None: absent) as the C API's view: pointer, dtype, device, shape and strides in elements.
// Devices other than the CPU and CUDA (e.g. meta) get device type -1, which the core rejects by name.
fap_tensor to_tensor(nb::handle tensor, const char* name) {
  fap_tensor view{};  // absent: data == NULL
  if (tensor.is_none()) return view;
  try {
    const nb::tuple shape = nb::borrow<nb::tuple>(tensor.attr("shape"));
    const nb::tuple strides = nb::borrow<nb::tuple>(tensor.attr("stride")());
    if (shape.size() > FAP_MAX_RANK) {
      throw nb::value_error((std::string(name) + ": expected at most " + std::to_string(FAP_MAX_RANK) +
                             " dimensions, got " + std::to_string(shape.size()))
                                .c_str());
    }
    view.data = reinterpret_cast<void*>(nb::cast<uintptr_t>(tensor.attr("data_ptr")()));
    view.dtype = dtype_code(tensor.attr("dtype"));
    if (nb::cast<bool>(tensor.attr("is_cuda"))) {
      view.device_type = FAP_DEVICE_CUDA;
      view.device_index = nb::cast<int32_t>(tensor.attr("get_device")());
    } else {
      view.device_type = nb::cast<bool>(tensor.attr("is_cpu")) ? FAP_DEVICE_CPU : -1;
    }
    view.rank = static_cast<int32_t>(shape.size());
    for (size_t i = 0; i < shape.size(); ++i) {
      view.shape[i] = nb::cast<int64_t>(shape[i]);
      view.strides[i] = nb::cast<int64_t>(strides[i]);
    }
  } catch (const nb::python_error&) {
    throw nb::type_error((std::string(name) + ": expected a torch.Tensor or None, got " +
                          nb::cast<std::string>(nb::str(nb::handle(reinterpret_cast<PyObject*>(Py_TYPE(tensor.ptr())))
                                                            .attr("__name__"))))
                             .c_str());
  } catch (const nb::cast_error&) {
    throw nb::type_error((std::string(name) + ": expected a torch.Tensor or None").c_str());
  }
  return view;
}

fap_options to_options(const OptionsSpec& spec, nb::handle alibi, uint64_t seed, uint64_t offset) {
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
                 const Allocator& allocate, nb::handle like, PlanFn plan_fn) {
  PlanHandle handle;
  if (fap_status status = plan_fn(&args, &options, varlen ? 1 : 0, &handle.plan); status != FAP_SUCCESS) return status;
  size_t bytes = 0;
  if (fap_status status = fap_plan_workspace_size(handle.plan, &bytes); status != FAP_SUCCESS) return status;
  nb::object workspace;
  void* data = nullptr;
  if (bytes > 0) {
    workspace = allocate(bytes, like);
    data = reinterpret_cast<void*>(nb::cast<uintptr_t>(workspace.attr("data_ptr")()));
  }
  nb::gil_scoped_release no_gil;  // the CPU backend runs for a while; other Python threads may go on
  return fap_plan_run(handle.plan, reinterpret_cast<void*>(stream), data, bytes);
}

// The arguments forward and backward calls share (the same field names in fap_fwd_args and fap_bwd_args).
template <typename Args>
void set_shared_args(Args& args, nb::handle q, nb::handle k, nb::handle v, nb::handle out, nb::handle softmax_lse,
                     nb::handle cu_seqlens_q, nb::handle cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  args.q = to_tensor(q, "q");
  args.k = to_tensor(k, "k");
  args.v = to_tensor(v, "v");
  args.out = to_tensor(out, "out");
  args.softmax_lse = to_tensor(softmax_lse, "softmax_lse");
  args.cu_seqlens_q = to_tensor(cu_seqlens_q, "cu_seqlens_q");
  args.cu_seqlens_k = to_tensor(cu_seqlens_k, "cu_seqlens_k");
  args.max_seqlen_q = max_seqlen_q;
  args.max_seqlen_k = max_seqlen_k;
}

fap_fwd_args forward_args(nb::handle q, nb::handle k, nb::handle v, nb::handle out, nb::handle softmax_lse,
                          nb::handle attn_probs, nb::handle cu_seqlens_q, nb::handle cu_seqlens_k, nb::handle seqused_k,
                          nb::handle block_table, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  fap_fwd_args args{};
  set_shared_args(args, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  args.attn_probs = to_tensor(attn_probs, "attn_probs");
  args.seqused_k = to_tensor(seqused_k, "seqused_k");
  args.block_table = to_tensor(block_table, "block_table");
  args.rotary_interleaved = 1;
  return args;
}

int forward(bool varlen, nb::handle q, nb::handle k, nb::handle v,
            nb::handle out, nb::handle softmax_lse, nb::handle attn_probs,
            nb::handle cu_seqlens_q, nb::handle cu_seqlens_k, nb::handle seqused_k, nb::handle block_table,
            int64_t max_seqlen_q, int64_t max_seqlen_k, nb::handle alibi_slopes, const OptionsSpec& options,
            uint64_t seed, uint64_t offset, uintptr_t stream, const Allocator& allocate) {
  const fap_fwd_args args = forward_args(q, k, v, out, softmax_lse, attn_probs, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                         block_table, max_seqlen_q, max_seqlen_k);
  return plan_and_run(args, to_options(options, alibi_slopes, seed, offset), varlen, stream, allocate, q,
                      fap_plan_fwd);
}

// FlashAttention-2's flash_attn_with_kvcache: a dense forward over caches updated in place (fap_fwd_args' KV-cache
// fields).
int forward_kvcache(nb::handle q, nb::handle k_cache, nb::handle v_cache, nb::handle k_new, nb::handle v_new,
                    nb::handle out, nb::handle softmax_lse, nb::handle cache_seqlens, nb::handle cache_batch_idx,
                    nb::handle leftpad_k, nb::handle block_table, nb::handle rotary_cos, nb::handle rotary_sin,
                    bool rotary_interleaved, int32_t num_splits, nb::handle alibi_slopes, const OptionsSpec& options,
                    uintptr_t stream, const Allocator& allocate) {
  fap_fwd_args args = forward_args(q, k_cache, v_cache, out, softmax_lse, nb::none(), nb::none(), nb::none(),
                                   nb::none(), block_table, 0, 0);
  args.cache_seqlens = to_tensor(cache_seqlens, "cache_seqlens");
  args.cache_batch_idx = to_tensor(cache_batch_idx, "cache_batch_idx");
  args.leftpad_k = to_tensor(leftpad_k, "cache_leftpad");
  args.k_new = to_tensor(k_new, "k");
  args.v_new = to_tensor(v_new, "v");
  args.rotary_cos = to_tensor(rotary_cos, "rotary_cos");
  args.rotary_sin = to_tensor(rotary_sin, "rotary_sin");
  args.rotary_interleaved = rotary_interleaved ? 1 : 0;
  args.num_splits = num_splits;
  return plan_and_run(args, to_options(options, alibi_slopes, 0, 0), false, stream, allocate, q, fap_plan_fwd);
}

// The core's checks of a forward call without running it: for backends served from Python, which keep the
// one validation of the library.
int check_forward(bool varlen, nb::handle q, nb::handle k, nb::handle v,
                  nb::handle out, nb::handle softmax_lse, nb::handle cu_seqlens_q,
                  nb::handle cu_seqlens_k, nb::handle seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                  nb::handle alibi_slopes, const OptionsSpec& options) {
  const fap_fwd_args args = forward_args(q, k, v, out, softmax_lse, nb::none(), cu_seqlens_q, cu_seqlens_k, seqused_k,
                                         nb::none(), max_seqlen_q, max_seqlen_k);
  const fap_options opts = to_options(options, alibi_slopes, 0, 0);
  return fap_check_fwd(&args, &opts, varlen ? 1 : 0);
}

int backward(bool varlen, nb::handle q, nb::handle k, nb::handle v,
             nb::handle out, nb::handle dout, nb::handle softmax_lse,
             nb::handle dq, nb::handle dk, nb::handle dv,
             nb::handle cu_seqlens_q, nb::handle cu_seqlens_k, int64_t max_seqlen_q,
             int64_t max_seqlen_k, nb::handle alibi_slopes, const OptionsSpec& options, uint64_t seed,
             uint64_t offset, uintptr_t stream, const Allocator& allocate) {
  fap_bwd_args args{};
  set_shared_args(args, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  args.dout = to_tensor(dout, "dout");
  args.dq = to_tensor(dq, "dq");
  args.dk = to_tensor(dk, "dk");
  args.dv = to_tensor(dv, "dv");
  return plan_and_run(args, to_options(options, alibi_slopes, seed, offset), varlen, stream, allocate, q,
                      fap_plan_bwd);
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
  // Tensor parameters take None for an absent tensor.
  const auto tensor = [](const char* name) { return nb::arg(name).none(); };
  m.def("forward", &forward, nb::arg("varlen"), tensor("q"), tensor("k"), tensor("v"), tensor("out"),
        tensor("softmax_lse"), tensor("attn_probs"), tensor("cu_seqlens_q"), tensor("cu_seqlens_k"),
        tensor("seqused_k"), tensor("block_table"), nb::arg("max_seqlen_q"), nb::arg("max_seqlen_k"),
        tensor("alibi_slopes"), nb::arg("options"), nb::arg("seed"), nb::arg("offset"), nb::arg("stream"),
        nb::arg("allocate"));
  m.def("forward_kvcache", &forward_kvcache, tensor("q"), tensor("k_cache"), tensor("v_cache"), tensor("k"),
        tensor("v"), tensor("out"), tensor("softmax_lse"), tensor("cache_seqlens"), tensor("cache_batch_idx"),
        tensor("cache_leftpad"), tensor("block_table"), tensor("rotary_cos"), tensor("rotary_sin"),
        nb::arg("rotary_interleaved"), nb::arg("num_splits"), tensor("alibi_slopes"), nb::arg("options"),
        nb::arg("stream"), nb::arg("allocate"));
  m.def("check_forward", &check_forward, nb::arg("varlen"), tensor("q"), tensor("k"), tensor("v"), tensor("out"),
        tensor("softmax_lse"), tensor("cu_seqlens_q"), tensor("cu_seqlens_k"), tensor("seqused_k"),
        nb::arg("max_seqlen_q"),
        nb::arg("max_seqlen_k"), tensor("alibi_slopes"), nb::arg("options"));
  m.def("backward", &backward, nb::arg("varlen"), tensor("q"), tensor("k"), tensor("v"), tensor("out"),
        tensor("dout"), tensor("softmax_lse"), tensor("dq"), tensor("dk"), tensor("dv"), tensor("cu_seqlens_q"),
        tensor("cu_seqlens_k"), nb::arg("max_seqlen_q"), nb::arg("max_seqlen_k"), tensor("alibi_slopes"),
        nb::arg("options"), nb::arg("seed"), nb::arg("offset"), nb::arg("stream"), nb::arg("allocate"));
  m.def("precompile", &precompile);
  m.def("set_index_checks", [](int32_t enabled) { return static_cast<int>(fap_set_index_checks(enabled)); });
  m.def("index_checks", [] { return fap_index_checks() != 0; });
  m.def("register_dtypes", [](const nb::dict& codes) {
    known_dtypes().clear();
    for (const auto& [dtype, code] : codes) known_dtypes().emplace_back(nb::borrow(dtype), nb::cast<int32_t>(code));
  });
  m.attr("SUCCESS") = static_cast<int>(FAP_SUCCESS);
  m.attr("ERROR_INVALID_ARGUMENT") = static_cast<int>(FAP_ERROR_INVALID_ARGUMENT);
  m.attr("ERROR_UNSUPPORTED") = static_cast<int>(FAP_ERROR_UNSUPPORTED);
  m.attr("ERROR_BACKEND_UNAVAILABLE") = static_cast<int>(FAP_ERROR_BACKEND_UNAVAILABLE);
  m.attr("ERROR_WORKSPACE_TOO_SMALL") = static_cast<int>(FAP_ERROR_WORKSPACE_TOO_SMALL);
  m.attr("ERROR_OUT_OF_MEMORY") = static_cast<int>(FAP_ERROR_OUT_OF_MEMORY);
  m.attr("ERROR_DEVICE") = static_cast<int>(FAP_ERROR_DEVICE);
}
