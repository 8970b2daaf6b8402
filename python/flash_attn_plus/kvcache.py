"""FA2's flash_attn_with_kvcache: append new keys/values to a cache in place (optionally rotated), then attend over
each sequence's cached keys, in one library call (fap_fwd_args' KV-cache fields).

The library reads the cache where it lies (dense entries picked by cache_batch_idx, or pages of any size through
block_table) and reads cache_seqlens, cache_batch_idx, cache_leftpad and block_table on the device: a call makes
no host synchronisation, so a decode step can be captured in a CUDA graph. Values in device memory are clamped to
the cache by the kernels rather than checked (FA2 checks them neither); values in host memory are checked. The
call is one custom op (flash_attn_plus::fwd_kvcache, mutating the caches) when torch traces it, so
torch.compile keeps it in one graph; eager calls go to the library directly.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _errors
from ._library import _C
from ._tensors import allocate_workspace, stream_of
from .interface import maybe_contiguous, window_pair
from .ops import Options, _c_options, _traced


def _forward_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                     block_table, alibi_slopes, rotary_interleaved, num_splits, options):
    out = torch.empty_like(q)
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]) if q.dim() == 4 else (0,), dtype=torch.float32)
    _errors.check(_C.forward_kvcache(q, k_cache, v_cache, k, v, out, lse, cache_seqlens, cache_batch_idx,
                                     cache_leftpad, block_table, rotary_cos, rotary_sin, bool(rotary_interleaved),
                                     int(num_splits), alibi_slopes, _c_options(options), stream_of(q),
                                     allocate_workspace))
    return out, lse


@torch.library.custom_op("flash_attn_plus::fwd_kvcache", mutates_args=("k_cache", "v_cache"))
def forward_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor], v: Optional[Tensor],
                         rotary_cos: Optional[Tensor], rotary_sin: Optional[Tensor], cache_seqlens: Tensor,
                         cache_batch_idx: Optional[Tensor], cache_leftpad: Optional[Tensor],
                         block_table: Optional[Tensor], alibi_slopes: Optional[Tensor], rotary_interleaved: bool,
                         num_splits: int, softmax_scale: float, causal: bool, window_left: int, window_right: int,
                         softcap: float) -> Tuple[Tensor, Tensor]:
    """(out, softmax_lse); the last five parameters are Options' fields (no dropout)."""
    options = Options(softmax_scale, causal, window_left, window_right, softcap, 0.0, False)
    return _forward_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                            cache_leftpad, block_table, alibi_slopes, rotary_interleaved, num_splits, options)


@forward_with_kvcache.register_fake
def _(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
      alibi_slopes, rotary_interleaved, num_splits, *options):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device))


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """FA2's decoding entry point (see the module docstring). num_splits: how many parts the keys are split into
    (0: chosen from the shapes, 1: none); it changes the reduction order only. Returns out, or
    (out, softmax_lse (batch, nheads, seqlen_q))."""
    window_left, window_right = window_pair(window_size)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** (-0.5)
    seqlen_new = 0 if k is None else k.shape[1]
    if cache_seqlens is None or isinstance(cache_seqlens, int):
        # A host value: checked here (device-resident counts are clamped by the kernels instead).
        capacity = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
        cached = capacity - seqlen_new if cache_seqlens is None else cache_seqlens
        if cached < 0 or cached + seqlen_new > capacity:
            raise _errors.InvalidArgumentError(
                f"cache_seqlens: {cached} cached keys plus seqlen_new = {seqlen_new} must fit the cache's {capacity} "
                f"positions")
        cache_seqlens = torch.full((q.shape[0],), cached, dtype=torch.int32, device=q.device)
    arguments = (maybe_contiguous(q), k_cache, v_cache, maybe_contiguous(k), maybe_contiguous(v), rotary_cos,
                 rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, alibi_slopes,
                 bool(rotary_interleaved), int(num_splits))
    options = Options(softmax_scale, causal, window_left, window_right,
                      0.0 if softcap is None else softcap, 0.0, False)
    if _traced(q, k_cache, v_cache, k, v):
        out, lse = forward_with_kvcache(*arguments, *options[:5])
    else:
        out, lse = _forward_kvcache(*arguments, options)
    return (out, lse) if return_softmax_lse else out
