#include "core/validate.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <ostream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/backend.h"
#include "core/error.h"

namespace fap {
namespace {

constexpr int64_t kMaxHeadDim = 256;
// Batch and heads are grid dimensions of FlashAttention-2's kernels (and of this library's CUDA kernels), which
// CUDA caps at 65535. The bound also keeps the work of calls without rows (which loop over batch and heads)
// small.
constexpr int64_t kMaxGridDimension = 65535;
// Element offsets are computed in int64; keep every addressable extent far from overflow.
constexpr int64_t kMaxExtent = int64_t{1} << 48;

// Message parts that format themselves only when a check fails (require() evaluates its parts on every call,
// and building strings for each tensor of every call costs microseconds of host time).
struct ShapeText {
  const fap_tensor& tensor;
};
std::ostream& operator<<(std::ostream& stream, const ShapeText& text) {
  stream << "(";
  for (int i = 0; i < text.tensor.rank; ++i) stream << (i ? ", " : "") << text.tensor.shape[i];
  return stream << ")";
}
ShapeText describe_shape(const fap_tensor& t) { return {t}; }

struct DeviceText {
  int32_t type, index;
};
std::ostream& operator<<(std::ostream& stream, const DeviceText& device) {
  return device.type == FAP_DEVICE_CPU ? stream << "cpu" : stream << "cuda:" << device.index;
}
DeviceText device_name(int32_t type, int32_t index) { return {type, index}; }

// "rank N", or "an absent tensor".
struct RankText {
  const fap_tensor& tensor;
};

bool is_present(const fap_tensor& t) { return t.data != nullptr || t.rank != 0; }

std::ostream& operator<<(std::ostream& stream, const RankText& text) {
  return is_present(text.tensor) ? stream << "rank " << text.tensor.rank : stream << "an absent tensor";
}

// The product of the shape, or -1 past kMaxExtent (stride-0 dimensions can make a count that no int64 holds
// out of dimensions that each pass).
int64_t element_count(const fap_tensor& t) {
  int64_t count = 1;
  for (int i = 0; i < t.rank; ++i) {
    if (t.shape[i] == 0) return 0;
  }
  for (int i = 0; i < t.rank; ++i) {
    if (__builtin_mul_overflow(count, t.shape[i], &count) || count > kMaxExtent) return -1;
  }
  return count;
}

// Checks rank, dims (-1 = any, checked by the caller), non-negative sizes and strides, overflow-free
// addressing, and a unit-stride last dimension when asked for.
void check_layout(const fap_tensor& t, const char* name, int rank, const char* layout,
                  const std::vector<int64_t>& expected, bool unit_last_stride) {
  require(t.rank == rank, name, ": expected a rank-", rank, " tensor ", layout, ", got rank ", t.rank);
  int64_t extent = 0;
  for (int i = 0; i < rank; ++i) {
    require(t.shape[i] >= 0, name, ": shape[", i, "] must be >= 0, got ", t.shape[i]);
    require(t.strides[i] >= 0, name, ": strides[", i, "] must be >= 0, got ", t.strides[i]);
    require(t.shape[i] <= kMaxExtent && t.strides[i] <= kMaxExtent, name, ": shape[", i, "] = ", t.shape[i],
            " with stride ", t.strides[i], " is too large to address");
    if (t.shape[i] > 0) {
      int64_t span = 0;
      require(!__builtin_mul_overflow(t.shape[i] - 1, t.strides[i], &span) &&
                  !__builtin_add_overflow(extent, span, &extent) && extent <= kMaxExtent,
              name, ": shape ", describe_shape(t), " with its strides spans more elements than can be addressed");
    }
  }
  for (int i = 0; i < rank; ++i) {
    if (i < static_cast<int>(expected.size()) && expected[i] >= 0) {
      require(t.shape[i] == expected[i], name, ": expected shape ", layout, " with dimension ", i, " = ",
              expected[i], ", got shape ", describe_shape(t));
    }
  }
  if (unit_last_stride && rank > 0 && t.shape[rank - 1] > 1) {
    require(t.strides[rank - 1] == 1, name, ": the last dimension must be contiguous (stride 1), got stride ",
            t.strides[rank - 1]);
  }
  const int64_t elements = element_count(t);
  require(elements >= 0, name, ": shape ", describe_shape(t), " has more than 2^48 elements");
  require(t.data != nullptr || elements == 0, name, ": data is NULL but the tensor has ", elements, " elements");
}

// An output of the call: unless empty, no dimension of more than one element with stride 0 (PyTorch's expand()
// makes such views), whose writes would overlap: results undefined, and work that grows with a shape no memory
// backs.
void check_writable(const fap_tensor& t, const char* name) {
  if (element_count(t) == 0) return;  // nothing is written
  for (int i = 0; i < t.rank; ++i) {
    require(t.shape[i] <= 1 || t.strides[i] != 0, name, ": an output must not overlap itself, got stride 0 for "
            "dimension ", i, " of shape ", describe_shape(t));
  }
}

void check_dtype(const fap_tensor& t, const char* name, int32_t expected) {
  require(t.dtype == expected, name, ": expected dtype ", dtype_name(expected), ", got ", dtype_name(t.dtype));
}

void check_same_device(const fap_tensor& t, const char* name, const fap_tensor& q) {
  require(t.device_type == FAP_DEVICE_CPU || t.device_type == FAP_DEVICE_CUDA, name,
          ": unknown device type ", t.device_type);
  require(t.device_type == q.device_type && (t.device_type == FAP_DEVICE_CPU || t.device_index == q.device_index),
          name, ": expected a tensor on ", device_name(q.device_type, q.device_index), " like q, got ",
          device_name(t.device_type, t.device_index));
}

void check_known_dtype(const fap_tensor& t, const char* name) {
  const bool known = t.dtype == FAP_DTYPE_FLOAT16 || t.dtype == FAP_DTYPE_BFLOAT16 ||
                     t.dtype == FAP_DTYPE_FLOAT32 || t.dtype == FAP_DTYPE_INT32;
  require(known, name, ": expected a dtype of fap_dtype (float16, bfloat16, float32, int32), got unknown code ", t.dtype);
}

Operand make_operand(const fap_tensor& t, bool varlen) {
  Operand operand;
  operand.data = t.data;
  if (varlen) {
    operand.row_stride = t.strides[0];
    operand.head_stride = t.strides[1];
  } else {
    operand.batch_stride = t.strides[0];
    operand.row_stride = t.strides[1];
    operand.head_stride = t.strides[2];
  }
  return operand;
}

// The shape of one (batch, seqlen, heads, head_dim) or (total, heads, head_dim) operand.
struct OperandShape {
  int64_t batch, rows, heads, head_dim;
};

// A tensor's dtype (a known code, then the expected one), device (q's) and alignment: every backend loads whole
// elements, and a pointer inside one would be undefined behaviour on the host and a fault on the GPU.
void check_dtype_and_device(const fap_tensor& t, const char* name, int32_t dtype, const fap_tensor& q) {
  check_known_dtype(t, name);
  check_dtype(t, name, dtype);
  check_same_device(t, name, q);
  const int64_t bytes = dtype_bytes(t.dtype);
  require(reinterpret_cast<std::uintptr_t>(t.data) % static_cast<std::uintptr_t>(bytes) == 0, name, ": data pointer ", t.data,
          " is not aligned to its ", bytes, "-byte elements");
}

void check_operand(const fap_tensor& t, const char* name, bool varlen, const OperandShape& shape,
                   const fap_tensor& q) {
  if (varlen) {
    check_layout(t, name, 3, "(total, heads, head_dim)", {shape.rows, shape.heads, shape.head_dim}, true);
  } else {
    check_layout(t, name, 4, "(batch, seqlen, heads, head_dim)", {shape.batch, shape.rows, shape.heads,
                                                                  shape.head_dim},
                 true);
  }
  check_dtype_and_device(t, name, q.dtype, q);
}

// The values of an index tensor on the host: its own memory on the CPU; a copy of device memory with the index
// checks on (fap_set_index_checks: a synchronisation per call); else nullptr (unchecked here: the device kernels
// clamp every index they read).
const int32_t* host_indices(const fap_tensor& tensor, std::vector<int32_t>& copy) {
  if (tensor.device_type == FAP_DEVICE_CPU) return static_cast<const int32_t*>(tensor.data);
  if (!index_checks()) return nullptr;
  copy = resolve_backend(static_cast<fap_device_type>(tensor.device_type)).read_int32(tensor);
  return copy.data();
}

void check_cu_seqlens(const fap_tensor& cu, const char* name, int64_t batch, int64_t total, int64_t max_seqlen,
                      const char* max_name, const fap_tensor& q) {
  require(is_present(cu), name, ": required for varlen attention, got an absent tensor");
  check_layout(cu, name, 1, "(batch + 1)", {batch + 1}, true);
  check_dtype_and_device(cu, name, FAP_DTYPE_INT32, q);
  std::vector<int32_t> copy;
  const int32_t* values = host_indices(cu, copy);
  if (!values) return;
  require(values[0] == 0, name, "[0]: expected 0, got ", values[0]);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t length = int64_t{values[b + 1]} - values[b];
    require(length >= 0, name, ": expected non-decreasing offsets, got ", name, "[", b + 1, "] = ", values[b + 1],
            " < ", name, "[", b, "] = ", values[b]);
    require(length <= max_seqlen, name, ": sequence ", b, " has length ", length, ", more than ", max_name, " = ",
            max_seqlen);
  }
  require(values[batch] <= total, name, "[", batch, "] = ", values[batch], " exceeds the ", total,
          " rows of the tensor");
}

void check_options(const fap_options& options, const fap_tensor& q, int64_t batch, int64_t heads_q,
                   AttentionProblem& problem) {
  require(!std::isinf(options.softmax_scale), "softmax_scale: expected a finite value, got ", options.softmax_scale);
  require(std::isfinite(options.softcap) && options.softcap >= 0.0f,
          "softcap: expected a finite value >= 0 (0 disables), got ", options.softcap);
  require(std::isfinite(options.dropout_p) && options.dropout_p >= 0.0f && options.dropout_p < 1.0f,
          "dropout_p: expected a value in [0, 1), got ", options.dropout_p);
  problem.softmax_scale = std::isnan(options.softmax_scale)
                              ? static_cast<float>(1.0 / std::sqrt(static_cast<double>(problem.head_dim)))
                              : options.softmax_scale;
  problem.softcap = options.softcap;
  problem.dropout_p = options.dropout_p;
  problem.dropout_seed = options.dropout_seed;
  problem.dropout_offset = options.dropout_offset;
  problem.deterministic = options.deterministic != 0;
  problem.window = normalize_window(options.window_size_left, options.window_size_right, options.causal != 0,
                                    problem.seqlen_k);

  const fap_tensor& alibi = options.alibi_slopes;
  if (!is_present(alibi)) return;
  const char* name = "alibi_slopes";
  require(alibi.rank == 1 || alibi.rank == 2, name, ": expected shape (heads) or (batch, heads), got rank ",
          alibi.rank);
  if (alibi.rank == 1) {
    check_layout(alibi, name, 1, "(heads)", {heads_q}, true);
  } else {
    check_layout(alibi, name, 2, "(batch, heads)", {batch, heads_q}, true);
  }
  check_dtype_and_device(alibi, name, FAP_DTYPE_FLOAT32, q);
  problem.alibi_slopes = static_cast<const float*>(alibi.data);
  problem.alibi_batch_stride = alibi.rank == 2 ? alibi.strides[0] : 0;
}

void check_lse(const fap_tensor& lse, const char* name, AttentionProblem& problem, const fap_tensor& q) {
  if (problem.varlen) {
    check_layout(lse, name, 2, "(heads, total_q)", {problem.heads_q, problem.total_q}, false);
    problem.lse = {static_cast<float*>(lse.data), 0, lse.strides[0], lse.strides[1]};
  } else {
    check_layout(lse, name, 3, "(batch, heads, seqlen_q)", {problem.batch, problem.heads_q, problem.seqlen_q},
                 false);
    problem.lse = {static_cast<float*>(lse.data), lse.strides[0], lse.strides[1], lse.strides[2]};
  }
  check_dtype_and_device(lse, name, FAP_DTYPE_FLOAT32, q);
}

void check_probs(const fap_tensor& probs, AttentionProblem& problem, const fap_tensor& q) {
  const char* name = "attn_probs";
  check_layout(probs, name, 4, "(batch, heads, >= seqlen_q, >= seqlen_k)", {problem.batch, problem.heads_q}, false);
  require(probs.shape[2] >= problem.seqlen_q && probs.shape[3] >= problem.seqlen_k, name,
          ": expected at least ", problem.seqlen_q, " rows and ", problem.seqlen_k, " columns, got shape ",
          describe_shape(probs));
  check_dtype_and_device(probs, name, q.dtype, q);
  problem.probs = {probs.data,       probs.shape[2],   probs.shape[3],   probs.strides[0],
                   probs.strides[1], probs.strides[2], probs.strides[3]};
}

// Sequence b's keys in cu_seqlens_k (before seqused_k), read on the host.
int64_t cu_length(const AttentionProblem& p, int64_t b) { return int64_t{p.cu_seqlens_k[b + 1]} - p.cu_seqlens_k[b]; }

// The paged cache's table (its layout; the indices are checked with the sequences' key counts, in
// check_host_indices).
void check_block_table(const fap_tensor& table, AttentionProblem& problem, int64_t num_blocks, const fap_tensor& q) {
  const char* name = "block_table";
  check_layout(table, name, 2, "(batch, max_blocks)", {problem.batch, -1}, true);
  check_dtype_and_device(table, name, FAP_DTYPE_INT32, q);
  problem.block_table = static_cast<const int32_t*>(table.data);
  problem.block_table_stride = table.strides[0];
  problem.num_blocks = num_blocks;
  problem.max_blocks = table.shape[1];
}

void check_seqused_k(const fap_tensor& seqused, AttentionProblem& problem, int64_t max_seqlen_k, const fap_tensor& q) {
  const char* name = "seqused_k";
  require(problem.varlen, name, ": only varlen calls take it; this dense call got it");
  check_layout(seqused, name, 1, "(batch)", {problem.batch}, true);
  check_dtype_and_device(seqused, name, FAP_DTYPE_INT32, q);
  problem.seqused_k = static_cast<const int32_t*>(seqused.data);
  if (seqused.device_type != FAP_DEVICE_CPU) return;
  for (int64_t b = 0; b < problem.batch; ++b) {
    const int64_t used = problem.seqused_k[b];
    require(used >= 0 && used <= cu_length(problem, b) && used <= max_seqlen_k, name, "[", b, "] = ", used,
            ": expected a key count in [0, ", std::min(cu_length(problem, b), max_seqlen_k),
            "] (the sequence's keys in cu_seqlens_k, at most max_seqlen_k)");
  }
}

// An optional int32 (batch) index tensor of the KV-cache call.
const int32_t* check_batch_indices(const fap_tensor& t, const char* name, const AttentionProblem& problem,
                                   const fap_tensor& q) {
  if (!is_present(t)) return nullptr;
  check_layout(t, name, 1, "(batch)", {problem.batch}, true);
  check_dtype_and_device(t, name, FAP_DTYPE_INT32, q);
  return static_cast<const int32_t*>(t.data);
}

void check_rotary(const fap_fwd_args& args, AttentionProblem& problem) {
  const bool has_cos = is_present(args.rotary_cos), has_sin = is_present(args.rotary_sin);
  require(args.rotary_interleaved == 0 || args.rotary_interleaved == 1,
          "rotary_interleaved: expected 0 or 1, got ", args.rotary_interleaved);
  if (!has_cos && !has_sin) return;
  require(has_cos && has_sin, has_cos ? "rotary_sin" : "rotary_cos",
          ": rotary_cos and rotary_sin come together, got only one");
  require(problem.cache.rows > 0 || is_present(args.k_new), "rotary_cos: a rotary embedding needs k_new and v_new "
                                                            "to append (as FlashAttention-2)");
  check_layout(args.rotary_cos, "rotary_cos", 2, "(seqlen_ro, rotary_dim / 2)", {}, true);
  const int64_t rows = args.rotary_cos.shape[0], half_dim = args.rotary_cos.shape[1];
  check_layout(args.rotary_sin, "rotary_sin", 2, "(seqlen_ro, rotary_dim / 2)", {rows, half_dim}, true);
  require(half_dim >= 1 && 2 * half_dim <= problem.head_dim, "rotary_cos: rotary_dim = 2 * ", half_dim,
          " must be in [2, head_dim = ", problem.head_dim, "]");
  require(rows >= problem.seqlen_k, "rotary_cos: expected at least as many rows as the cache's ", problem.seqlen_k,
          " positions, got ", rows);
  check_dtype_and_device(args.rotary_cos, "rotary_cos", args.q.dtype, args.q);
  check_dtype_and_device(args.rotary_sin, "rotary_sin", args.q.dtype, args.q);
  problem.cache.rotary = {args.rotary_cos.data, args.rotary_sin.data, rows, half_dim, args.rotary_cos.strides[0],
                          args.rotary_sin.strides[0], args.rotary_interleaved != 0};
}

// The KV-cache call's own arguments (cache_seqlens present): index tensors, the append and the rotary table.
void check_kv_cache(const fap_fwd_args& args, const fap_options& options, AttentionProblem& problem) {
  const fap_tensor& q = args.q;
  require(!problem.varlen, "cache_seqlens: only dense calls are KV-cache calls; this varlen call got it");
  require(!is_present(args.seqused_k), "seqused_k: a KV-cache call counts its keys in cache_seqlens");
  require(!is_present(args.attn_probs), "attn_probs: not returned by a KV-cache call (as FlashAttention-2)");
  require(options.dropout_p == 0.0f, "dropout_p: a KV-cache call has no dropout, got ", options.dropout_p);
  require(args.num_splits >= 0, "num_splits: expected >= 0 (0: chosen from the shapes), got ", args.num_splits);
  problem.num_splits = args.num_splits;
  problem.seqused_k = check_batch_indices(args.cache_seqlens, "cache_seqlens", problem, q);
  problem.cache_batch_idx = check_batch_indices(args.cache_batch_idx, "cache_batch_idx", problem, q);
  problem.leftpad_k = check_batch_indices(args.leftpad_k, "leftpad_k", problem, q);
  require(!problem.block_table || (!problem.cache_batch_idx && !problem.leftpad_k),
          problem.cache_batch_idx ? "cache_batch_idx" : "leftpad_k",
          ": not with a paged KV cache (block_table), as FlashAttention-2");
  const bool has_k = is_present(args.k_new), has_v = is_present(args.v_new);
  require(has_k == has_v, has_k ? "v_new" : "k_new", ": k_new and v_new come together, got only one");
  if (has_k) {
    require(args.k_new.rank == 4, "k_new: expected a rank-4 tensor (batch, seqlen_new, heads_k, head_dim), got rank ",
            args.k_new.rank);
    const OperandShape shape{problem.batch, args.k_new.shape[1], problem.heads_kv, problem.head_dim};
    check_operand(args.k_new, "k_new", false, shape, q);
    check_operand(args.v_new, "v_new", false, shape, q);
    require(shape.rows <= problem.seqlen_k, "k_new: seqlen_new = ", shape.rows, " exceeds the cache's ",
            problem.seqlen_k, " positions");
    check_writable(args.k, "k");  // the caches take the appended keys and values
    check_writable(args.v, "v");
    problem.cache.k = make_operand(args.k_new, false);
    problem.cache.v = make_operand(args.v_new, false);
    problem.cache.rows = shape.rows;
  }
  check_rotary(args, problem);
}

// The index values of a call whose tensors are in host memory (device-resident ones are clamped by the kernels):
// key counts, cache entries and left padding within the cache, and block indices for every key used.
void check_host_indices(const AttentionProblem& p) {
  if (p.device_type != FAP_DEVICE_CPU || !(p.kv_cache || p.block_table)) return;
  for (int64_t b = 0; b < p.batch; ++b) {
    if (p.kv_cache) {
      const int64_t cached = p.seqused_k[b], used = cached + p.cache.rows;
      require(cached >= 0 && used <= p.seqlen_k, "cache_seqlens[", b, "] = ", cached,
              ": expected a key count in [0, ", p.seqlen_k - p.cache.rows, "] (the cache's ", p.seqlen_k,
              " positions less seqlen_new = ", p.cache.rows, ")");
      if (p.cache_batch_idx) {
        const int64_t entry = p.cache_batch_idx[b];
        require(entry >= 0 && entry < p.cache_batch, "cache_batch_idx[", b, "] = ", entry,
                ": expected an entry of the cache in [0, ", p.cache_batch, ")");
      }
      if (p.leftpad_k) {
        const int64_t pad = p.leftpad_k[b];
        require(pad >= 0 && pad <= used, "leftpad_k[", b, "] = ", pad, ": expected a value in [0, ", used,
                "] (cache_seqlens[", b, "] + seqlen_new)");
      }
    }
    if (!p.block_table) continue;
    // Keys past a sequence's count are never read, so only the blocks that hold its keys must be valid.
    const int64_t keys = p.varlen ? cu_length(p, b) : int64_t{p.seqused_k[b]} + p.cache.rows;
    require(keys <= p.max_blocks * p.page_size, "block_table: sequence ", b, " has ", keys, " keys, more than its ",
            p.max_blocks, " blocks of ", p.page_size, " hold");
    for (int64_t j = 0; j * p.page_size < keys; ++j) {
      const int64_t block = p.block_table[b * p.block_table_stride + j];
      require(block >= 0 && block < p.num_blocks, "block_table[", b, "][", j, "] = ", block,
              ": expected a block index in [0, ", p.num_blocks, ")");
    }
  }
}

// Reads the sizes from q and k and checks the shared inputs q, k, v and the varlen offsets.
// Where the keys come from: block_table (a paged cache), and for the dense KV-cache call (kv_cache) whether
// cache_batch_idx picks the cache entries (then their count is free).
struct KeySource {
  const fap_tensor& block_table;
  bool kv_cache = false, indexed_entries = false;
};

AttentionProblem check_inputs(const fap_tensor& q, const fap_tensor& k, const fap_tensor& v,
                              const fap_tensor& cu_seqlens_q, const fap_tensor& cu_seqlens_k, int64_t max_seqlen_q,
                              int64_t max_seqlen_k, bool varlen, const KeySource& keys) {
  AttentionProblem problem;
  problem.varlen = varlen;
  problem.kv_cache = keys.kv_cache;
  const fap_tensor& block_table = keys.block_table;
  const bool paged = is_present(block_table);
  require(!paged || varlen || keys.kv_cache,
          "block_table: only varlen calls and KV-cache calls (cache_seqlens) take a paged KV cache; this dense call "
          "got one");
  if (paged) {  // its dtype first: a table of the wrong type is more likely the mistake than k's layout
    check_known_dtype(block_table, "block_table");
    check_dtype(block_table, "block_table", FAP_DTYPE_INT32);
  }
  require(is_present(q), "q: required, got an absent tensor");
  require(is_present(k), "k: required, got an absent tensor");
  require(is_present(v), "v: required, got an absent tensor");
  const int q_rank = varlen ? 3 : 4;
  require(q.rank == q_rank, "q: expected a rank-", q_rank, " tensor ",
          varlen ? "(total_q, heads, head_dim)" : "(batch, seqlen_q, heads, head_dim)", ", got rank ", q.rank);
  const int k_rank = paged ? 4 : q_rank;
  require(k.rank == k_rank, "k: expected a rank-", k_rank, " tensor ",
          paged    ? "(num_blocks, page_size, heads_k, head_dim) (a paged KV cache)"
          : varlen ? "(total_k, heads_k, head_dim)"
                   : "(batch, seqlen_k, heads_k, head_dim)",
          ", got rank ", k.rank);
  check_known_dtype(q, "q");
  require(q.dtype != FAP_DTYPE_INT32, "q: expected dtype float16, bfloat16 or float32, got int32");
  require(q.device_type == FAP_DEVICE_CPU || q.device_type == FAP_DEVICE_CUDA, "q: unknown device type ",
          q.device_type);
  problem.dtype = static_cast<fap_dtype>(q.dtype);
  problem.device_type = static_cast<fap_device_type>(q.device_type);
  problem.device_index = q.device_type == FAP_DEVICE_CPU ? 0 : q.device_index;

  const int64_t head_dim = q.shape[q_rank - 1];
  const int64_t heads_q = q.shape[q_rank - 2];
  const int64_t heads_kv = k.shape[k_rank - 2];
  require(head_dim >= 1 && head_dim <= kMaxHeadDim, "q: head_dim (last dimension) must be in [1, ", kMaxHeadDim,
          "], got ", head_dim);
  require(heads_q >= 1 && heads_q <= kMaxGridDimension, "q: heads must be in [1, ", kMaxGridDimension,
          "] (FlashAttention-2's limit: a dimension of the kernels' grids), got ", heads_q);
  require(heads_kv >= 1, "k: heads_k must be >= 1, got ", heads_kv);
  require(heads_q % heads_kv == 0, "k: heads_k must divide the ", heads_q, " query heads, got heads_k = ", heads_kv);
  problem.heads_q = heads_q;
  problem.heads_kv = heads_kv;
  problem.head_dim = head_dim;

  if (varlen) {
    problem.batch = cu_seqlens_q.rank == 1 ? cu_seqlens_q.shape[0] - 1 : 0;
    require(is_present(cu_seqlens_q) && cu_seqlens_q.rank == 1,
            "cu_seqlens_q: expected a rank-1 int32 tensor (batch + 1), got ",
            RankText{cu_seqlens_q});
    require(problem.batch >= 1 && problem.batch <= kMaxGridDimension, "cu_seqlens_q: expected batch + 1 in [2, ",
            kMaxGridDimension + 1, "] entries (FlashAttention-2's batch limit), got ", cu_seqlens_q.shape[0]);
    require(max_seqlen_q >= 0, "max_seqlen_q: expected >= 0, got ", max_seqlen_q);
    require(max_seqlen_k >= 0, "max_seqlen_k: expected >= 0, got ", max_seqlen_k);
    // No sequence is longer than all the rows: the bound keeps the work (grids sized by the maxima) to the data.
    require(max_seqlen_q <= q.shape[0], "max_seqlen_q: expected at most total_q = ", q.shape[0],
            " (the rows of q), got ", max_seqlen_q);
    // (A paged cache's key counts are checked against its block table, where they are read.)
    require(paged || max_seqlen_k <= k.shape[0], "max_seqlen_k: expected at most total_k = ", k.shape[0],
            " (the rows of k), got ", max_seqlen_k);
    problem.seqlen_q = max_seqlen_q;
    problem.seqlen_k = max_seqlen_k;
    problem.total_q = q.shape[0];
    problem.total_k = k.shape[0];
  } else {
    require(!is_present(cu_seqlens_q) && !is_present(cu_seqlens_k),
            "cu_seqlens_q/cu_seqlens_k: only varlen calls take them; this dense call got them");
    problem.batch = q.shape[0];
    require(problem.batch >= 1 && problem.batch <= kMaxGridDimension, "q: batch size must be in [1, ",
            kMaxGridDimension, "] (FlashAttention-2's limit: a dimension of the kernels' grids), got ", problem.batch);
    problem.seqlen_q = problem.total_q = q.shape[1];
    // A paged KV cache holds up to max_blocks pages per sequence.
    problem.seqlen_k = problem.total_k =
        paged && block_table.rank == 2 ? block_table.shape[1] * k.shape[1] : k.shape[1];
    problem.cache_batch = keys.indexed_entries ? k.shape[0] : problem.batch;
  }
  check_operand(q, "q", varlen, {problem.batch, problem.total_q, heads_q, head_dim}, q);
  if (paged) {
    for (const auto& [cache, name, operand] : {std::tuple{&k, "k", &problem.k}, std::tuple{&v, "v", &problem.v}}) {
      check_layout(*cache, name, 4, "(num_blocks, page_size, heads_k, head_dim)", {k.shape[0], k.shape[1], heads_kv,
                                                                                    head_dim},
                   true);
      check_dtype_and_device(*cache, name, q.dtype, q);
      *operand = Operand{cache->data, 0, cache->strides[1], cache->strides[2], cache->strides[0]};
    }
    require(k.shape[1] >= 1, "k: page_size (dimension 1 of a paged KV cache) must be >= 1, got ", k.shape[1]);
  } else {
    check_operand(k, "k", varlen, {problem.cache_batch, problem.total_k, heads_kv, head_dim}, q);
    check_operand(v, "v", varlen, {problem.cache_batch, problem.total_k, heads_kv, head_dim}, q);
    problem.k = make_operand(k, varlen);
    problem.v = make_operand(v, varlen);
  }
  if (varlen) {
    check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", problem.batch, problem.total_q, max_seqlen_q, "max_seqlen_q", q);
    // A paged cache's keys are found through the block table: cu_seqlens_k only counts them.
    check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", problem.batch,
                     paged ? std::numeric_limits<int32_t>::max() : problem.total_k, max_seqlen_k, "max_seqlen_k", q);
    problem.cu_seqlens_q = static_cast<const int32_t*>(cu_seqlens_q.data);
    problem.cu_seqlens_k = static_cast<const int32_t*>(cu_seqlens_k.data);
  }
  problem.q = make_operand(q, varlen);
  if (paged) {
    problem.page_size = k.shape[1];
    check_block_table(block_table, problem, k.shape[0], q);
  }
  return problem;
}

}  // namespace

