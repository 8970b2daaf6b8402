// The extern "C" boundary: every entry point validates through validate.cpp, resolves a backend, and turns
// any fap::Error (or unexpected exception) into a status plus the thread-local message.
#include <cstdint>
#include <cmath>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/error.h"
#include "core/validate.h"
#include "flash_attn_plus/flash_attn_plus.h"

namespace fap {
namespace {

thread_local std::string last_error;

template <typename Body>
fap_status guarded(Body&& body) {
  try {
    body();
    last_error.clear();
    return FAP_SUCCESS;
  } catch (const Error& error) {
    last_error = error.what();
    return error.status();
  } catch (const std::bad_alloc&) {
    last_error = "out of host memory";
    return FAP_ERROR_OUT_OF_MEMORY;
  } catch (const std::exception& error) {
    last_error = concat("internal error: ", error.what());
    return FAP_ERROR_INTERNAL;
  } catch (...) {
    last_error = "internal error: unknown exception";
    return FAP_ERROR_INTERNAL;
  }
}

AttentionProblem build_problem(const fap_fwd_args* args, const fap_options* options, bool varlen) {
  require(args != nullptr, "args: expected a pointer to fap_fwd_args, got NULL");
  require(options != nullptr, "options: expected a pointer to fap_options (see fap_default_options()), got NULL");
  return make_forward_problem(*args, *options, varlen);
}

AttentionProblem build_problem(const fap_bwd_args* args, const fap_options* options, bool varlen) {
  require(args != nullptr, "args: expected a pointer to fap_bwd_args, got NULL");
  require(options != nullptr, "options: expected a pointer to fap_options (see fap_default_options()), got NULL");
  return make_backward_problem(*args, *options, varlen);
}

// The C API's varlen flag: 0 (dense layout) or 1 (varlen).
bool varlen_layout(int32_t varlen) {
  require(varlen == 0 || varlen == 1, "varlen: expected 0 (dense) or 1 (varlen), got ", varlen);
  return varlen != 0;
}

const Backend& backend_for(const AttentionProblem& problem) {
  const Backend& backend = resolve_backend(problem.device_type);
  const std::string reason = backend.unsupported_reason(problem);
  if (!reason.empty()) fail(FAP_ERROR_UNSUPPORTED, "backend '", backend.name(), "': ", reason);
  return backend;
}

}  // namespace
}  // namespace fap

// One validated call: the problem, its backend and what the backend prepared for it (which reads the problem,
// so a plan never moves once made).
struct fap_plan {
  fap::AttentionProblem problem;
  const fap::Backend* backend = nullptr;
  std::unique_ptr<fap::PreparedCall> call;

  template <typename Args>
  fap_plan(const Args* args, const fap_options* options, bool varlen)
      : problem(fap::build_problem(args, options, varlen)),
        backend(&fap::backend_for(problem)),
        call(backend->prepare(problem)) {}
  fap_plan(const fap_plan&) = delete;
  fap_plan& operator=(const fap_plan&) = delete;

  void run(void* stream, void* workspace, size_t workspace_bytes) const {
    const size_t needed = call->workspace_size();
    if (workspace_bytes < needed || (needed > 0 && workspace == nullptr)) {
      fap::fail(FAP_ERROR_WORKSPACE_TOO_SMALL, "workspace: backend '", backend->name(), "' needs ", needed,
                " bytes, got ", workspace ? workspace_bytes : 0, " (ask fap_*_workspace_size() just before the call)");
    }
    // The CUDA kernels copy workspace rows 16 bytes at a time.
    if (needed > 0 && reinterpret_cast<std::uintptr_t>(workspace) % 16 != 0) {
      fap::fail(FAP_ERROR_INVALID_ARGUMENT,
                "workspace: expected a 16-byte aligned pointer (as cudaMalloc and malloc give), got ", workspace);
    }
    call->run(stream, workspace);
  }
};

namespace fap {
namespace {

template <typename Args>
fap_status create_plan(const Args* args, const fap_options* options, int32_t varlen, fap_plan** plan) {
  return guarded([&] {
    require(plan != nullptr, "plan: expected a pointer to receive the plan, got NULL");
    *plan = nullptr;
    *plan = new fap_plan(args, options, varlen_layout(varlen));
  });
}

template <typename Args>
fap_status query_workspace(const Args* args, const fap_options* options, bool varlen, size_t* bytes) {
  return guarded([&] {
    require(bytes != nullptr, "bytes: expected a pointer to receive the workspace size, got NULL");
    *bytes = fap_plan(args, options, varlen).call->workspace_size();
  });
}

template <typename Args>
fap_status run(const Args* args, const fap_options* options, bool varlen, void* stream, void* workspace,
               size_t workspace_bytes) {
  return guarded([&] { fap_plan(args, options, varlen).run(stream, workspace, workspace_bytes); });
}

}  // namespace
}  // namespace fap

