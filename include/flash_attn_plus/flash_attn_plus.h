/*
 * FlashAttention-Plus: the public C API.
 *
 * Exact FlashAttention-2 semantics (causal aligned to the bottom-right corner, sliding window, softcap,
 * ALiBi, dropout, MQA/GQA, LSE, varlen) behind plain C: tensors are described by fap_tensor views
 * (pointer, dtype, device, shape, strides in elements), every call takes the caller's stream and a
 * caller-provided workspace (16-byte aligned) whose size is asked for first, and every failure returns a status plus a
 * thread-local message that names the offending argument (fap_last_error()). A call is planned once (arguments
 * checked, backend and kernel chosen, workspace laid out) and then run: fap_plan_* below, or the fap_mha_*
 * functions, which plan and run in one call.
 *
 * Layouts (the same as FlashAttention-2's Python API):
 *   dense   q (batch, seqlen_q, heads, head_dim)   k, v (batch, seqlen_k, heads_k, head_dim)
 *           out like q, softmax_lse (batch, heads, seqlen_q) fp32
 *   varlen  q (total_q, heads, head_dim)            k, v (total_k, heads_k, head_dim)
 *           cu_seqlens_q/k int32 (batch + 1), softmax_lse (heads, total_q) fp32
 *   attn_probs (batch, heads, >= seqlen_q, >= seqlen_k), in q's dtype: see docs/c-api.md.
 * Only the last dimension of q, k, v, out, dout, dq, dk, dv must be contiguous (stride 1).
 *
 * Thread safety: every entry point may be called from several threads at once.
 */
#ifndef FLASH_ATTN_PLUS_H_
#define FLASH_ATTN_PLUS_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define FAP_API __declspec(dllexport)
#else
#define FAP_API __attribute__((visibility("default")))
#endif

/* Bumped whenever a struct below changes layout. */
#define FAP_API_VERSION 4

typedef enum fap_status {
  FAP_SUCCESS = 0,
  FAP_ERROR_INVALID_ARGUMENT = 1,    /* an argument breaks the contract; the message names it */
  FAP_ERROR_UNSUPPORTED = 2,         /* valid, but the selected backend cannot do it */
  FAP_ERROR_BACKEND_UNAVAILABLE = 3, /* the requested backend cannot run on this machine */
  FAP_ERROR_WORKSPACE_TOO_SMALL = 4,
  FAP_ERROR_OUT_OF_MEMORY = 5,
  FAP_ERROR_DEVICE = 6,              /* the driver or the run-time compiler reported an error */
  FAP_ERROR_INTERNAL = 7
} fap_status;

typedef enum fap_dtype {
  FAP_DTYPE_FLOAT16 = 0,
  FAP_DTYPE_BFLOAT16 = 1,
  FAP_DTYPE_FLOAT32 = 2,
  FAP_DTYPE_INT32 = 3
} fap_dtype;

typedef enum fap_device_type { FAP_DEVICE_CPU = 0, FAP_DEVICE_CUDA = 1 } fap_device_type;

#define FAP_MAX_RANK 4

/* A strided view of memory the caller owns. A tensor whose data is NULL is "absent" (optional ones).
 * dtype and device_type hold fap_dtype and fap_device_type values in fixed-size fields, so that any value a
 * caller passes can be checked (and rejected) without undefined behaviour. */
typedef struct fap_tensor {
  void* data;
  int32_t dtype;       /* fap_dtype */
  int32_t device_type; /* fap_device_type */
  int32_t device_index;
  int32_t rank;
  int64_t shape[FAP_MAX_RANK];
  int64_t strides[FAP_MAX_RANK]; /* in elements, not bytes */
} fap_tensor;

/* Everything FlashAttention-2 can be asked to do. Start from fap_default_options(). */
typedef struct fap_options {
  float softmax_scale;     /* NaN (the default) means 1 / sqrt(head_dim) */
  int32_t causal;          /* bottom-right aligned when seqlen_q != seqlen_k */
  int32_t window_size_left;  /* -1: unbounded */
  int32_t window_size_right; /* -1: unbounded */
  float softcap;           /* 0 disables; else score = softcap * tanh(score / softcap) */
  fap_tensor alibi_slopes; /* optional, fp32, (heads) or (batch, heads) */
  float dropout_p;         /* probability of dropping, in [0, 1) */
  uint64_t dropout_seed;   /* Philox key and counter offset: see docs/c-api.md */
  uint64_t dropout_offset;
  int32_t deterministic;   /* backward: bitwise reproducible gradients */
} fap_options;