const char* dtype_name(int32_t dtype) {
  switch (dtype) {
    case FAP_DTYPE_FLOAT16: return "float16";
    case FAP_DTYPE_BFLOAT16: return "bfloat16";
    case FAP_DTYPE_FLOAT32: return "float32";
    case FAP_DTYPE_INT32: return "int32";
  }
  return "unknown";
}

AttentionProblem make_forward_problem(const fap_fwd_args& args, const fap_options& options, bool varlen) {
  const bool kv_cache = is_present(args.cache_seqlens);
  for (const auto& [tensor, name] : {std::pair{&args.cache_batch_idx, "cache_batch_idx"}, std::pair{&args.leftpad_k, "leftpad_k"},
                                     std::pair{&args.k_new, "k_new"}, std::pair{&args.v_new, "v_new"},
                                     std::pair{&args.rotary_cos, "rotary_cos"},
                                     std::pair{&args.rotary_sin, "rotary_sin"}}) {
    require(kv_cache || !is_present(*tensor), name, ": only KV-cache calls (with cache_seqlens) take it");
  }
  AttentionProblem problem =
      check_inputs(args.q, args.k, args.v, args.cu_seqlens_q, args.cu_seqlens_k, args.max_seqlen_q, args.max_seqlen_k,
                   varlen, {args.block_table, kv_cache, is_present(args.cache_batch_idx)});
  problem.direction = Direction::kForward;
  if (kv_cache) check_kv_cache(args, options, problem);
  if (is_present(args.seqused_k)) check_seqused_k(args.seqused_k, problem, args.max_seqlen_k, args.q);
  require(is_present(args.out), "out: required, got an absent tensor");
  check_operand(args.out, "out", varlen, {problem.batch, problem.total_q, problem.heads_q, problem.head_dim}, args.q);
  check_writable(args.out, "out");
  problem.out = make_operand(args.out, varlen);
  if (is_present(args.softmax_lse)) {
    check_lse(args.softmax_lse, "softmax_lse", problem, args.q);
    check_writable(args.softmax_lse, "softmax_lse");
  }
  if (is_present(args.attn_probs)) {
    check_probs(args.attn_probs, problem, args.q);
    check_writable(args.attn_probs, "attn_probs");
  }
  check_options(options, args.q, problem.batch, problem.heads_q, problem);
  check_host_indices(problem);
  return problem;
}

