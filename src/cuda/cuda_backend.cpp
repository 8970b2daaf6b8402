// The CUDA backend: kernels compiled at run time for the exact GPU (jit_cache), launched in the caller's
// current CUDA context on the caller's stream: forward and backward, float16/bfloat16, sm_80+.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <map>
#include <memory>
#include <limits>
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

// What the dispatch needs of a device, read once per ordinal.
struct DeviceInfo {
  int compute_capability = 0, max_shared = 0, multiprocessors = 0, shared_per_multiprocessor = 0;
};

const DeviceInfo& device_info(const DriverApi& api, int ordinal) {
  static std::mutex mutex;
  static std::map<int, DeviceInfo> known;
  std::lock_guard<std::mutex> lock(mutex);
  if (auto found = known.find(ordinal); found != known.end()) return found->second;
  CUdevice device = 0;
  check(api, api.cuDeviceGet(&device, ordinal), "cuDeviceGet");
  int major = 0, minor = 0;
  DeviceInfo info;
  check(api, api.cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device), "cuDeviceGetAttribute");
  check(api, api.cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device), "cuDeviceGetAttribute");
  check(api, api.cuDeviceGetAttribute(&info.max_shared, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, device),
        "cuDeviceGetAttribute");
  check(api, api.cuDeviceGetAttribute(&info.multiprocessors, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, device),
        "cuDeviceGetAttribute");
  check(api,
        api.cuDeviceGetAttribute(&info.shared_per_multiprocessor,
                                 CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR, device),
        "cuDeviceGetAttribute");
  info.compute_capability = major * 10 + minor;
  return known[ordinal] = info;
}

CUcontext primary_context(const DriverApi& api, int ordinal) {
  static std::mutex mutex;
  static std::map<int, CUcontext> retained;  // retained once per process, as the CUDA runtime does
  std::lock_guard<std::mutex> lock(mutex);
  if (auto found = retained.find(ordinal); found != retained.end()) return found->second;
  CUdevice device = 0;
  check(api, api.cuDeviceGet(&device, ordinal), "cuDeviceGet");
  CUcontext context = nullptr;
  check(api, api.cuDevicePrimaryCtxRetain(&context, device), "cuDevicePrimaryCtxRetain");
  return retained[ordinal] = context;
}

// The context a call runs in, current for the scope. Made from a device ordinal (planning): the calling
// thread's current context when it is on that device; a thread with none gets the device's primary context
// made current, as the CUDA runtime's first call on a thread does (autograd's CUDA thread may reach the
// backward before any runtime call there); a thread current on another device gets the primary context of
// the tensors' device for the scope only. Made from a plan's context (running): that context, for the scope.
class ScopedContext {
 public:
  ScopedContext(const DriverApi& api, int ordinal) : api_(api) {
    check(api, api.cuCtxGetCurrent(&context_), "cuCtxGetCurrent");
    if (!context_) {
      context_ = primary_context(api, ordinal);
      check(api, api.cuCtxSetCurrent(context_), "cuCtxSetCurrent");
      return;
    }
    CUdevice device = 0;
    check(api, api.cuCtxGetDevice(&device), "cuCtxGetDevice");
    if (device != ordinal) enter(primary_context(api, ordinal));
  }
  ScopedContext(const DriverApi& api, CUcontext context) : api_(api) {
    check(api, api.cuCtxGetCurrent(&context_), "cuCtxGetCurrent");
    if (context_ != context) enter(context);
  }
  ~ScopedContext() {
    CUcontext ignored = nullptr;
    if (pushed_) api_.cuCtxPopCurrent(&ignored);
  }
  ScopedContext(const ScopedContext&) = delete;
  ScopedContext& operator=(const ScopedContext&) = delete;

  CUcontext context() const { return context_; }

 private:
  void enter(CUcontext context) {
    check(api_, api_.cuCtxPushCurrent(context), "cuCtxPushCurrent");
    context_ = context;
    pushed_ = true;
  }

  const DriverApi& api_;
  CUcontext context_ = nullptr;
  bool pushed_ = false;
};

// A configuration's compiled module in one context: its kernels (Config::kernels(), main one first), the
// main kernel's dynamic shared memory and the configuration's name.
struct LoadedKernels {
  std::vector<CUfunction> functions;
  int shared_bytes = 0;
  std::string name;
};

