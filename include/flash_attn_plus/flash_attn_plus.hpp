// A thin C++ layer over the C API: exceptions instead of status codes, host workspaces allocated for you,
// and a scoped backend selection. Header-only, so it adds nothing to the library's ABI.
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "flash_attn_plus/flash_attn_plus.h"

namespace flash_attn_plus {

class Error : public std::runtime_error {
 public:
  Error(fap_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
  fap_status status() const { return status_; }

 private:
  fap_status status_;
};

inline void check(fap_status status) {
  if (status != FAP_SUCCESS) throw Error(status, std::string(fap_status_string(status)) + ": " + fap_last_error());
}

struct BackendInfo {
  std::string name;
  bool usable;
  std::string reason;
  std::string details;
};

inline std::vector<BackendInfo> backends() {
  std::vector<BackendInfo> list;
  for (int32_t i = 0; i < fap_backend_count(); ++i) {
    fap_backend_info info{};
    check(fap_backend_get_info(i, &info));
    list.push_back({info.name, info.usable != 0, info.reason, info.details});
  }
  return list;
}

inline void set_backend(const std::string& name) { check(fap_set_backend(name.c_str())); }
inline std::string backend() { return fap_get_backend(); }
inline std::string resolve_backend(fap_device_type device) {
  const char* name = nullptr;
  check(fap_resolve_backend(device, &name));
  return name;
}

// Selects a backend for the lifetime of the object (process-wide), restoring the previous choice after.
class ScopedBackend {
 public:
  explicit ScopedBackend(const std::string& name) : previous_(backend()) { set_backend(name); }
  ~ScopedBackend() { fap_set_backend(previous_.c_str()); }
  ScopedBackend(const ScopedBackend&) = delete;
  ScopedBackend& operator=(const ScopedBackend&) = delete;

 private:
  std::string previous_;
};

enum class Layout { kDense, kVarlen };

inline size_t workspace_size(const fap_fwd_args& args, const fap_options& options, Layout layout = Layout::kDense) {
  size_t bytes = 0;
  check(layout == Layout::kDense ? fap_mha_fwd_workspace_size(&args, &options, &bytes)
                                 : fap_mha_varlen_fwd_workspace_size(&args, &options, &bytes));
  return bytes;
}

inline size_t workspace_size(const fap_bwd_args& args, const fap_options& options, Layout layout = Layout::kDense) {
  size_t bytes = 0;
  check(layout == Layout::kDense ? fap_mha_bwd_workspace_size(&args, &options, &bytes)
                                 : fap_mha_varlen_bwd_workspace_size(&args, &options, &bytes));
  return bytes;
}

// With a caller-provided workspace (device memory for device backends).
inline void forward(const fap_fwd_args& args, const fap_options& options, void* stream, void* workspace,
                    size_t workspace_bytes, Layout layout = Layout::kDense) {
  check(layout == Layout::kDense ? fap_mha_fwd(&args, &options, stream, workspace, workspace_bytes)
                                 : fap_mha_varlen_fwd(&args, &options, stream, workspace, workspace_bytes));
}

inline void backward(const fap_bwd_args& args, const fap_options& options, void* stream, void* workspace,
                     size_t workspace_bytes, Layout layout = Layout::kDense) {
  check(layout == Layout::kDense ? fap_mha_bwd(&args, &options, stream, workspace, workspace_bytes)
                                 : fap_mha_varlen_bwd(&args, &options, stream, workspace, workspace_bytes));
}

// One planned call (fap_plan_*): checked and prepared once, run any number of times. Move-only.
class Plan {
 public:
  Plan(const fap_fwd_args& args, const fap_options& options, Layout layout = Layout::kDense) {
    check(fap_plan_fwd(&args, &options, layout == Layout::kVarlen ? 1 : 0, &plan_));
  }
  Plan(const fap_bwd_args& args, const fap_options& options, Layout layout = Layout::kDense) {
    check(fap_plan_bwd(&args, &options, layout == Layout::kVarlen ? 1 : 0, &plan_));
  }
  Plan(Plan&& other) noexcept : plan_(other.plan_) { other.plan_ = nullptr; }
  Plan& operator=(Plan&& other) noexcept {
    std::swap(plan_, other.plan_);
    return *this;
  }
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() { fap_plan_destroy(plan_); }

  size_t workspace_size() const {
    size_t bytes = 0;
    check(fap_plan_workspace_size(plan_, &bytes));
    return bytes;
  }
  std::string backend() const { return describe(true); }
  std::string kernel() const { return describe(false); }
  void run(void* stream, void* workspace, size_t workspace_bytes) const {
    check(fap_plan_run(plan_, stream, workspace, workspace_bytes));
  }

 private:
  std::string describe(bool backend_name) const {
    const char *backend_text = nullptr, *kernel_text = nullptr;
    check(fap_plan_describe(plan_, &backend_text, &kernel_text));
    return backend_name ? backend_text : kernel_text;
  }

  fap_plan* plan_ = nullptr;
};

// Host tensors: the workspace is allocated here.
inline void forward(const fap_fwd_args& args, const fap_options& options = fap_default_options(),
                    Layout layout = Layout::kDense) {
  std::vector<unsigned char> workspace(workspace_size(args, options, layout));
  forward(args, options, nullptr, workspace.data(), workspace.size(), layout);
}

inline void backward(const fap_bwd_args& args, const fap_options& options = fap_default_options(),
                     Layout layout = Layout::kDense) {
  std::vector<unsigned char> workspace(workspace_size(args, options, layout));
  backward(args, options, nullptr, workspace.data(), workspace.size(), layout);
}

}  // namespace flash_attn_plus