KernelFeatures make_kernel_features(const fap_kernel_spec& spec, int32_t index) {
  const std::string name = concat("specs[", index, "]");
  require(spec.dtype == FAP_DTYPE_FLOAT16 || spec.dtype == FAP_DTYPE_BFLOAT16, name,
          ".dtype: expected float16 or bfloat16 (the CUDA kernels' types), got ", dtype_name(spec.dtype));
  require(spec.head_dim >= 1 && spec.head_dim <= kMaxHeadDim, name, ".head_dim: expected a value in [1, ", kMaxHeadDim,
          "], got ", spec.head_dim);
  const struct {
    int32_t value;
    const char* field;
  } flags[] = {{spec.backward, "backward"}, {spec.window, "window"},   {spec.softcap, "softcap"},
               {spec.alibi, "alibi"},       {spec.dropout, "dropout"}};
  for (const auto& flag : flags)
    require(flag.value == 0 || flag.value == 1, name, ".", flag.field, ": expected 0 or 1, got ", flag.value);
  KernelFeatures features;
  features.direction = spec.backward ? Direction::kBackward : Direction::kForward;
  features.dtype = static_cast<fap_dtype>(spec.dtype);
  features.head_dim = spec.head_dim;
  features.window = spec.window != 0;
  features.softcap = spec.softcap != 0;
  features.alibi = spec.alibi != 0;
  features.dropout = spec.dropout != 0;
  return features;
}

