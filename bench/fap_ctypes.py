"""Minimal ctypes view of the C API (include/flash_attn_plus/flash_attn_plus.h) for the benchmarks.

The benchmarks call the library exactly as a C user would: tensors cross as pointers and strides, the
workspace is asked for and allocated by the caller.
"""
import ctypes
import os

MAX_RANK = 4
DTYPES = {"float16": 0, "bfloat16": 1, "float32": 2, "int32": 3}


class Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int32), ("device_type", ctypes.c_int32),
                ("device_index", ctypes.c_int32), ("rank", ctypes.c_int32),
                ("shape", ctypes.c_int64 * MAX_RANK), ("strides", ctypes.c_int64 * MAX_RANK)]


class Options(ctypes.Structure):
    _fields_ = [("softmax_scale", ctypes.c_float), ("causal", ctypes.c_int32),
                ("window_size_left", ctypes.c_int32), ("window_size_right", ctypes.c_int32),
                ("softcap", ctypes.c_float), ("alibi_slopes", Tensor), ("dropout_p", ctypes.c_float),
                ("dropout_seed", ctypes.c_uint64), ("dropout_offset", ctypes.c_uint64),
                ("deterministic", ctypes.c_int32)]


class FwdArgs(ctypes.Structure):
    _fields_ = [("q", Tensor), ("k", Tensor), ("v", Tensor), ("out", Tensor), ("softmax_lse", Tensor),
                ("attn_probs", Tensor), ("cu_seqlens_q", Tensor), ("cu_seqlens_k", Tensor),
                ("max_seqlen_q", ctypes.c_int64), ("max_seqlen_k", ctypes.c_int64), ("block_table", Tensor),
                ("seqused_k", Tensor), ("cache_seqlens", Tensor), ("cache_batch_idx", Tensor), ("leftpad_k", Tensor),
                ("k_new", Tensor), ("v_new", Tensor), ("rotary_cos", Tensor), ("rotary_sin", Tensor),
                ("rotary_interleaved", ctypes.c_int32), ("num_splits", ctypes.c_int32)]


class BwdArgs(ctypes.Structure):
    _fields_ = [("q", Tensor), ("k", Tensor), ("v", Tensor), ("out", Tensor), ("dout", Tensor),
                ("softmax_lse", Tensor), ("dq", Tensor), ("dk", Tensor), ("dv", Tensor),
                ("cu_seqlens_q", Tensor), ("cu_seqlens_k", Tensor), ("max_seqlen_q", ctypes.c_int64),
                ("max_seqlen_k", ctypes.c_int64)]


def load(path=None):
    path = path or os.environ.get("FAP_LIBRARY", "build/libflash_attn_plus.so")
    lib = ctypes.CDLL(os.path.abspath(path))
    lib.fap_default_options.restype = Options
    lib.fap_last_error.restype = ctypes.c_char_p
    for name, args in (("fap_mha_fwd", FwdArgs), ("fap_mha_bwd", BwdArgs)):
        getattr(lib, name + "_workspace_size").argtypes = [ctypes.POINTER(args), ctypes.POINTER(Options),
                                                           ctypes.POINTER(ctypes.c_size_t)]
        getattr(lib, name).argtypes = [ctypes.POINTER(args), ctypes.POINTER(Options), ctypes.c_void_p,
                                       ctypes.c_void_p, ctypes.c_size_t]
    return lib


def tensor(t):
    """A fap_tensor view of a torch tensor (CPU or CUDA)."""
    view = Tensor()
    view.data = t.data_ptr()
    view.dtype = DTYPES[str(t.dtype).replace("torch.", "")]
    view.device_type = 0 if t.device.type == "cpu" else 1
    view.device_index = t.device.index or 0
    view.rank = t.dim()
    for i in range(t.dim()):
        view.shape[i] = t.shape[i]
        view.strides[i] = t.stride(i)
    return view


def check(lib, status):
    if status != 0:
        raise RuntimeError(lib.fap_last_error().decode())