/* Forward. Dense calls leave cu_seqlens absent; varlen calls need them and max_seqlen_q/k. */
typedef struct fap_fwd_args {
  fap_tensor q, k, v;
  fap_tensor out;
  fap_tensor softmax_lse; /* optional output */
  fap_tensor attn_probs;  /* optional output (debugging and FlashAttention-2's S_dmask) */
  fap_tensor cu_seqlens_q, cu_seqlens_k;
  int64_t max_seqlen_q, max_seqlen_k;
  /* Optional, varlen forward only (FlashAttention-2's paged KV cache and used key counts):
   *   block_table int32 (batch, max_blocks), last dimension contiguous: k and v are caches (num_blocks,
   *     page_size, heads_k, head_dim) of any page size, and key t of sequence b is row t % page_size of block
   *     block_table[b][t / page_size]; cu_seqlens_k then only counts each sequence's keys.
   *   seqused_k int32 (batch): sequence b attends to its first seqused_k[b] keys only. */
  fap_tensor block_table;
  fap_tensor seqused_k;
  /* Optional, dense forward only: FlashAttention-2's KV-cache call (flash_attn_with_kvcache). With cache_seqlens
   * present, k and v are caches read and updated in place: (batch_cache, capacity, heads_k, head_dim), or
   * paged through block_table as above (capacity max_blocks * page_size).
   *   cache_seqlens int32 (batch): the keys in sequence b's cache before this call's append.
   *   cache_batch_idx int32 (batch): sequence b's cache is entry cache_batch_idx[b] of k, v (default b; then
   *     batch_cache must equal batch). Not with block_table.
   *   leftpad_k int32 (batch): sequence b's keys start at cache position leftpad_k[b]. Not with block_table.
   *   k_new, v_new (batch, seqlen_new, heads_k, head_dim): written into the caches at positions
   *     cache_seqlens[b] .. + seqlen_new - 1 before attending. Sequence b attends to the cache positions
   *     [leftpad_k[b], cache_seqlens[b] + seqlen_new), the causal mask aligned to their end.
   *   rotary_cos, rotary_sin (seqlen_ro >= capacity, rotary_dim / 2), q's dtype: rotary embedding (rotary_dim
   *     <= head_dim, even) of k_new at its positions and of q at cache_seqlens[b] + row (with causal or a
   *     window; else cache_seqlens[b] for every row); rotary_interleaved: 1 rotates dims (2i, 2i + 1), 0 dims
   *     (i, i + rotary_dim / 2).
   *   num_splits: how many parts the keys are split into (FlashAttention-2's flash-decoding): 0 chosen from the
   *     shapes, 1 none, n at most n. The result does not depend on it beyond rounding.
   * Values in device memory (cache_seqlens, cache_batch_idx, leftpad_k, block_table) are not read on the host:
   * out-of-range ones are clamped on the device (never a read or write out of bounds), so a call needs no
   * synchronisation and can be captured in a CUDA graph. Values in host memory are checked. */
  fap_tensor cache_seqlens;
  fap_tensor cache_batch_idx;
  fap_tensor leftpad_k;
  fap_tensor k_new, v_new;
  fap_tensor rotary_cos, rotary_sin;
  int32_t rotary_interleaved;
  int32_t num_splits;
} fap_fwd_args;

/* Backward: gradients of out with respect to q, k, v, given the forward's out and softmax_lse. */
typedef struct fap_bwd_args {
  fap_tensor q, k, v;
  fap_tensor out, dout;
  fap_tensor softmax_lse; /* required */
  fap_tensor dq, dk, dv;  /* outputs, shaped like q, k, v */
  fap_tensor cu_seqlens_q, cu_seqlens_k;
  int64_t max_seqlen_q, max_seqlen_k;
} fap_bwd_args;

typedef struct fap_backend_info {
  const char* name;   /* "cpu", "cuda", ... */
  int32_t usable;     /* 1 if it can run on this machine */
  const char* reason; /* why not, when usable == 0; "" otherwise */
  const char* details; /* versions and settings worth reporting (libraries loaded, cache directory, threads) */
} fap_backend_info;

FAP_API int32_t fap_api_version(void);
FAP_API const char* fap_version_string(void);
FAP_API const char* fap_status_string(fap_status status);
/* The message of the last failed call on this thread ("" if none). Valid until the next call. */
FAP_API const char* fap_last_error(void);

FAP_API fap_options fap_default_options(void);
/* A contiguous (row-major) view; strides are filled in. rank <= FAP_MAX_RANK. */
FAP_API fap_tensor fap_make_tensor(void* data, fap_dtype dtype, fap_device_type device_type,
                                   int32_t device_index, int32_t rank, const int64_t* shape);

/* Backends. Selection: "auto" (default: the best usable one for the tensors' device), "cpu", "cuda".
 * The environment variable FLASH_ATTENTION_PLUS_BACKEND sets the initial choice. */
FAP_API int32_t fap_backend_count(void);
FAP_API fap_status fap_backend_get_info(int32_t index, fap_backend_info* info);
FAP_API fap_status fap_set_backend(const char* name);
FAP_API const char* fap_get_backend(void);
/* Which backend a call with tensors on this device would run on now. device_type: a fap_device_type value, taken
 * as an int so that any other value is an argument error rather than an invalid enum. */