// FLASH_ATTENTION_PLUS_PORTABLE_KERNELS=1 runs the kernels every sm_80+ GPU gets (mma.sync) also where
// an architecture has its own (Hopper's wgmma forward and backward): for testing those on any GPU, and as a
// fallback. =75 runs Turing's (float16 only): their configurations for its 64 KB of shared memory, compiled as
// compute_75 PTX that the driver translates for the GPU at hand, so that the code Turing runs is tested on newer
// GPUs. The value is read once per process.
int dispatch_capability(const DeviceInfo& device) {
  static const int portable = [] {
    const char* value = std::getenv("FLASH_ATTENTION_PLUS_PORTABLE_KERNELS");
    const std::string text = value ? value : "";
    return text == "1" ? 80 : text == "75" ? 75 : 0;
  }();
  return portable && portable < device.compute_capability ? portable : device.compute_capability;
}

// The target NVRTC compiles for: the device's own architecture, or Turing's PTX where the dispatch runs Turing's
// kernels on a newer GPU.
std::string kernel_arch(const DeviceInfo& device) {
  const int capability = dispatch_capability(device);
  return capability == 75 && device.compute_capability != 75 ? "compute_75" : nvrtc_arch(device.compute_capability);
}

KernelCache& kernel_cache() {
  static KernelCache cache(nvrtc_compiler(), default_cache_directory());
  return cache;
}