using fap::guarded;

extern "C" {

int32_t fap_api_version(void) { return FAP_API_VERSION; }
const char* fap_version_string(void) { return FAP_VERSION_STRING; }
const char* fap_last_error(void) { return fap::last_error.c_str(); }

const char* fap_status_string(fap_status status) {
  switch (status) {
    case FAP_SUCCESS: return "success";
    case FAP_ERROR_INVALID_ARGUMENT: return "invalid argument";
    case FAP_ERROR_UNSUPPORTED: return "unsupported by the selected backend";
    case FAP_ERROR_BACKEND_UNAVAILABLE: return "backend unavailable";
    case FAP_ERROR_WORKSPACE_TOO_SMALL: return "workspace too small";
    case FAP_ERROR_OUT_OF_MEMORY: return "out of memory";
    case FAP_ERROR_DEVICE: return "device error";
    case FAP_ERROR_INTERNAL: return "internal error";
  }
  return "unknown status";
}

fap_options fap_default_options(void) {
  fap_options options{};
  options.softmax_scale = std::numeric_limits<float>::quiet_NaN();
  options.window_size_left = -1;
  options.window_size_right = -1;
  return options;
}

fap_tensor fap_make_tensor(void* data, fap_dtype dtype, fap_device_type device_type, int32_t device_index,
                           int32_t rank, const int64_t* shape) {
  fap_tensor tensor{};
  tensor.data = data;
  tensor.dtype = dtype;
  tensor.device_type = device_type;
  tensor.device_index = device_index;
  // An invalid rank is kept as given (shape left empty) so that validation reports it by name.
  tensor.rank = rank;
  if (rank < 0 || rank > FAP_MAX_RANK || shape == nullptr) return tensor;
  int64_t stride = 1;
  for (int32_t i = rank - 1; i >= 0; --i) {
    tensor.shape[i] = shape[i];
    tensor.strides[i] = stride;
    stride *= shape[i] > 0 ? shape[i] : 1;
  }
  return tensor;
}

int32_t fap_backend_count(void) { return static_cast<int32_t>(fap::all_backends().size()); }

fap_status fap_backend_get_info(int32_t index, fap_backend_info* info) {
  return guarded([&] {
    fap::require(info != nullptr, "info: expected a pointer to fap_backend_info, got NULL");
    fap::require(index >= 0 && index < fap_backend_count(), "index: expected 0 <= index < ", fap_backend_count(),
                 ", got ", index);
    const fap::Backend& backend = *fap::all_backends()[static_cast<size_t>(index)];
    // Valid until this thread's next call (thread-local storage).
    static thread_local std::string reason, details;
    reason.clear();
    details = backend.details();
    info->name = backend.name();
    info->usable = backend.usable(&reason) ? 1 : 0;
    info->reason = reason.c_str();
    info->details = details.c_str();
  });
}

fap_status fap_set_backend(const char* name) {
  return guarded([&] {
    fap::require(name != nullptr, "name: expected a backend name (\"auto\", \"cpu\", \"cuda\"), got NULL");
    fap::select_backend(name);
  });
}

const char* fap_get_backend(void) {
  static thread_local std::string name;
  name = fap::selected_backend();
  return name.c_str();
}

fap_status fap_resolve_backend(int32_t device_type, const char** name) {
  return guarded([&] {
    fap::require(name != nullptr, "name: expected a pointer to receive the backend name, got NULL");
    fap::require(device_type == FAP_DEVICE_CPU || device_type == FAP_DEVICE_CUDA, "device_type: unknown value ",
                 device_type);
    *name = fap::resolve_backend(static_cast<fap_device_type>(device_type)).name();
  });
}

fap_status fap_set_index_checks(int32_t enabled) {
  return guarded([&] {
    fap::require(enabled == 0 || enabled == 1, "enabled: expected 0 or 1, got ", enabled);
    fap::set_index_checks(enabled != 0);
  });
}

int32_t fap_index_checks(void) { return fap::index_checks() ? 1 : 0; }

fap_status fap_plan_fwd(const fap_fwd_args* args, const fap_options* options, int32_t varlen, fap_plan** plan) {
  return fap::create_plan(args, options, varlen, plan);
}
fap_status fap_plan_bwd(const fap_bwd_args* args, const fap_options* options, int32_t varlen, fap_plan** plan) {
  return fap::create_plan(args, options, varlen, plan);
}

fap_status fap_plan_workspace_size(const fap_plan* plan, size_t* bytes) {
  return guarded([&] {
    fap::require(plan != nullptr, "plan: expected a plan from fap_plan_fwd/fap_plan_bwd, got NULL");
    fap::require(bytes != nullptr, "bytes: expected a pointer to receive the workspace size, got NULL");
    *bytes = plan->call->workspace_size();
  });
}

fap_status fap_plan_describe(const fap_plan* plan, const char** backend, const char** kernel) {
  return guarded([&] {
    fap::require(plan != nullptr, "plan: expected a plan from fap_plan_fwd/fap_plan_bwd, got NULL");
    if (backend) *backend = plan->backend->name();
    if (kernel) *kernel = plan->call->kernel();
  });
}

fap_status fap_plan_run(const fap_plan* plan, void* stream, void* workspace, size_t workspace_bytes) {
  return guarded([&] {
    fap::require(plan != nullptr, "plan: expected a plan from fap_plan_fwd/fap_plan_bwd, got NULL");
    plan->run(stream, workspace, workspace_bytes);
  });
}

void fap_plan_destroy(fap_plan* plan) { delete plan; }

fap_status fap_check_fwd(const fap_fwd_args* args, const fap_options* options, int32_t varlen) {
  return guarded([&] { fap::build_problem(args, options, fap::varlen_layout(varlen)); });
}

fap_status fap_precompile(const fap_kernel_spec* specs, int32_t count, int32_t device_index) {
  return guarded([&] {
    fap::require(count >= 0, "count: expected >= 0, got ", count);
    fap::require(specs != nullptr || count == 0, "specs: expected an array of ", count, " fap_kernel_spec, got NULL");
    fap::require(device_index >= 0, "device_index: expected a CUDA device ordinal >= 0, got ", device_index);
    std::vector<fap::KernelFeatures> features;
    for (int32_t i = 0; i < count; ++i) features.push_back(fap::make_kernel_features(specs[i], i));
    const fap::Backend& backend = fap::resolve_backend(FAP_DEVICE_CUDA);
    for (const fap::KernelFeatures& entry : features) backend.precompile(entry, device_index);
  });
}

fap_status fap_mha_fwd_workspace_size(const fap_fwd_args* args, const fap_options* options, size_t* bytes) {
  return fap::query_workspace(args, options, false, bytes);
}
fap_status fap_mha_fwd(const fap_fwd_args* args, const fap_options* options, void* stream, void* workspace,
                       size_t workspace_bytes) {
  return fap::run(args, options, false, stream, workspace, workspace_bytes);
}
fap_status fap_mha_varlen_fwd_workspace_size(const fap_fwd_args* args, const fap_options* options, size_t* bytes) {
  return fap::query_workspace(args, options, true, bytes);
}
fap_status fap_mha_varlen_fwd(const fap_fwd_args* args, const fap_options* options, void* stream, void* workspace,
                              size_t workspace_bytes) {
  return fap::run(args, options, true, stream, workspace, workspace_bytes);
}
fap_status fap_mha_bwd_workspace_size(const fap_bwd_args* args, const fap_options* options, size_t* bytes) {
  return fap::query_workspace(args, options, false, bytes);
}
fap_status fap_mha_bwd(const fap_bwd_args* args, const fap_options* options, void* stream, void* workspace,
                       size_t workspace_bytes) {
  return fap::run(args, options, false, stream, workspace, workspace_bytes);
}
fap_status fap_mha_varlen_bwd_workspace_size(const fap_bwd_args* args, const fap_options* options, size_t* bytes) {
  return fap::query_workspace(args, options, true, bytes);
}
fap_status fap_mha_varlen_bwd(const fap_bwd_args* args, const fap_options* options, void* stream, void* workspace,
                              size_t workspace_bytes) {
  return fap::run(args, options, true, stream, workspace, workspace_bytes);
}

}  // extern "C"