AttentionProblem make_backward_problem(const fap_bwd_args& args, const fap_options& options, bool varlen) {
  AttentionProblem problem = check_inputs(args.q, args.k, args.v, args.cu_seqlens_q, args.cu_seqlens_k,
                                          args.max_seqlen_q, args.max_seqlen_k, varlen, {fap_tensor{}});
  problem.direction = Direction::kBackward;
  const OperandShape q_shape{problem.batch, problem.total_q, problem.heads_q, problem.head_dim};
  const OperandShape k_shape{problem.batch, problem.total_k, problem.heads_kv, problem.head_dim};
  const struct {
    const fap_tensor& tensor;
    const char* name;
    const OperandShape& shape;
    Operand& operand;
  } operands[] = {{args.out, "out", q_shape, problem.out},   {args.dout, "dout", q_shape, problem.dout},
                  {args.dq, "dq", q_shape, problem.dq},      {args.dk, "dk", k_shape, problem.dk},
                  {args.dv, "dv", k_shape, problem.dv}};
  for (const auto& entry : operands) {
    require(is_present(entry.tensor), entry.name, ": required, got an absent tensor");
    check_operand(entry.tensor, entry.name, varlen, entry.shape, args.q);
    entry.operand = make_operand(entry.tensor, varlen);
  }
  for (const fap_tensor* gradient : {&args.dq, &args.dk, &args.dv}) {
    check_writable(*gradient, gradient == &args.dq ? "dq" : gradient == &args.dk ? "dk" : "dv");
  }
  require(is_present(args.softmax_lse), "softmax_lse: required by the backward (the forward's output), got an "
                                        "absent tensor");
  check_lse(args.softmax_lse, "softmax_lse", problem, args.q);
  check_options(options, args.q, problem.batch, problem.heads_q, problem);
  return problem;
}

}  // namespace fap