// Loaded kernels per (context, configuration), filled on first use. A lookup compares configurations as
// tuples of their fields: no strings are built once a configuration is loaded.
template <typename Config>
const LoadedKernels& loaded_kernels(const DriverApi& api, CUcontext context, const DeviceInfo& device,
                                    const Config& config) {
  static std::mutex mutex;
  static std::map<std::pair<CUcontext, Config>, LoadedKernels> loaded;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(context, config);
  if (auto found = loaded.find(key); found != loaded.end()) return found->second;
  LoadedKernels entry;
  entry.name = config.name();
  entry.shared_bytes = config.shared_bytes();
  if (entry.shared_bytes > device.max_shared) {
    fail(FAP_ERROR_UNSUPPORTED, "backend 'cuda': ", entry.name, " needs ", entry.shared_bytes,
         " bytes of shared memory, the device allows ", device.max_shared);
  }
  const std::string cubin = kernel_cache().cubin(compile_request(config, kernel_arch(device)));
  CUmodule module = nullptr;
  check(api, api.cuModuleLoadData(&module, cubin.data()), "cuModuleLoadData");
  for (const std::string& kernel : config.kernels()) {
    CUfunction function = nullptr;
    check(api, api.cuModuleGetFunction(&function, module, kernel.c_str()), "cuModuleGetFunction");
    if (entry.functions.empty()) {
      check(api,
            api.cuFuncSetAttribute(function, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, entry.shared_bytes),
            "cuFuncSetAttribute");
    }
    entry.functions.push_back(function);
  }
  return loaded.emplace(key, std::move(entry)).first->second;
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

void strides(const Operand& o, long long& batch, long long& row, long long& head) {
  batch = o.batch_stride, row = o.row_stride, head = o.head_stride;
}

// What every attention kernel reads; vector_loads for the operands the kernel copies with 16-byte loads.
AttentionParams attention_params(const AttentionProblem& p, bool vector_loads) {
  AttentionParams params{};
  params.q = p.q.data, params.k = p.k.data, params.v = p.v.data, params.out = p.out.data;
  params.lse = p.lse.data;
  strides(p.q, params.q_batch_stride, params.q_row_stride, params.q_head_stride);
  strides(p.k, params.k_batch_stride, params.k_row_stride, params.k_head_stride);
  strides(p.v, params.v_batch_stride, params.v_row_stride, params.v_head_stride);
  strides(p.out, params.out_batch_stride, params.out_row_stride, params.out_head_stride);
  params.lse_batch_stride = p.lse.batch_stride, params.lse_head_stride = p.lse.head_stride;
  params.lse_row_stride = p.lse.row_stride;
  params.cu_seqlens_q = p.cu_seqlens_q, params.cu_seqlens_k = p.cu_seqlens_k;
  params.batch = static_cast<int>(p.batch);
  params.seqlen_q = static_cast<int>(p.seqlen_q), params.seqlen_k = static_cast<int>(p.seqlen_k);
  // A paged cache's cu_seqlens_k counts keys (its pages are found through block_table, clamped there).
  constexpr int64_t kMaxOffset = std::numeric_limits<int32_t>::max();  // cu_seqlens are int32
  params.total_q = static_cast<int>(std::min(p.total_q, kMaxOffset));
  params.total_k = static_cast<int>(p.block_table ? kMaxOffset : std::min(p.total_k, kMaxOffset));
  params.heads_q = static_cast<int>(p.heads_q), params.group_size = static_cast<int>(p.group_size());
  params.head_dim = static_cast<int>(p.head_dim);
  params.vector_loads = vector_loads;
  params.scale = p.softmax_scale, params.scale_log2 = p.softmax_scale * 1.4426950408889634f;
  params.softcap = p.softcap;
  params.window_left = p.window.left, params.window_right = p.window.right;
  params.alibi = p.alibi_slopes, params.alibi_batch_stride = p.alibi_batch_stride;
  params.dropout_threshold = p.dropout_p > 0.0f ? dropout_threshold(p.dropout_p) : 0u;
  params.dropout_scale = 1.0f / (1.0f - p.dropout_p);
  params.dropout_seed = p.dropout_seed, params.dropout_offset = p.dropout_offset;
  return params;
}

// The backward's workspace: rowsum(dout * out) and the LSE in base-2 units per (head, row), then the fp32
// dQ accumulator, then (the d = 256 wgmma kernel's deterministic mode) the counters of each (head, block of 64
// padded rows) that order the additions to it (DqOrder in attention_bwd_sm90_common.cuh; the preprocess sets
// them). The other kernels' deterministic mode instead gives each (batch, kv head) `splits` CTAs that own an
// accumulator slice each (about 256 CTAs in all, so the GPU stays busy without a slice per key block);
// otherwise one slice takes every CTA's additions. Rows are "padded rows" (attention_bwd_common.cuh): every
// sequence starts at a multiple of 128 rows of its own, which needs at most batch + 1 such blocks more than the
// rows (batch * seqlen_q, varlen: total_q) fill.
struct BackwardWorkspace {
  int64_t padded_rows, heads_q, splits = 1, head_dim, softmax_bytes, accum_offset, order_counters = 0;

  BackwardWorkspace(const AttentionProblem& p, const BackwardConfig& config)
      : padded_rows(((p.varlen ? p.total_q : p.batch * p.total_q) / 128 + p.batch + 1) * 128),
        heads_q(p.heads_q),
        head_dim(config.head_dim) {
    if (p.deterministic && config.wgmma && config.head_dim == 256) {
      order_counters = heads_q * padded_rows / 64;
    } else if (p.deterministic) {
      const int64_t block_n = config.block_n;
      const int64_t key_blocks = std::max<int64_t>(1, (p.seqlen_k + block_n - 1) / block_n);
      const int64_t ctas = std::max<int64_t>(1, p.batch * p.heads_kv);
      splits = std::min(key_blocks, std::max<int64_t>(1, (256 + ctas - 1) / ctas));
    }
    softmax_bytes = padded_rows * p.heads_q * 4;  // each of dsum and lse_log2
    accum_offset = 2 * softmax_bytes;
  }
  int64_t accum_floats() const { return splits * padded_rows * heads_q * head_dim; }
  size_t bytes() const { return static_cast<size_t>(accum_offset + (accum_floats() + order_counters) * 4); }
};

AttentionBwdParams backward_params(const AttentionProblem& p, const BackwardWorkspace& layout, void* workspace) {
  AttentionBwdParams params{};
  static_cast<AttentionParams&>(params) = attention_params(p, vector_loads(p, {&p.q, &p.k, &p.v, &p.dout}));
  params.dout = p.dout.data, params.dq = p.dq.data, params.dk = p.dk.data, params.dv = p.dv.data;
  params.dsum = static_cast<float*>(workspace);
  params.lse_log2 = reinterpret_cast<float*>(static_cast<char*>(workspace) + layout.softmax_bytes);
  params.softmax_head_stride = layout.padded_rows;
  params.dq_accum = reinterpret_cast<float*>(static_cast<char*>(workspace) + layout.accum_offset);
  params.dq_accum_split_stride = layout.padded_rows * p.heads_q * layout.head_dim;
  strides(p.dout, params.dout_batch_stride, params.dout_row_stride, params.dout_head_stride);
  strides(p.dq, params.dq_batch_stride, params.dq_row_stride, params.dq_head_stride);
  strides(p.dk, params.dk_batch_stride, params.dk_row_stride, params.dk_head_stride);
  strides(p.dv, params.dv_batch_stride, params.dv_row_stride, params.dv_head_stride);
  if (layout.order_counters > 0) params.dq_order = reinterpret_cast<int*>(params.dq_accum + layout.accum_floats());
  params.splits = static_cast<int>(layout.splits);
  params.deterministic = p.deterministic ? 1 : 0;
  return params;
}

const DriverApi& loaded_driver() {
  std::string reason;
  const DriverApi* api = driver(&reason);
  if (!api) fail(FAP_ERROR_BACKEND_UNAVAILABLE, reason);
  return *api;
}

const DeviceInfo& supported_device(const DriverApi& api, int ordinal) {
  const DeviceInfo& device = device_info(api, ordinal);
  if (device.compute_capability < 75) {
    fail(FAP_ERROR_UNSUPPORTED, "backend 'cuda': compute capability ", device.compute_capability / 10, ".",
         device.compute_capability % 10, " found; the kernels need 7.5 (Turing, float16) or newer");
  }
  return device;
}

void launch(const DriverApi& api, CUfunction function, unsigned int blocks_x, int64_t blocks_y, int64_t blocks_z,
            int threads, int shared_bytes, CUstream stream, const void* params) {
  if (blocks_x == 0 || blocks_y == 0 || blocks_z == 0) return;
  void* arguments[] = {const_cast<void*>(params)};
  check(api,
        api.cuLaunchKernel(function, blocks_x, static_cast<unsigned int>(blocks_y), static_cast<unsigned int>(blocks_z),
                           static_cast<unsigned int>(threads), 1, 1, static_cast<unsigned int>(shared_bytes), stream,
                           arguments, nullptr),
        "cuLaunchKernel");
}

// launch() for a kernel that may start before the previous grid on the stream ends (programmatic dependent
// launch, sm_90+): it waits for that grid's results itself (wait_for_prerequisites in tensor_core.cuh), so only
// its launch latency overlaps the previous grid's tail.
void launch_dependent(const DriverApi& api, CUfunction function, unsigned int blocks_x, int64_t blocks_y,
                      int threads, CUstream stream, const void* params) {
  if (blocks_x == 0 || blocks_y == 0) return;
  CUlaunchAttribute attribute{};
  attribute.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
  attribute.value.programmatic_stream_serialization_allowed = 1;
  const CUlaunchConfig config{blocks_x, static_cast<unsigned int>(blocks_y), 1, static_cast<unsigned int>(threads), 1, 1,
                              0, stream, &attribute, 1};
  void* arguments[] = {const_cast<void*>(params)};
  check(api, api.cuLaunchKernelEx(&config, function, arguments, nullptr), "cuLaunchKernelEx");
}

// What a planned CUDA call launches with: its device, the context it was planned in (current for its launches)
// and its configuration's loaded kernels.
class CudaCall : public PreparedCall {
 public:
  const char* kernel() const override { return kernels_->name.c_str(); }

 protected:
  CudaCall(const DriverApi& api, int ordinal)
      : api_(api), device_(supported_device(api, ordinal)), capability_(dispatch_capability(device_)) {
    context_ = ScopedContext(api, ordinal).context();
  }

  // Loads (compiling on first use) the configuration's kernels in the plan's context.
  template <typename Config>
  const LoadedKernels* loaded(const Config& config) const {
    const ScopedContext scope(api_, context_);
    return &loaded_kernels(api_, context_, device_, config);
  }
  template <typename Config>
  void load(const Config& config) {
    kernels_ = loaded(config);
  }

  // Whether the loaded kernels wait for their predecessor's results themselves (wait_for_prerequisites: compiled for
  // sm_90+, not as Turing's PTX), so that they may be launched before it ends.
  bool compiled_with_dependency_waits() const { return device_.compute_capability >= 90 && capability_ != 75; }

  const DriverApi& api_;
  const DeviceInfo& device_;
  const int capability_;  // what the dispatch chooses for (FLASH_ATTENTION_PLUS_PORTABLE_KERNELS: 80 or 75)
  CUcontext context_ = nullptr;
  const LoadedKernels* kernels_ = nullptr;
};

// A planned backward: the preprocess, main and conversion kernels of one configuration with the workspace
// laid out for it (the workspace's address is bound when it runs).
class BackwardCall final : public CudaCall {
 public:
  BackwardCall(const DriverApi& api, const AttentionProblem& problem)
      : CudaCall(api, problem.device_index),
        problem_(problem),
        config_(choose_backward_config(problem.features(), capability_)),
        layout_(problem, config_) {
    load(config_);
  }
  size_t workspace_size() const override { return layout_.bytes(); }

  void run(void* stream_handle, void* workspace) const override {
    const ScopedContext scope(api_, context_);
    const auto stream = static_cast<CUstream>(stream_handle);
    const AttentionProblem& p = problem_;
    const AttentionBwdParams params = backward_params(p, layout_, workspace);
    const std::vector<CUfunction>& kernels = kernels_->functions;
    // The preprocess (which also clears the dQ accumulator): 128 rows per CTA, each sequence's rows up to a
    // multiple of 128.
    const auto preprocess_blocks = static_cast<unsigned int>((p.seqlen_q + 127) / 128);
    launch(api_, kernels[1], preprocess_blocks, p.batch, p.heads_q, 128, 0, stream, &params);
    const auto key_blocks = static_cast<unsigned int>((p.seqlen_k + config_.block_n - 1) / config_.block_n);
    // The grid of backward_cta: backward_grid over key blocks or the deterministic slices; with ordered dQ
    // additions (kv heads, batch, key blocks).
    Grid grid = backward_grid(config_.window, p.deterministic ? layout_.splits : key_blocks, p.batch, p.heads_kv);
    if (layout_.order_counters > 0) grid = {p.heads_kv, p.batch, key_blocks};
    launch(api_, kernels[0], static_cast<unsigned int>(grid.x), grid.y, grid.z, config_.warps * 32, kernels_->shared_bytes, stream, &params);
    // The conversion: 64 rows of the accumulator per CTA.
    const int64_t convert_rows = 64;
    const auto convert_blocks = static_cast<unsigned int>((p.seqlen_q + convert_rows - 1) / convert_rows);
    launch(api_, kernels[2], convert_blocks, p.batch, p.heads_q, 128, 0, stream, &params);
  }

 private:
  const AttentionProblem& problem_;
  BackwardConfig config_;
  BackwardWorkspace layout_;
};

// Blocks of 16 packed rows (query rows x the query heads of a kv head) per batch entry and kv head, and the
// decode call's CTAs before any key split (one per batch entry, kv head and block).
int64_t decode_row_blocks(const AttentionProblem& p) { return (p.seqlen_q * p.group_size() + 15) / 16; }
int64_t decode_ctas(const AttentionProblem& p) { return p.batch * p.heads_kv * decode_row_blocks(p); }

// The decode / KV-cache call's launch plan: the key splits (from shapes only: batch, heads, rows, the cache's
// capacity and the device, never from device-resident lengths, so that a call is capturable in a CUDA graph) and
// the workspace: q's rotated copy, then the splits' partial outputs and LSEs.
struct DecodeLayout {
  int64_t row_blocks = 0, ctas = 0, splits = 1, split_rows = 0;
  size_t q_bytes = 0, lse_offset = 0, out_offset = 0, bytes = 0;

  DecodeLayout(const AttentionProblem& p, const DecodeConfig& config, const DeviceInfo& device) {
    row_blocks = decode_row_blocks(p);
    ctas = decode_ctas(p);
    split_rows = p.varlen ? p.total_q : p.batch * p.seqlen_q;
    const int64_t key_tiles = (p.seqlen_k + config.block_n - 1) / config.block_n;
    // At least one tile per warp in each split, and the combine kernel's bound.
    const int64_t max_splits = std::max<int64_t>(1, std::min<int64_t>(128, key_tiles / config.warps));
    if (p.num_splits > 0) {
      splits = std::min<int64_t>(p.num_splits, max_splits);
    } else {
      splits = choose_splits(device, config, max_splits);
    }
    const auto align = [](size_t size) { return (size + 255) / 256 * 256; };
    if (p.cache.rotary.half_dim > 0) q_bytes = align(static_cast<size_t>(p.batch * p.seqlen_q * p.heads_q * p.head_dim * 2));
    lse_offset = q_bytes;
    const size_t partials = splits > 1 ? static_cast<size_t>(splits * p.heads_q * split_rows) : 0;
    out_offset = lse_offset + align(partials * 4);
    bytes = out_offset + partials * static_cast<size_t>(p.head_dim) * 4;
  }

  // FlashAttention-2's rule: no split when the CTAs nearly fill the GPU (the CTAs an SM holds at once, times the
  // SMs); else the fewest splits whose last wave is at least 85 % as full as the best count's.
  int64_t choose_splits(const DeviceInfo& device, const DecodeConfig& config, int64_t max_splits) const {
    const int64_t per_sm = std::max(1, std::min(device.shared_per_multiprocessor / (config.shared_bytes() + 1024),
                                                 2048 / (config.warps * 32)));
    const double slots = static_cast<double>(per_sm * device.multiprocessors);
    if (static_cast<double>(ctas) >= 0.8 * slots) return 1;
    const auto efficiency = [&](int64_t s) {  // how full the last wave of ctas * s CTAs is
      const double waves = static_cast<double>(ctas * s) / slots;
      return waves / std::ceil(waves);
    };
    double best = 0.0;
    for (int64_t s = 1; s <= max_splits; ++s) best = std::max(best, efficiency(s));
    for (int64_t s = 1; s <= max_splits; ++s)
      if (efficiency(s) >= 0.85 * best) return s;
    return 1;
  }
};

DecodeParams decode_params(const AttentionProblem& p, bool vector) {
  DecodeParams params{};
  static_cast<AttentionParams&>(params) = attention_params(p, vector);
  params.seqused_k = p.seqused_k, params.leftpad_k = p.leftpad_k, params.cache_batch_idx = p.cache_batch_idx;
  params.block_table = p.block_table, params.block_table_stride = p.block_table_stride;
  params.k_block_stride = p.k.block_stride, params.v_block_stride = p.v.block_stride;
  params.page_size = static_cast<int>(p.page_size), params.num_blocks = static_cast<int>(p.num_blocks);
  params.max_blocks = static_cast<int>(p.max_blocks);
  params.cache_batch = static_cast<int>(p.cache_batch);
  params.capacity = static_cast<int>(p.seqlen_k);
  params.appended_keys = static_cast<int>(p.cache.rows);
  params.k_new = p.cache.k.data, params.v_new = p.cache.v.data;
  strides(p.cache.k, params.k_new_batch_stride, params.k_new_row_stride, params.k_new_head_stride);
  strides(p.cache.v, params.v_new_batch_stride, params.v_new_row_stride, params.v_new_head_stride);
  const RotaryTable& rotary = p.cache.rotary;
  params.rotary_cos = rotary.cos, params.rotary_sin = rotary.sin;
  params.cos_row_stride = rotary.cos_row_stride, params.sin_row_stride = rotary.sin_row_stride;
  params.rotary_half_dim = static_cast<int>(rotary.half_dim), params.rotary_rows = static_cast<int>(rotary.rows);
  params.rotary_interleaved = rotary.interleaved ? 1 : 0;
  params.query_positions_by_row = p.window.active() ? 1 : 0;
  return params;
}

// Whether a forward's keys are found through device-resident indices (a paged cache, used key counts, the
// KV-cache call).
bool uses_cache_indices(const AttentionProblem& p) { return p.kv_cache || p.block_table || p.seqused_k; }

// Whether such a call is a prefill chunk for the forward kernel's indexed-keys configuration: more than 64 packed
// query rows per sequence (the decode kernel would read the keys once per 16 of them), and no KV-cache append
// (whose rotated q and new keys the decode module writes first).
bool prefill_over_cache(const AttentionProblem& p) { return p.cache.rows == 0 && p.seqlen_q * p.group_size() > 64; }

// Whether a cached call's rows may be copied 16 bytes at a time: every row the kernels read aligned (with rotary,
// q is the workspace's aligned copy; a paged cache's blocks too).
bool cache_vector_loads(const AttentionProblem& p) {
  const bool blocks_aligned = !p.block_table || (p.k.block_stride % 8 == 0 && p.v.block_stride % 8 == 0);
  return blocks_aligned && (p.cache.rotary.half_dim > 0 ? vector_loads(p, {&p.k, &p.v})
                                                        : vector_loads(p, {&p.q, &p.k, &p.v}));
}

// A planned forward: its kernel loaded, its argument block and grid computed; running launches once. Calls whose
// keys go through cache indices (prefill chunks) run the mma.sync kernel's indexed-keys configuration, whose
// argument block is the whole DecodeParams; the others take its AttentionParams part.
class ForwardCall final : public CudaCall {
 public:
  ForwardCall(const DriverApi& api, const AttentionProblem& problem)
      : CudaCall(api, problem.device_index), indexed_(uses_cache_indices(problem)) {
    const ForwardConfig config =
        indexed_ ? choose_indexed_forward_config(problem.features(), capability_)
                 : with_forward_schedule(choose_forward_config(problem.features(), capability_), problem.seqlen_q);
    load(config);
    params_ = decode_params(problem, indexed_ ? cache_vector_loads(problem)
                                              : vector_loads(problem, {&problem.q, &problem.k, &problem.v}));
    const int64_t row_blocks = (problem.seqlen_q + config.block_m - 1) / config.block_m;
    batch_ = problem.batch, heads_ = problem.heads_q, threads_ = config.warps * 32;
    grid_ = forward_grid(config.window, row_blocks, batch_, heads_);
    if (config.persistent) {  // at most one CTA per SM, each taking the row blocks in turn
      const int64_t items = row_blocks * batch_ * heads_;
      grid_ = {std::min<int64_t>(items, device_.multiprocessors), 1, 1};
    }
    if (problem.probs.data) {  // S_dmask, written by its own kernel after the forward (never with indexed keys)
      probs_kernels_ = loaded(choose_probs_config(problem.features(), capability_));
      static_cast<AttentionParams&>(probs_params_) = params_;
      const ProbsView& probs = problem.probs;
      probs_params_.probs = probs.data;
      probs_params_.probs_batch_stride = probs.batch_stride, probs_params_.probs_head_stride = probs.head_stride;
      probs_params_.probs_row_stride = probs.row_stride, probs_params_.probs_col_stride = probs.col_stride;
      probs_params_.probs_rows = static_cast<int>(probs.rows), probs_params_.probs_cols = static_cast<int>(probs.cols);
    }
  }
  size_t workspace_size() const override { return 0; }
  void run(void* stream, void*) const override {
    const ScopedContext scope(api_, context_);
    const void* params = indexed_ ? static_cast<const void*>(&params_) : static_cast<const AttentionParams*>(&params_);
    launch(api_, kernels_->functions[0], static_cast<unsigned int>(grid_.x), grid_.y, grid_.z, threads_, kernels_->shared_bytes,
           static_cast<CUstream>(stream), params);
    if (probs_kernels_) {
      const auto rows = static_cast<unsigned int>((probs_params_.probs_rows + ProbsConfig::kWarps - 1) /
                                                  ProbsConfig::kWarps);
      launch(api_, probs_kernels_->functions[0], rows, batch_, heads_, ProbsConfig::kWarps * 32, 0,
             static_cast<CUstream>(stream), &probs_params_);
    }
  }

 private:
  bool indexed_;
  DecodeParams params_{};
  Grid grid_{};
  int64_t batch_ = 0, heads_ = 0;
  int threads_ = 0;
  const LoadedKernels* probs_kernels_ = nullptr;
  AttentionProbsParams probs_params_{};
};

// A planned decode / KV-cache call: the append (KV-cache calls with new keys), the attention over the key
// splits, and their combine when there is more than one.
class DecodeCall final : public CudaCall {
 public:
  DecodeCall(const DriverApi& api, const AttentionProblem& problem)
      : CudaCall(api, problem.device_index),
        problem_(problem),
        config_(choose_decode_config(problem.features(), device_.compute_capability, decode_ctas(problem),
                                     device_.multiprocessors)),
        layout_(problem, config_, device_) {
    load(config_);
    params_ = decode_params(problem, cache_vector_loads(problem));
    params_.splits = static_cast<int>(layout_.splits), params_.split_rows = static_cast<int>(layout_.split_rows);
  }
  size_t workspace_size() const override { return layout_.bytes; }

  void run(void* stream_handle, void* workspace) const override {
    const ScopedContext scope(api_, context_);
    const auto stream = static_cast<CUstream>(stream_handle);
    const AttentionProblem& p = problem_;
    const std::vector<CUfunction>& kernels = kernels_->functions;
    char* base = static_cast<char*>(workspace);
    DecodeParams params = params_;
    params.partial_lse = reinterpret_cast<float*>(base + layout_.lse_offset);
    params.partial_out = reinterpret_cast<float*>(base + layout_.out_offset);
    const bool rotary = p.cache.rotary.half_dim > 0;
    if (p.cache.rows > 0) {
      params.q_rotated = base;
      const int64_t blocks = p.batch * p.cache.rows + (rotary ? p.batch * p.seqlen_q : 0);
      launch(api_, kernels[2], static_cast<unsigned int>(blocks), 1, 1, 128, 0, stream, &params);
    }
    if (rotary) {  // the attention reads the rotated copy
      params.q = base;
      params.q_row_stride = p.heads_q * p.head_dim;
      params.q_batch_stride = p.seqlen_q * params.q_row_stride;
      params.q_head_stride = p.head_dim;
    }
    launch(api_, kernels[0], static_cast<unsigned int>(layout_.splits), p.batch * p.heads_kv, layout_.row_blocks,
           config_.warps * 32, kernels_->shared_bytes, stream, &params);
    if (layout_.splits > 1) {
      if (compiled_with_dependency_waits()) {
        launch_dependent(api_, kernels[1], static_cast<unsigned int>(layout_.split_rows), p.heads_q, 128, stream, &params);
      } else {
        launch(api_, kernels[1], static_cast<unsigned int>(layout_.split_rows), p.heads_q, 1, 128, 0, stream, &params);
      }
    }
  }

 private:
  const AttentionProblem& problem_;
  DecodeConfig config_;
  DecodeLayout layout_;
  DecodeParams params_{};
};

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
    if (uses_cache_indices(problem) && problem.probs.data) {
      return "attn_probs with block_table or seqused_k (a paged KV cache, used key counts) is not implemented on CUDA";
    }
    if (uses_cache_indices(problem) && problem.dropout_p > 0.0f) {
      return "dropout_p with block_table or seqused_k (a paged KV cache, used key counts) is not implemented on CUDA";
    }
    return {};
  }

  std::unique_ptr<PreparedCall> prepare(const AttentionProblem& problem) const override {
    const DriverApi& api = loaded_driver();
    if (problem.direction == Direction::kForward && uses_cache_indices(problem) && !prefill_over_cache(problem)) {
      return std::make_unique<DecodeCall>(api, problem);
    }
    if (problem.direction == Direction::kForward) return std::make_unique<ForwardCall>(api, problem);
    return std::make_unique<BackwardCall>(api, problem);
  }

  std::vector<int32_t> read_int32(const fap_tensor& tensor) const override {
    const DriverApi& api = loaded_driver();
    const ScopedContext scope(api, tensor.device_index);
    std::vector<int32_t> values(static_cast<size_t>(tensor.shape[0]));
    // Whatever stream wrote the values, its work is done once the context is idle.
    check(api, api.cuCtxSynchronize(), "cuCtxSynchronize");
    check(api,
          api.cuMemcpyDtoH(values.data(), reinterpret_cast<CUdeviceptr>(tensor.data), values.size() * sizeof(int32_t)),
          "cuMemcpyDtoH");
    return values;
  }

  void precompile(const KernelFeatures& features, int32_t device_index) const override {
    const DriverApi& api = loaded_driver();
    int devices = 0;
    check(api, api.cuDeviceGetCount(&devices), "cuDeviceGetCount");
    require(device_index < devices, "device_index: expected a CUDA device ordinal below ", devices, ", got ",
            device_index);
    const ScopedContext scope(api, device_index);
    const DeviceInfo& device = supported_device(api, device_index);
    const int capability = dispatch_capability(device);
    if (features.direction == Direction::kForward) {
      // Both schedules of the sm_90 kernel (with_forward_schedule): which one a call takes depends on its length.
      const ForwardConfig config = choose_forward_config(features, capability);
      loaded_kernels(api, scope.context(), device, config);
      const ForwardConfig short_calls = with_forward_schedule(config, 1);
      if (short_calls.persistent) loaded_kernels(api, scope.context(), device, short_calls);
    } else {
      loaded_kernels(api, scope.context(), device, choose_backward_config(features, capability));
    }
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
