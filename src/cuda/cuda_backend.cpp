// The CUDA backend: kernels compiled at run time for the exact GPU (jit_cache), launched in the caller's
// current CUDA context on the caller's stream. Today it runs the forward for float16/bfloat16 on sm_80+.
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "core/backend.h"
#include "core/error.h"
#include "core/philox.h"
#include "src/cuda/attention_config.h"
#include "src/cuda/cuda_api.h"
#include "src/cuda/jit_cache.h"
#include "src/cuda/kernel_sources.h"
#include "src/cuda/kernels/attention_params.cuh"

namespace fap::cuda {
namespace {

struct DeviceInfo {
  CUcontext context;
  int ordinal, compute_capability, max_shared;
};

DeviceInfo current_device(const DriverApi& api, int expected_ordinal) {
  DeviceInfo info{};
  check(api, api.cuCtxGetCurrent(&info.context), "cuCtxGetCurrent");
  if (!info.context) {
    fail(FAP_ERROR_DEVICE, "no current CUDA context on this thread: make the tensors' device current first "
                           "(torch does this for its tensors)");
  }
  CUdevice device = 0;
  check(api, api.cuCtxGetDevice(&device), "cuCtxGetDevice");
  info.ordinal = device;
  if (info.ordinal != expected_ordinal) {
    fail(FAP_ERROR_INVALID_ARGUMENT, "q: the tensors are on cuda:", expected_ordinal, " but the current CUDA context is "
                                     "for cuda:", info.ordinal);
  }
  int major = 0, minor = 0;
  check(api, api.cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device), "cuDeviceGetAttribute");
  check(api, api.cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device), "cuDeviceGetAttribute");
  check(api, api.cuDeviceGetAttribute(&info.max_shared, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, device),
        "cuDeviceGetAttribute");
  info.compute_capability = major * 10 + minor;
  return info;
}

// Loaded kernels per (context, configuration), filled on first use.
class KernelRegistry {
 public:
  CUfunction forward(const DriverApi& api, const DeviceInfo& device, const ForwardConfig& config) {
    const auto key = std::make_tuple(device.context, config.name());
    std::lock_guard<std::mutex> lock(mutex_);
    if (auto found = functions_.find(key); found != functions_.end()) return found->second;
    if (!cache_) cache_ = std::make_unique<KernelCache>(nvrtc_compiler(), default_cache_directory());
    const CompileRequest request{
        config.name(),
        assemble_source({"host_device.h", "philox.h", "mask.h", "attention_params.cuh", "attention_fwd.cuh"}),
        config.defines(),
        nvrtc_arch(device.compute_capability)};
    const std::string cubin = cache_->cubin(request);
    CUmodule module = nullptr;
    CUfunction function = nullptr;
    check(api, api.cuModuleLoadData(&module, cubin.data()), "cuModuleLoadData");
    check(api, api.cuModuleGetFunction(&function, module, "attention_fwd"), "cuModuleGetFunction");
    check(api, api.cuFuncSetAttribute(function, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, config.shared_bytes()),
          "cuFuncSetAttribute");
    return functions_[key] = function;
  }

 private:
  std::mutex mutex_;
  std::unique_ptr<KernelCache> cache_;
  std::map<std::tuple<CUcontext, std::string>, CUfunction> functions_;
};

bool aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

