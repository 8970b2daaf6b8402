"""FA2's flash_attn_with_kvcache: append new keys/values to a cache in place (optionally rotated), then
attend over each sequence's cached keys.

Composed from torch operations and the varlen forward: each sequence's valid keys
[cache_leftpad[b], cache_seqlens[b] + seqlen_new) are gathered into packed rows (from a dense or a paged
cache), so the masks, ALiBi and the LSE follow the varlen rules with per-sequence lengths, which is
FA2's meaning of cache_leftpad. It is one custom op (flash_attn_plus::fwd_kvcache, mutating the caches),
so torch.compile keeps it in one graph. The gather copies the used part of the cache once per call: a
fused decode kernel that reads the cache in place is future work.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _errors
from .interface import maybe_contiguous
from .ops import Options, attention_forward
from .rotary import rotate


def _require(condition, message):
    if not condition:
        raise _errors.InvalidArgumentError(message)


def _check_index(name, tensor, batch):
    if tensor is not None:
        _require(tensor.dtype == torch.int32 and tensor.shape == (batch,),
                 f"{name}: expected int32 ({batch},), got {tensor.dtype} {tuple(tensor.shape)}")


def _cache_rows(batch_row, position, k_cache, block_table):
    """Flat row of the cache (viewed as (-1, heads_k, headdim)) holding position `position` of batch row b."""
    if block_table is None:
        return batch_row * k_cache.shape[1] + position
    page = k_cache.shape[1]
    return block_table.long()[batch_row, position // page] * page + position % page


@torch.library.custom_op("flash_attn_plus::fwd_kvcache", mutates_args=("k_cache", "v_cache"))
def forward_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor], v: Optional[Tensor],
                         rotary_cos: Optional[Tensor], rotary_sin: Optional[Tensor], cache_seqlens: Tensor,
                         cache_batch_idx: Optional[Tensor], cache_leftpad: Optional[Tensor],
                         block_table: Optional[Tensor], softmax_scale: float, causal: bool, window_left: int,
                         window_right: int, softcap: float, rotary_interleaved: bool,
                         alibi_slopes: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    _require(q.dim() == 4, f"q: expected (batch, seqlen_q, nheads, headdim), got shape {tuple(q.shape)}")
    _require(k_cache.dim() == 4 and v_cache.shape == k_cache.shape,
             f"k_cache, v_cache: expected two (batch_cache or num_blocks, seqlen, nheads_k, headdim) caches, got "
             f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    _require(k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1,
             "k_cache, v_cache: the last dimension must be contiguous (they are updated in place)")
    batch, seqlen_q = q.shape[0], q.shape[1]
    device = q.device
    _check_index("cache_seqlens", cache_seqlens, batch)
    _check_index("cache_batch_idx", cache_batch_idx, batch)
    _check_index("cache_leftpad", cache_leftpad, batch)
    if block_table is not None:
        _require(cache_batch_idx is None and cache_leftpad is None,
                 "block_table: a paged cache cannot be combined with cache_batch_idx or cache_leftpad")
        _require(block_table.dtype == torch.int32 and block_table.dim() == 2 and block_table.shape[0] == batch,
                 f"block_table: expected int32 ({batch}, max_blocks), got {block_table.dtype} {tuple(block_table.shape)}")
        capacity = block_table.shape[1] * k_cache.shape[1]
        _require(block_table.numel() == 0 or (int(block_table.min()) >= 0 and int(block_table.max()) < k_cache.shape[0]),
                 f"block_table: block indices must lie in [0, {k_cache.shape[0]})")
    else:
        capacity = k_cache.shape[1]
    rows = cache_batch_idx.long() if cache_batch_idx is not None else torch.arange(batch, device=device)
    _require(block_table is not None or rows.numel() == 0 or int(rows.max()) < k_cache.shape[0],
             f"cache_batch_idx: indices must be below the cache's batch size {k_cache.shape[0]}")
    seqlens = cache_seqlens.long()
    seqlen_new = 0 if k is None else k.shape[1]
    lengths = seqlens + seqlen_new
    _require(lengths.numel() == 0 or (int(seqlens.min()) >= 0 and int(lengths.max()) <= capacity),
             f"cache_seqlens: cache_seqlens + seqlen_new must lie in [0, {capacity}] (the cache's length)")
    start = cache_leftpad.long() if cache_leftpad is not None else torch.zeros_like(seqlens)
    _require(bool((start <= lengths).all()) and bool((start >= 0).all()),
             "cache_leftpad: must lie in [0, cache_seqlens + seqlen_new]")

    rotary = rotary_cos is not None
    if rotary:
        _require(k is not None, "rotary_cos: rotary embeddings need the new k and v to append")
        _require(rotary_sin is not None, "rotary_sin: expected a tensor when rotary_cos is given")
        local = causal or window_left >= 0 or window_right >= 0
        q_positions = seqlens.view(-1, 1) + (torch.arange(seqlen_q, device=device) if local else 0)
        q = rotate(q, rotary_cos, rotary_sin, q_positions.expand(batch, seqlen_q), rotary_interleaved)
    if k is not None:
        _require(v is not None and v.shape == k.shape, "v: expected a tensor shaped like k")
        new_positions = seqlens.view(-1, 1) + torch.arange(seqlen_new, device=device)
        if rotary:
            k = rotate(k, rotary_cos, rotary_sin, new_positions, rotary_interleaved)
        targets = _cache_rows(rows.view(-1, 1), new_positions, k_cache, block_table).flatten()
        k_cache.view(-1, *k_cache.shape[2:])[targets] = k.reshape(-1, *k.shape[2:]).to(k_cache.dtype)
        v_cache.view(-1, *v_cache.shape[2:])[targets] = v.reshape(-1, *v.shape[2:]).to(v_cache.dtype)

    used = lengths - start
    cu_seqlens_k = torch.nn.functional.pad(torch.cumsum(used, 0), (1, 0)).int()
    total = int(cu_seqlens_k[-1]) if batch else 0
    sequence = torch.repeat_interleave(torch.arange(batch, device=device), used, output_size=total)
    position = start[sequence] + torch.arange(total, device=device) - cu_seqlens_k[:-1].long()[sequence]
    sources = _cache_rows(rows[sequence], position, k_cache, block_table)
    keys = k_cache.view(-1, *k_cache.shape[2:])[sources]
    values = v_cache.view(-1, *v_cache.shape[2:])[sources]
    cu_seqlens_q = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, device=device, dtype=torch.int32)
    options = Options(softmax_scale, causal, window_left, window_right, softcap, 0.0, False)
    out, lse, _, _ = attention_forward(q.reshape(batch * seqlen_q, *q.shape[2:]), keys, values, cu_seqlens_q,
                                       cu_seqlens_k, None, alibi_slopes, seqlen_q, int(used.max()) if batch else 0,
                                       False, options)
    return out.view(q.shape), lse.view(lse.shape[0], batch, seqlen_q).transpose(0, 1).contiguous()


@forward_with_kvcache.register_fake
def _(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
      softmax_scale, causal, window_left, window_right, softcap, rotary_interleaved, alibi_slopes):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device))


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """FA2's decoding entry point (see the module docstring). num_splits only changes FA2's reduction order
    and is accepted for compatibility. Returns out, or (out, softmax_lse (batch, nheads, seqlen_q))."""
    if len(window_size) != 2:
        raise _errors.InvalidArgumentError(f"window_size: expected (left, right), got {window_size!r}")
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** (-0.5)
    if cache_seqlens is None:
        length = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
        cache_seqlens = torch.full((q.shape[0],), length - (0 if k is None else k.shape[1]), dtype=torch.int32,
                                   device=q.device)
    elif isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    out, lse = forward_with_kvcache(maybe_contiguous(q), k_cache, v_cache, maybe_contiguous(k), maybe_contiguous(v),
                                    rotary_cos, rotary_sin, cache_seqlens,
                                    cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal,
                                    int(window_size[0]), int(window_size[1]), 0.0 if softcap is None else softcap,
                                    rotary_interleaved, alibi_slopes)
    return (out, lse) if return_softmax_lse else out
