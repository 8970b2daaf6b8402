// libFuzzer over the C API's argument structs: the input bytes choose an entry point (forward dense or varlen,
// the KV-cache call, backward dense or varlen, their workspace queries and plans) and every field of its
// arguments and options: shapes, strides, dtypes, devices, index contents, lengths, window, scale, softcap, ALiBi,
// dropout. A call must either fail with a status or run, never crash or touch memory it was not given (built
// with ASan and UBSan).
//
// The harness keeps the C API's contract so that a report is the library's fault: a tensor whose shape and
// strides address a small span gets real memory covering that span; any other view gets a NULL pointer (which
// the library must refuse whenever the view holds elements). Only host memory is used (device type CPU or an
// invalid value): a CUDA view of host memory would break the contract.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "flash_attn_plus/flash_attn_plus.h"

namespace {

constexpr int64_t kMaxSpanElements = 1 << 14;  // the largest view given real memory
constexpr size_t kMaxWorkspaceBytes = size_t{64} << 20;

// The input as a stream of values; past its end every value is 0 (the plain choice).
class Input {
 public:
  Input(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  template <typename T>
  T take() {
    T value{};
    const size_t n = std::min(sizeof(T), size_ - std::min(size_, position_));
    if (n) std::memcpy(&value, data_ + position_, n);
    position_ += sizeof(T);
    return value;
  }
  // Mostly a small value in [0, limit), sometimes any 64-bit value (the edges: negative, huge, overflowing).
  int64_t dimension(int64_t limit) {
    const uint8_t choice = take<uint8_t>();
    if (choice < 240) return choice % limit;
    return take<int64_t>();
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t position_ = 0;
};

// Shapes derived from wild values wrap around rather than overflow (the library gets whatever comes out).
int64_t add(int64_t a, int64_t b) { return static_cast<int64_t>(static_cast<uint64_t>(a) + static_cast<uint64_t>(b)); }
int64_t mul(int64_t a, int64_t b) { return static_cast<int64_t>(static_cast<uint64_t>(a) * static_cast<uint64_t>(b)); }

int64_t element_bytes(int32_t dtype) { return dtype == FAP_DTYPE_FLOAT32 || dtype == FAP_DTYPE_INT32 ? 4 : 2; }

// The number of elements a view addresses (max offset + 1), or -1 when it is not small and non-negative.
int64_t span_of(const fap_tensor& t) {
  int64_t span = 1;
  for (int i = 0; i < t.rank; ++i) {
    if (t.shape[i] < 0 || t.strides[i] < 0 || t.shape[i] > kMaxSpanElements || t.strides[i] > kMaxSpanElements)
      return -1;
    if (t.shape[i] == 0) return 0;
    span += (t.shape[i] - 1) * t.strides[i];
    if (span > kMaxSpanElements) return -1;
  }
  return span;
}

// Owns the memory behind the views of one call.
class Arena {
 public:
  // A tensor of this rank with shape dims drawn from the input (defaults given), contiguous strides unless the
  // input says otherwise, and contents from the input (int32 indices) or a fixed pattern (floating point).
  fap_tensor tensor(Input& in, int32_t rank, int32_t dtype, const std::vector<int64_t>& plain_shape) {
    fap_tensor t{};
    const uint8_t flags = in.take<uint8_t>();
    t.rank = flags & 0x80 ? in.take<int32_t>() % 6 : rank;  // a wrong rank now and then
    t.dtype = flags & 0x40 ? in.take<uint8_t>() % 5 : dtype;
    t.device_type = flags & 0x20 ? (in.take<uint8_t>() % 2 ? 2 : -1) : FAP_DEVICE_CPU;
    if (t.rank < 0 || t.rank > FAP_MAX_RANK) {
      t.rank = rank;
    }
    for (int i = 0; i < t.rank; ++i) {
      const int64_t plain = i < static_cast<int>(plain_shape.size()) ? plain_shape[i] : 1;
      t.shape[i] = flags & 0x10 ? in.dimension(9) : plain;
    }
    int64_t stride = 1;
    for (int i = t.rank - 1; i >= 0; --i) {
      t.strides[i] = stride;
      stride = mul(stride, t.shape[i] > 0 ? t.shape[i] : 1);
    }
    if (flags & 0x08) t.strides[in.take<uint8_t>() % (t.rank ? t.rank : 1)] = in.dimension(40);
    const int64_t span = span_of(t);
    if (flags & 0x04 || span < 0) return t;  // absent or unaddressable: NULL data
    const int64_t bytes = (span > 0 ? span : 1) * element_bytes(t.dtype);
    buffers_.push_back(std::make_unique<int64_t[]>(static_cast<size_t>((bytes + 7) / 8)));
    auto* memory = reinterpret_cast<uint8_t*>(buffers_.back().get());
    if (t.dtype == FAP_DTYPE_INT32) {
      for (int64_t i = 0; i < span; ++i) {
        const int32_t value = static_cast<int32_t>(in.dimension(12));
        std::memcpy(memory + 4 * i, &value, 4);
      }
    } else {
      for (int64_t i = 0; i < bytes; ++i) memory[i] = static_cast<uint8_t>(0x3c ^ (i * 37));  // finite values
    }
    t.data = memory;
    return t;
  }

  // Sequence offsets for `batch` sequences of small lengths (or, when the input says so, arbitrary ones).
  fap_tensor offsets(Input& in, int64_t batch, int64_t* total) {
    fap_tensor t = tensor(in, 1, FAP_DTYPE_INT32, {add(batch, 1)});
    if (t.data && t.dtype == FAP_DTYPE_INT32 && t.rank == 1 && t.shape[0] >= 1 && t.strides[0] == 1 &&
        !(in.take<uint8_t>() & 1)) {
      auto* values = static_cast<int32_t*>(t.data);
      values[0] = 0;
      for (int64_t b = 1; b < t.shape[0]; ++b) values[b] = values[b - 1] + static_cast<int32_t>(in.take<uint8_t>() % 6);
      *total = values[t.shape[0] - 1];
    }
    return t;
  }

  void* workspace(size_t bytes) {
    buffers_.push_back(std::make_unique<int64_t[]>(bytes / 8 + 2));
    return buffers_.back().get();
  }

 private:
  std::vector<std::unique_ptr<int64_t[]>> buffers_;
};

fap_options options_from(Input& in, Arena& arena, int64_t batch, int64_t heads) {
  fap_options options = fap_default_options();
  const uint8_t flags = in.take<uint8_t>();
  options.causal = flags & 1;
  if (flags & 2) options.window_size_left = static_cast<int32_t>(in.dimension(12)) - 1;
  if (flags & 4) options.window_size_right = static_cast<int32_t>(in.dimension(12)) - 1;
  if (flags & 8) options.softcap = in.take<float>();
  if (flags & 16) options.softmax_scale = in.take<float>();
  if (flags & 32) options.dropout_p = in.take<float>(), options.dropout_seed = in.take<uint64_t>();
  if (flags & 64) options.alibi_slopes = arena.tensor(in, in.take<uint8_t>() & 1 ? 2 : 1, FAP_DTYPE_FLOAT32,
                                                      {batch, heads});
  options.deterministic = flags >> 7;
  return options;
}

// A call's sizes: mostly small, sometimes wild; the rows of varlen calls come from their offsets.
struct Sizes {
  int64_t batch, heads_k, heads, head_dim, len_q, len_k, total_q, total_k;
  int32_t dtype;

  Sizes(Input& in)
      : batch(add(1, in.dimension(3))),
        heads_k(add(1, in.dimension(2))),
        heads(mul(heads_k, add(1, in.dimension(2)))),
        head_dim(add(1, in.dimension(40))),
        len_q(add(1, in.dimension(8))),
        len_k(add(1, in.dimension(8))),
        total_q(mul(batch, len_q)),
        total_k(mul(batch, len_k)),
        dtype(static_cast<int32_t>(in.take<uint8_t>() % 3)) {}

  // cu_seqlens and max_seqlen of a varlen call (fap_fwd_args or fap_bwd_args).
  template <typename Args>
  void varlen(Input& in, Arena& arena, Args& args) {
    args.cu_seqlens_q = arena.offsets(in, batch, &total_q);
    args.cu_seqlens_k = arena.offsets(in, batch, &total_k);
    args.max_seqlen_q = in.take<uint8_t>() & 1 ? in.take<int64_t>() : total_q;
    args.max_seqlen_k = in.take<uint8_t>() & 1 ? in.take<int64_t>() : total_k;
  }
};

void run_forward(Input& in, Arena& arena, bool varlen, bool kv_cache, bool plan) {
  Sizes sizes(in);
  const auto& [batch, heads_k, heads, head_dim, len_q, len_k, total_q, total_k, dtype] = sizes;
  fap_fwd_args args{};
  if (varlen) {
    sizes.varlen(in, arena, args);
    args.q = arena.tensor(in, 3, dtype, {total_q, heads, head_dim});
    args.k = arena.tensor(in, 3, dtype, {total_k, heads_k, head_dim});
    args.v = arena.tensor(in, 3, dtype, {total_k, heads_k, head_dim});
    args.out = arena.tensor(in, 3, dtype, {total_q, heads, head_dim});
    args.softmax_lse = arena.tensor(in, 2, FAP_DTYPE_FLOAT32, {heads, total_q});
    if (in.take<uint8_t>() & 1) args.seqused_k = arena.tensor(in, 1, FAP_DTYPE_INT32, {batch});
  } else {
    args.q = arena.tensor(in, 4, dtype, {batch, len_q, heads, head_dim});
    args.k = arena.tensor(in, 4, dtype, {batch, len_k, heads_k, head_dim});
    args.v = arena.tensor(in, 4, dtype, {batch, len_k, heads_k, head_dim});
    args.out = arena.tensor(in, 4, dtype, {batch, len_q, heads, head_dim});
    args.softmax_lse = arena.tensor(in, 3, FAP_DTYPE_FLOAT32, {batch, heads, len_q});
    if (in.take<uint8_t>() & 1) args.attn_probs = arena.tensor(in, 4, dtype, {batch, heads, len_q, len_k});
    if (kv_cache) {
      args.cache_seqlens = arena.tensor(in, 1, FAP_DTYPE_INT32, {batch});
      const uint8_t extras = in.take<uint8_t>();
      if (extras & 1) args.cache_batch_idx = arena.tensor(in, 1, FAP_DTYPE_INT32, {batch});
      if (extras & 2) args.leftpad_k = arena.tensor(in, 1, FAP_DTYPE_INT32, {batch});
      if (extras & 4) {
        args.k_new = arena.tensor(in, 4, dtype, {batch, add(1, in.dimension(3)), heads_k, head_dim});
        args.v_new = arena.tensor(in, 4, dtype, {batch, args.k_new.shape[1], heads_k, head_dim});
      }
      if (extras & 8) {
        args.rotary_cos = arena.tensor(in, 2, dtype, {add(len_k, 4), head_dim / 2});
        args.rotary_sin = arena.tensor(in, 2, dtype, {add(len_k, 4), args.rotary_cos.shape[1]});
        args.rotary_interleaved = extras >> 7;
      }
      args.num_splits = in.take<int8_t>();
    }
  }
  if (varlen && in.take<uint8_t>() & 1) {
    const int64_t page = add(1, in.dimension(8)), blocks = add(1, in.dimension(8));
    args.k = arena.tensor(in, 4, dtype, {blocks, page, heads_k, head_dim});
    args.v = arena.tensor(in, 4, dtype, {blocks, page, heads_k, head_dim});
    args.block_table = arena.tensor(in, 2, FAP_DTYPE_INT32, {batch, add(1, in.dimension(6))});
  }
  const fap_options options = options_from(in, arena, batch, heads);
  if (plan) {
    fap_plan* made = nullptr;
    if (fap_plan_fwd(&args, &options, varlen, &made) != FAP_SUCCESS) return;
    size_t bytes = 0;
    if (fap_plan_workspace_size(made, &bytes) == FAP_SUCCESS && bytes <= kMaxWorkspaceBytes) {
      fap_plan_run(made, nullptr, arena.workspace(bytes), bytes);
    }
    fap_plan_destroy(made);
    return;
  }
  size_t bytes = 0;
  const auto size = varlen ? fap_mha_varlen_fwd_workspace_size : fap_mha_fwd_workspace_size;
  if (size(&args, &options, &bytes) != FAP_SUCCESS || bytes > kMaxWorkspaceBytes) return;
  (varlen ? fap_mha_varlen_fwd : fap_mha_fwd)(&args, &options, nullptr, arena.workspace(bytes), bytes);
}

void run_backward(Input& in, Arena& arena, bool varlen) {
  Sizes sizes(in);
  const auto& [batch, heads_k, heads, head_dim, len_q, len_k, total_q, total_k, dtype] = sizes;
  fap_bwd_args args{};
  std::vector<int64_t> q_shape{batch, len_q, heads, head_dim}, k_shape{batch, len_k, heads_k, head_dim};
  std::vector<int64_t> lse_shape{batch, heads, len_q};
  if (varlen) {
    sizes.varlen(in, arena, args);
    q_shape = {total_q, heads, head_dim}, k_shape = {total_k, heads_k, head_dim}, lse_shape = {heads, total_q};
  }
  const int32_t rank = varlen ? 3 : 4;
  args.q = arena.tensor(in, rank, dtype, q_shape);
  args.k = arena.tensor(in, rank, dtype, k_shape);
  args.v = arena.tensor(in, rank, dtype, k_shape);
  args.out = arena.tensor(in, rank, dtype, q_shape);
  args.dout = arena.tensor(in, rank, dtype, q_shape);
  args.softmax_lse = arena.tensor(in, varlen ? 2 : 3, FAP_DTYPE_FLOAT32, lse_shape);
  args.dq = arena.tensor(in, rank, dtype, q_shape);
  args.dk = arena.tensor(in, rank, dtype, k_shape);
  args.dv = arena.tensor(in, rank, dtype, k_shape);
  const fap_options options = options_from(in, arena, batch, heads);
  size_t bytes = 0;
  const auto size = varlen ? fap_mha_varlen_bwd_workspace_size : fap_mha_bwd_workspace_size;
  if (size(&args, &options, &bytes) != FAP_SUCCESS || bytes > kMaxWorkspaceBytes) return;
  (varlen ? fap_mha_varlen_bwd : fap_mha_bwd)(&args, &options, nullptr, arena.workspace(bytes), bytes);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Input in(data, size);
  Arena arena;
  switch (in.take<uint8_t>() % 6) {
    case 0: run_forward(in, arena, false, false, false); break;
    case 1: run_forward(in, arena, true, false, false); break;
    case 2: run_forward(in, arena, false, true, false); break;
    case 3: run_forward(in, arena, in.take<uint8_t>() & 1, false, true); break;
    case 4: run_backward(in, arena, false); break;
    default: run_backward(in, arena, true); break;
  }
  return 0;
}