AttentionFwdParams forward_params(const AttentionProblem& p) {
  AttentionFwdParams params{};
  params.q = p.q.data;
  params.k = p.k.data;
  params.v = p.v.data;
  params.out = p.out.data;
  params.lse = p.lse.data;
  params.q_batch_stride = p.q.batch_stride, params.q_row_stride = p.q.row_stride, params.q_head_stride = p.q.head_stride;
  params.k_batch_stride = p.k.batch_stride, params.k_row_stride = p.k.row_stride, params.k_head_stride = p.k.head_stride;
  params.v_batch_stride = p.v.batch_stride, params.v_row_stride = p.v.row_stride, params.v_head_stride = p.v.head_stride;
  params.out_batch_stride = p.out.batch_stride, params.out_row_stride = p.out.row_stride;
  params.out_head_stride = p.out.head_stride;
  params.lse_batch_stride = p.lse.batch_stride, params.lse_head_stride = p.lse.head_stride;
  params.lse_row_stride = p.lse.row_stride;
  params.cu_seqlens_q = p.cu_seqlens_q;
  params.cu_seqlens_k = p.cu_seqlens_k;
  params.seqlen_q = static_cast<int>(p.seqlen_q);
  params.seqlen_k = static_cast<int>(p.seqlen_k);
  params.heads_q = static_cast<int>(p.heads_q);
  params.group_size = static_cast<int>(p.group_size());
  params.head_dim = static_cast<int>(p.head_dim);
  const bool strides_aligned = p.head_dim % 8 == 0 && p.q.row_stride % 8 == 0 && p.q.head_stride % 8 == 0 &&
                               p.q.batch_stride % 8 == 0 && p.k.row_stride % 8 == 0 && p.k.head_stride % 8 == 0 &&
                               p.k.batch_stride % 8 == 0 && p.v.row_stride % 8 == 0 && p.v.head_stride % 8 == 0 &&
                               p.v.batch_stride % 8 == 0;
  params.vector_loads = strides_aligned && aligned16(p.q.data) && aligned16(p.k.data) && aligned16(p.v.data);
  params.scale = p.softmax_scale;
  params.scale_log2 = p.softmax_scale * 1.4426950408889634f;
  params.softcap = p.softcap;
  params.window_left = p.window.left;
  params.window_right = p.window.right;
  params.alibi = p.alibi_slopes;
  params.alibi_batch_stride = p.alibi_batch_stride;
  params.dropout_threshold = p.dropout_p > 0.0f ? dropout_threshold(p.dropout_p) : 0u;
  params.dropout_scale = 1.0f / (1.0f - p.dropout_p);
  params.dropout_seed = p.dropout_seed;
  params.dropout_offset = p.dropout_offset;
  return params;
}

class CudaBackend final : public Backend {
 public:
  const char* name() const override { return "cuda"; }

  bool usable(std::string* reason) const override {
    std::string why;
    if (!driver(&why) || !nvrtc(&why)) {
      if (reason) *reason = why;
      return false;
    }
    return true;
  }

  bool runs_on(fap_device_type device) const override { return device == FAP_DEVICE_CUDA; }

  std::string details() const override {
    std::string ignored, text;
    if (const DriverApi* api = driver(&ignored))
      text = concat("driver CUDA ", api->version / 1000, ".", api->version % 1000 / 10, "; ");
    if (const NvrtcApi* api = nvrtc(&ignored)) text += concat("NVRTC ", api->major, ".", api->minor, " (", api->path, "); ");
    return text + "kernel cache: " + default_cache_directory();
  }

  std::string unsupported_reason(const AttentionProblem& problem) const override {
    if (problem.direction == Direction::kBackward) return "the backward is not implemented on CUDA yet";
    if (problem.dtype == FAP_DTYPE_FLOAT32) return "float32 tensors: the CUDA kernels take float16 and bfloat16";
    if (problem.probs.data) return "attn_probs is not implemented on CUDA yet";
    return {};
  }

  size_t workspace_size(const AttentionProblem&) const override { return 0; }

  void run(const AttentionProblem& problem, void* stream, void*, size_t) const override {
    std::string reason;
    const DriverApi* api = driver(&reason);
    if (!api) fail(FAP_ERROR_BACKEND_UNAVAILABLE, reason);
    const DeviceInfo device = current_device(*api, problem.device_index);
    if (device.compute_capability < 80) {
      fail(FAP_ERROR_UNSUPPORTED, "backend 'cuda': compute capability ", device.compute_capability / 10, ".",
           device.compute_capability % 10, " found; the kernels need 8.0 (Ampere) or newer");
    }
    const ForwardConfig config = choose_forward_config(problem, device.compute_capability);
    if (config.shared_bytes() > device.max_shared) {
      fail(FAP_ERROR_UNSUPPORTED, "backend 'cuda': ", config.name(), " needs ", config.shared_bytes(),
           " bytes of shared memory, the device allows ", device.max_shared);
    }
    static KernelRegistry registry;
    CUfunction function = registry.forward(*api, device, config);
    AttentionFwdParams params = forward_params(problem);
    void* arguments[] = {&params};
    const auto blocks = static_cast<unsigned int>((problem.seqlen_q + config.block_m - 1) / config.block_m);
    if (blocks == 0) return;
    check(*api,
          api->cuLaunchKernel(function, blocks, static_cast<unsigned int>(problem.batch),
                              static_cast<unsigned int>(problem.heads_q), static_cast<unsigned int>(config.warps * 32), 1,
                              1, static_cast<unsigned int>(config.shared_bytes()), static_cast<CUstream>(stream),
                              arguments, nullptr),
          "cuLaunchKernel");
  }
};

}  // namespace
}  // namespace fap::cuda

namespace fap {
const Backend& cuda_backend() {
  static const cuda::CudaBackend backend;
  return backend;
}
}  // namespace fap
