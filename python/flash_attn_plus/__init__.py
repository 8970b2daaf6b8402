"""FlashAttention-Plus: FlashAttention-2's Python API and semantics, forward and backward, on run-time
compiled CUDA kernels (no CUDA compilation at install) or the CPU, for any torch >= 2.4.

    import flash_attn_plus as fap
    out = fap.flash_attn_func(q, k, v, causal=True)     # q, k, v: (batch, seqlen, nheads, headdim)
    fap.info()                                          # backends, why one is unusable, versions, cache
    fap.precompile(head_dims=(128,))                    # compile the CUDA kernels ahead of use
    with fap.backend("cpu"): ...                        # or set_backend(...), FLASH_ATTENTION_PLUS_BACKEND

The `flash_attn` compatibility distribution (compat/ in the repository) exposes the same functions under
FlashAttention-2's module paths for code and libraries written against FA2.
"""
from . import bert_padding, ops, rotary
from ._errors import (BackendUnavailableError, DeviceError, FlashAttentionError, InvalidArgumentError,
                      OutOfMemoryError, UnsupportedError)
from ._library import _C
from .backends import available_backends, backend, get_backend, info, set_backend
from .index_checks import checked_indices, index_checks, set_index_checks
from .interface import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                        flash_attn_varlen_func, flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func)
from .kvcache import flash_attn_with_kvcache
from .precompile import precompile

__version__ = _C.version()

__all__ = [
    "flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache",
    "set_backend", "get_backend", "backend", "info", "available_backends", "precompile", "bert_padding", "rotary", "ops",
    "set_index_checks", "index_checks", "checked_indices",
    "FlashAttentionError", "InvalidArgumentError", "UnsupportedError", "BackendUnavailableError", "DeviceError",
    "OutOfMemoryError",
]