FAP_API fap_status fap_resolve_backend(int32_t device_type, const char** name);

/* Index checks. Index arrays in device memory are not read on the host by default, which would synchronise every
 * call: the kernels clamp every index they read instead, so corrupt values give wrong results but never an access
 * out of bounds. With the checks on, every varlen call copies cu_seqlens_q and cu_seqlens_k to the host (after the
 * device's pending work) and checks them as host-resident ones are, each error naming the argument. Initially on
 * when the environment variable FLASH_ATTENTION_PLUS_CHECK_INDICES is set to a value other than "0". */
FAP_API fap_status fap_set_index_checks(int32_t enabled);
FAP_API int32_t fap_index_checks(void);

/* Plan, then run. fap_plan_fwd / fap_plan_bwd check every argument, pick the backend and the kernel
 * configuration (compiling it on first use), and lay out the workspace, once; fap_plan_run then only launches,
 * any number of times. A plan keeps the tensor views of args (pointers, shapes, strides), not the memory behind
 * them: run it while that memory is alive. CUDA plans belong to the context that was current (or, with none, the
 * primary context of the tensors' device) when they were made. varlen: 0 for the dense layout, 1 for varlen. */
typedef struct fap_plan fap_plan;

FAP_API fap_status fap_plan_fwd(const fap_fwd_args* args, const fap_options* options, int32_t varlen,
                                fap_plan** plan);
FAP_API fap_status fap_plan_bwd(const fap_bwd_args* args, const fap_options* options, int32_t varlen,
                                fap_plan** plan);
FAP_API fap_status fap_plan_workspace_size(const fap_plan* plan, size_t* bytes);
/* The backend's name and the kernel configuration's ("" where there is none, e.g. on the CPU); valid while the
 * plan lives. */
FAP_API fap_status fap_plan_describe(const fap_plan* plan, const char** backend, const char** kernel);
/* workspace: at least fap_plan_workspace_size() bytes, 16-byte aligned, on the tensors' device. */
FAP_API fap_status fap_plan_run(const fap_plan* plan, void* stream, void* workspace, size_t workspace_bytes);
FAP_API void fap_plan_destroy(fap_plan* plan); /* NULL is ignored */

/* Checks every argument of a forward call as fap_plan_fwd does, and nothing more: no backend is chosen, no
 * kernel compiled (for callers that run the call elsewhere but want the library's validation). */
FAP_API fap_status fap_check_fwd(const fap_fwd_args* args, const fap_options* options, int32_t varlen);

/* The kernels of one kind of call, for compiling them ahead of use: a kernel configuration depends on these
 * and never on batch size or sequence lengths. */
typedef struct fap_kernel_spec {
  int32_t backward; /* 0: the forward's kernels, 1: the backward's */
  int32_t dtype;    /* FAP_DTYPE_FLOAT16 or FAP_DTYPE_BFLOAT16 */
  int32_t head_dim; /* 1..256 */
  int32_t window;   /* causal or a sliding window */
  int32_t softcap, alibi, dropout;
} fap_kernel_spec;

/* Compiles (or loads from the disk cache) the CUDA kernels of every spec for the GPU device_index, so that
 * later calls find them loaded. */
FAP_API fap_status fap_precompile(const fap_kernel_spec* specs, int32_t count, int32_t device_index);

FAP_API fap_status fap_mha_fwd_workspace_size(const fap_fwd_args* args, const fap_options* options,
                                              size_t* bytes);
FAP_API fap_status fap_mha_fwd(const fap_fwd_args* args, const fap_options* options, void* stream,
                               void* workspace, size_t workspace_bytes);
FAP_API fap_status fap_mha_varlen_fwd_workspace_size(const fap_fwd_args* args,
                                                     const fap_options* options, size_t* bytes);
FAP_API fap_status fap_mha_varlen_fwd(const fap_fwd_args* args, const fap_options* options,
                                      void* stream, void* workspace, size_t workspace_bytes);

FAP_API fap_status fap_mha_bwd_workspace_size(const fap_bwd_args* args, const fap_options* options,
                                              size_t* bytes);
FAP_API fap_status fap_mha_bwd(const fap_bwd_args* args, const fap_options* options, void* stream,
                               void* workspace, size_t workspace_bytes);
FAP_API fap_status fap_mha_varlen_bwd_workspace_size(const fap_bwd_args* args,
                                                     const fap_options* options, size_t* bytes);
FAP_API fap_status fap_mha_varlen_bwd(const fap_bwd_args* args, const fap_options* options,
                                      void* stream, void* workspace, size_t workspace_bytes);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* FLASH_ATTN_PLUS_H_ */
