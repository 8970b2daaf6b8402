// The CUDA backend: kernels compiled at run time for the exact GPU (jit_cache), launched in the caller's
// current CUDA context on the caller's stream: forward and backward, float16/bfloat16, sm_80+.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

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

// The calling thread's context, checked against the tensors' device. A thread with none gets the primary
// context of the tensors' device, as the CUDA runtime's first call on a thread does (autograd's CUDA thread
// may reach the backward before any runtime call there).
DeviceInfo current_device(const DriverApi& api, int expected_ordinal) {
  DeviceInfo info{};
  check(api, api.cuCtxGetCurrent(&info.context), "cuCtxGetCurrent");
  if (!info.context) {
    CUdevice device = 0;
    check(api, api.cuDeviceGet(&device, expected_ordinal), "cuDeviceGet");
    check(api, api.cuDevicePrimaryCtxRetain(&info.context, device), "cuDevicePrimaryCtxRetain");
    check(api, api.cuCtxSetCurrent(info.context), "cuCtxSetCurrent");
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

// A compiled configuration: its module's kernels by name, the main one first. `defines` and `shared_bytes`
// (the main kernel's dynamic shared memory; the others take none) come from a ForwardConfig or BackwardConfig.
struct KernelRequest {
  std::string name;
  std::vector<std::string> sources, defines, kernels;
  int shared_bytes;
};

// Loaded kernels per (context, configuration), filled on first use.
class KernelRegistry {
 public:
  // The functions of request.kernels, in that order.
  std::vector<CUfunction> functions(const DriverApi& api, const DeviceInfo& device, const KernelRequest& request) {
    const auto key = std::make_tuple(device.context, request.name);
    std::lock_guard<std::mutex> lock(mutex_);
    if (auto found = functions_.find(key); found != functions_.end()) return found->second;
    if (!cache_) cache_ = std::make_unique<KernelCache>(nvrtc_compiler(), default_cache_directory());
    const std::string cubin = cache_->cubin(
        {request.name, assemble_source(request.sources), request.defines, nvrtc_arch(device.compute_capability)});
    CUmodule module = nullptr;
    check(api, api.cuModuleLoadData(&module, cubin.data()), "cuModuleLoadData");
    std::vector<CUfunction> loaded;
    for (const std::string& kernel : request.kernels) {
      CUfunction function = nullptr;
      check(api, api.cuModuleGetFunction(&function, module, kernel.c_str()), "cuModuleGetFunction");
      if (loaded.empty()) {
        check(api,
              api.cuFuncSetAttribute(function, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, request.shared_bytes),
              "cuFuncSetAttribute");
      }
      loaded.push_back(function);
    }
    return functions_[key] = loaded;
  }

 private:
  std::mutex mutex_;
  std::unique_ptr<KernelCache> cache_;
  std::map<std::tuple<CUcontext, std::string>, std::vector<CUfunction>> functions_;
};

KernelRegistry& registry() {
  static KernelRegistry instance;
  return instance;
}

// Whether every row of these operands starts 16-byte aligned, so that tiles load with 16-byte cp.async.
bool vector_loads(const AttentionProblem& p, std::initializer_list<const Operand*> operands) {
  if (p.head_dim % 8 != 0) return false;
  for (const Operand* o : operands) {
    if (reinterpret_cast<uintptr_t>(o->data) % 16 != 0 || o->row_stride % 8 != 0 || o->head_stride % 8 != 0 ||
        o->batch_stride % 8 != 0) {
      return false;
    }
  }
  return true;
}

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
  params.vector_loads = vector_loads(p, {&p.q, &p.k, &p.v});
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

// The backward's workspace: rowsum(dout * out) and the LSE in base-2 units per (head, row), then the fp32
// dQ accumulator, one slice per split. Deterministic mode gives each (batch, kv head) `splits` CTAs that own
// a slice each (about 256 CTAs in all, so the GPU stays busy without a slice per key block); otherwise one
// slice takes every CTA's additions. Rows are "padded rows" (attention_bwd_common.cuh): every sequence
// starts at a multiple of 128 rows of its own, which needs at most batch + 1 such blocks more than the rows
// (batch * seqlen_q, varlen: total_q) fill.
struct BackwardWorkspace {
  int64_t padded_rows, heads_q, splits = 1, head_dim, softmax_bytes, accum_offset;

  BackwardWorkspace(const AttentionProblem& p, const BackwardConfig& config)
      : padded_rows(((p.varlen ? p.total_q : p.batch * p.total_q) / 128 + p.batch + 1) * 128),
        heads_q(p.heads_q),
        head_dim(config.head_dim) {
    if (p.deterministic) {
      const int64_t block_n = config.block_n;
      const int64_t key_blocks = std::max<int64_t>(1, (p.seqlen_k + block_n - 1) / block_n);
      const int64_t ctas = std::max<int64_t>(1, p.batch * p.heads_kv);
      splits = std::min(key_blocks, std::max<int64_t>(1, (256 + ctas - 1) / ctas));
    }
    softmax_bytes = padded_rows * p.heads_q * 4;  // each of dsum and lse_log2
    accum_offset = 2 * softmax_bytes;
  }
  int64_t accum_floats() const { return splits * padded_rows * heads_q * head_dim; }
  size_t bytes() const { return static_cast<size_t>(accum_offset + accum_floats() * 4); }
};

AttentionBwdParams backward_params(const AttentionProblem& p, const BackwardWorkspace& layout, void* workspace) {
  AttentionBwdParams params{};
  params.q = p.q.data, params.k = p.k.data, params.v = p.v.data, params.out = p.out.data, params.dout = p.dout.data;
  params.lse = p.lse.data;
  params.dq = p.dq.data, params.dk = p.dk.data, params.dv = p.dv.data;
  params.dsum = static_cast<float*>(workspace);
  params.lse_log2 = reinterpret_cast<float*>(static_cast<char*>(workspace) + layout.softmax_bytes);
  params.softmax_head_stride = layout.padded_rows;
  params.dq_accum = reinterpret_cast<float*>(static_cast<char*>(workspace) + layout.accum_offset);
  params.dq_accum_split_stride = layout.padded_rows * p.heads_q * layout.head_dim;
  const auto strides = [](const Operand& o, long long& batch, long long& row, long long& head) {
    batch = o.batch_stride, row = o.row_stride, head = o.head_stride;
  };
  strides(p.q, params.q_batch_stride, params.q_row_stride, params.q_head_stride);
  strides(p.k, params.k_batch_stride, params.k_row_stride, params.k_head_stride);
  strides(p.v, params.v_batch_stride, params.v_row_stride, params.v_head_stride);
  strides(p.out, params.out_batch_stride, params.out_row_stride, params.out_head_stride);
  strides(p.dout, params.dout_batch_stride, params.dout_row_stride, params.dout_head_stride);
  strides(p.dq, params.dq_batch_stride, params.dq_row_stride, params.dq_head_stride);
  strides(p.dk, params.dk_batch_stride, params.dk_row_stride, params.dk_head_stride);
  strides(p.dv, params.dv_batch_stride, params.dv_row_stride, params.dv_head_stride);
  params.lse_batch_stride = p.lse.batch_stride, params.lse_head_stride = p.lse.head_stride;
  params.lse_row_stride = p.lse.row_stride;
  params.cu_seqlens_q = p.cu_seqlens_q, params.cu_seqlens_k = p.cu_seqlens_k;
  params.seqlen_q = static_cast<int>(p.seqlen_q), params.seqlen_k = static_cast<int>(p.seqlen_k);
  params.heads_q = static_cast<int>(p.heads_q), params.group_size = static_cast<int>(p.group_size());
  params.head_dim = static_cast<int>(p.head_dim);
  params.splits = static_cast<int>(layout.splits);
  params.deterministic = p.deterministic ? 1 : 0;
  params.vector_loads = vector_loads(p, {&p.q, &p.k, &p.v, &p.dout});
  params.scale = p.softmax_scale, params.scale_log2 = p.softmax_scale * 1.4426950408889634f;
  params.softcap = p.softcap;
  params.window_left = p.window.left, params.window_right = p.window.right;
  params.alibi = p.alibi_slopes, params.alibi_batch_stride = p.alibi_batch_stride;
  params.dropout_threshold = p.dropout_p > 0.0f ? dropout_threshold(p.dropout_p) : 0u;
  params.dropout_scale = 1.0f / (1.0f - p.dropout_p);
  params.dropout_seed = p.dropout_seed, params.dropout_offset = p.dropout_offset;
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
    if (problem.dtype == FAP_DTYPE_FLOAT32) return "float32 tensors: the CUDA kernels take float16 and bfloat16";
    if (problem.probs.data) return "attn_probs is not implemented on CUDA yet";
    return {};
  }

  size_t workspace_size(const AttentionProblem& problem) const override {
    if (problem.direction != Direction::kBackward) return 0;
    // The size asked for does not know the GPU: room for the kernels of every architecture (Hopper's pad the
    // head dim further).
    return std::max(BackwardWorkspace(problem, choose_backward_config(problem, 80)).bytes(),
                    BackwardWorkspace(problem, choose_backward_config(problem, 90)).bytes());
  }

  void run(const AttentionProblem& problem, void* stream, void* workspace, size_t workspace_bytes) const override {
    std::string reason;
    const DriverApi* api = driver(&reason);
    if (!api) fail(FAP_ERROR_BACKEND_UNAVAILABLE, reason);
    const DeviceInfo device = current_device(*api, problem.device_index);
    if (device.compute_capability < 80) {
      fail(FAP_ERROR_UNSUPPORTED, "backend 'cuda': compute capability ", device.compute_capability / 10, ".",
           device.compute_capability % 10, " found; the kernels need 8.0 (Ampere) or newer");
    }
    if (problem.direction == Direction::kForward) {
      run_forward(*api, device, problem, static_cast<CUstream>(stream));
    } else {
      run_backward(*api, device, problem, static_cast<CUstream>(stream), workspace, workspace_bytes);
    }
  }

 private:
  static void require_shared(const DeviceInfo& device, const std::string& name, int bytes) {
    if (bytes > device.max_shared) {
      fail(FAP_ERROR_UNSUPPORTED, "backend 'cuda': ", name, " needs ", bytes, " bytes of shared memory, the device allows ",
           device.max_shared);
    }
  }

  static void launch(const DriverApi& api, CUfunction function, unsigned int blocks_x, int64_t blocks_y, int64_t blocks_z,
                     int threads, int shared_bytes, CUstream stream, void* params) {
    if (blocks_x == 0 || blocks_y == 0 || blocks_z == 0) return;
    void* arguments[] = {params};
    check(api,
          api.cuLaunchKernel(function, blocks_x, static_cast<unsigned int>(blocks_y), static_cast<unsigned int>(blocks_z),
                             static_cast<unsigned int>(threads), 1, 1, static_cast<unsigned int>(shared_bytes), stream,
                             arguments, nullptr),
          "cuLaunchKernel");
  }

  // FLASH_ATTENTION_PLUS_PORTABLE_KERNELS=1 runs the kernels every sm_80+ GPU gets (mma.sync) also where
  // an architecture has its own (Hopper's wgmma forward and backward): for testing those on any GPU, and as a
  // fallback.
  static int dispatch_capability(const DeviceInfo& device) {
    const char* portable = std::getenv("FLASH_ATTENTION_PLUS_PORTABLE_KERNELS");
    return portable && std::string(portable) == "1" ? 80 : device.compute_capability;
  }

  static void run_forward(const DriverApi& api, const DeviceInfo& device, const AttentionProblem& problem,
                          CUstream stream) {
    const ForwardConfig config = choose_forward_config(problem, dispatch_capability(device));
    require_shared(device, config.name(), config.shared_bytes());
    const CUfunction function = registry().functions(
        api, device, {config.name(), config.sources(), config.defines(), {"attention_fwd"}, config.shared_bytes()})[0];
    AttentionFwdParams params = forward_params(problem);
    const auto blocks = static_cast<unsigned int>((problem.seqlen_q + config.block_m - 1) / config.block_m);
    launch(api, function, blocks, problem.batch, problem.heads_q, config.warps * 32, config.shared_bytes(), stream,
           &params);
  }

  static void run_backward(const DriverApi& api, const DeviceInfo& device, const AttentionProblem& problem,
                           CUstream stream, void* workspace, size_t workspace_bytes) {
    const BackwardConfig config = choose_backward_config(problem, dispatch_capability(device));
    require_shared(device, config.name(), config.shared_bytes());
    const std::vector<CUfunction> kernels = registry().functions(
        api, device,
        {config.name(), config.sources(), config.defines(),
         {"attention_bwd", "attention_bwd_preprocess", "attention_bwd_convert"}, config.shared_bytes()});
    const BackwardWorkspace layout(problem, config);
    if (layout.bytes() > workspace_bytes) {  // workspace_size() and this call chose different tiles
      fail(FAP_ERROR_INTERNAL, "backend 'cuda': ", config.name(), " needs ", layout.bytes(), " workspace bytes, got ",
           workspace_bytes);
    }
    AttentionBwdParams params = backward_params(problem, layout, workspace);
    check(api,
          api.cuMemsetD32Async(reinterpret_cast<CUdeviceptr>(params.dq_accum), 0,
                               static_cast<size_t>(layout.accum_floats()), stream),
          "cuMemsetD32Async");
    // The preprocess: 4 rows per CTA, each sequence's rows up to a multiple of 128.
    const auto preprocess_blocks = static_cast<unsigned int>((problem.seqlen_q + 127) / 128 * 32);
    launch(api, kernels[1], preprocess_blocks, problem.batch, problem.heads_q, 128, 0, stream, &params);
    const auto key_blocks = static_cast<unsigned int>((problem.seqlen_k + config.block_n - 1) / config.block_n);
    launch(api, kernels[0], problem.deterministic ? static_cast<unsigned int>(layout.splits) : key_blocks, problem.batch,
           problem.heads_kv, config.warps * 32, config.shared_bytes(), stream, &params);
    // The conversion: 4 rows per CTA, or a 64-row tile of the wgmma kernels' accumulator.
    const auto convert_blocks = static_cast<unsigned int>(config.wgmma ? (problem.seqlen_q + 63) / 64 : (problem.seqlen_q + 3) / 4);
    launch(api, kernels[2], convert_blocks, problem.batch, problem.heads_q, 128, 0, stream, &params);
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
