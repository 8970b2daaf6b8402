"""The torch.library custom ops over the C API, with fake implementations (torch.compile) and autograd.

`flash_attn_plus::fwd` serves the dense and the varlen layout (varlen when cu_seqlens_q is given) and FA2's
paged KV cache (`block_table`); `flash_attn_plus::bwd` is its gradient. Outputs are allocated here through
torch; everything else (every argument check included) happens in the C library.

Dropout draws (seed, offset) from torch's generator of the tensors' device inside the op, the way FA2
does: on CUDA the Philox offset of torch's CUDA generator is advanced, on the CPU one 63-bit seed is drawn
from torch's CPU generator. torch.utils.checkpoint saves and restores those generator states, so a
recomputation reproduces the mask. The (seed, offset) pair is returned as `rng_state` (int64, CPU) and
replayed by the backward.
"""
import contextlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _errors, backends, flaggems
from ._library import _C
from ._tensors import spec, stream_of, workspace_allocator

_UINT64 = 1 << 64


def round_multiple(x, m):
    return (x + m - 1) // m * m


def _device_guard(tensor):
    # Also where torch's current device is already the tensor's: entering it makes the device's context
    # current on this thread (autograd runs CUDA backwards on a thread of its own).
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def _draw_dropout_rng(device, increment):
    """(seed, offset) for one dropout call, from torch's generator of `device`."""
    if device.type == "cuda":
        generator = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
        seed, offset = generator.initial_seed(), generator.get_offset()
        generator.set_offset(offset + increment)  # as FA2: batch * heads * 32, a multiple of 4
        return seed, offset
    return int(torch.randint(0, (1 << 63) - 1, (), dtype=torch.int64)), 0


def _options(softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, dropout_p, seed=0, offset=0,
             deterministic=False):
    return (float(softmax_scale), bool(causal), int(window_left), int(window_right), float(softcap),
            spec(alibi_slopes), float(dropout_p), seed % _UINT64, offset % _UINT64, bool(deterministic))


def _check_for_python_backend(status):
    """The core's verdict on a call a Python-served backend will run: argument errors are raised; that the
    library itself could not run the call (no usable CUDA backend, a feature it lacks) does not matter."""
    if status not in (_C.SUCCESS, _C.ERROR_BACKEND_UNAVAILABLE, _C.ERROR_UNSUPPORTED):
        _errors.check(status)


def _forward_shapes(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, with_probs):
    """Shapes of (softmax_lse, S_dmask). Inputs of the wrong rank get empty shapes: the C library then
    rejects them with a message naming the argument."""
    if cu_seqlens_q is not None:
        lse = (q.shape[1], q.shape[0]) if q.dim() == 3 else (0,)
        batch, heads, rows, cols = cu_seqlens_q.shape[0] - 1, q.shape[-2], max_seqlen_q, max_seqlen_k
    else:
        lse = (q.shape[0], q.shape[2], q.shape[1]) if q.dim() == 4 else (0,)
        if q.dim() != 4 or k.dim() != 4:
            return lse, (0,)
        batch, heads, rows, cols = q.shape[0], q.shape[2], q.shape[1], k.shape[1]
    probs = (batch, heads, round_multiple(rows, 128), round_multiple(cols, 128)) if with_probs else (0,)
    return lse, probs


def _forward_outputs(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, with_probs):
    lse_shape, probs_shape = _forward_shapes(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, with_probs)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    probs = torch.empty(probs_shape, dtype=q.dtype, device=q.device)
    return out, lse, probs


def _gather_pages(k_cache, v_cache, block_table, cu_seqlens_k):
    """FA2's paged KV cache as packed varlen keys: sequence b's key t is row t % page of block
    block_table[b, t // page]. Checked here: the paged layout exists only in the Python API."""
    if cu_seqlens_k is None:
        raise _errors.InvalidArgumentError("block_table: a paged KV cache needs cu_seqlens_k (the varlen layout)")
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != cu_seqlens_k.shape[0] - 1:
        raise _errors.InvalidArgumentError(
            f"block_table: expected int32 (batch={cu_seqlens_k.shape[0] - 1}, max_blocks), got {block_table.dtype} "
            f"{tuple(block_table.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise _errors.InvalidArgumentError(
            f"k, v: a paged cache is (num_blocks, page_block_size, heads_k, head_dim) for both, got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    num_blocks, page = k_cache.shape[0], k_cache.shape[1]
    lengths = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    if block_table.numel() and (int(block_table.min()) < 0 or int(block_table.max()) >= num_blocks):
        raise _errors.InvalidArgumentError(f"block_table: block indices must lie in [0, {num_blocks})")
    if lengths.numel() and int(lengths.max()) > block_table.shape[1] * page:
        raise _errors.InvalidArgumentError(
            f"block_table: a sequence of {int(lengths.max())} keys needs more than its {block_table.shape[1]} "
            f"blocks of {page}")
    total = int(cu_seqlens_k[-1])
    batch = torch.repeat_interleave(torch.arange(lengths.numel(), device=k_cache.device), lengths, output_size=total)
    position = torch.arange(total, device=k_cache.device) - cu_seqlens_k[:-1].long()[batch]
    rows = block_table.long()[batch, position // page] * page + position % page
    return k_cache.reshape(-1, *k_cache.shape[2:])[rows], v_cache.reshape(-1, *v_cache.shape[2:])[rows]


@torch.library.custom_op("flash_attn_plus::fwd", mutates_args=())
def attention_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                      block_table: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                      causal: bool, window_left: int, window_right: int, softcap: float,
                      alibi_slopes: Optional[Tensor], dropout_p: float, return_softmax: bool,
                      deterministic: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, softmax_lse, S_dmask, rng_state); S_dmask is empty unless return_softmax and dropout_p > 0."""
    varlen = cu_seqlens_q is not None
    if block_table is not None:
        k, v = _gather_pages(k, v, block_table, cu_seqlens_k)
    out, lse, probs = _forward_outputs(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, return_softmax and dropout_p > 0)
    if backends.python_backend() == "flaggems":
        reason = flaggems.fallback_reason(varlen, causal, window_left, window_right, softcap, alibi_slopes, dropout_p)
        if not reason:
            options = _options(softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, 0.0)
            _check_for_python_backend(_C.check_forward(varlen, spec(q), spec(k), spec(v), spec(out), spec(lse),
                                                       spec(cu_seqlens_q), spec(cu_seqlens_k), max_seqlen_q,
                                                       max_seqlen_k, options))
            flaggems.check_tensors(q)
            with _device_guard(q):
                flaggems.forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 softmax_scale, causal, window_left, window_right, softcap, alibi_slopes)
            return out, lse, probs, torch.zeros(2, dtype=torch.int64)
        flaggems.warn_fallback(reason)
    seed = offset = 0
    if dropout_p > 0:
        batch = cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0]
        seed, offset = _draw_dropout_rng(q.device, max(batch, 1) * q.shape[-2] * 32)
    options = _options(softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, dropout_p, seed, offset)
    allocate, _workspace = workspace_allocator(q.device)
    with _device_guard(q):
        _errors.check(_C.forward(varlen, spec(q), spec(k), spec(v), spec(out), spec(lse),
                                 spec(probs) if probs.numel() else None, spec(cu_seqlens_q), spec(cu_seqlens_k),
                                 max_seqlen_q, max_seqlen_k, options, stream_of(q), allocate))
    signed = [value - _UINT64 if value >= 1 << 63 else value for value in (seed, offset)]
    return out, lse, probs, torch.tensor(signed, dtype=torch.int64)


@attention_forward.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      window_left, window_right, softcap, alibi_slopes, dropout_p, return_softmax, deterministic):
    out, lse, probs = _forward_outputs(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, return_softmax and dropout_p > 0)
    return out, lse, probs, torch.empty(2, dtype=torch.int64)


@torch.library.custom_op("flash_attn_plus::bwd", mutates_args=())
def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor,
                       cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int,
                       max_seqlen_k: int, softmax_scale: float, causal: bool, window_left: int, window_right: int,
                       softcap: float, alibi_slopes: Optional[Tensor], dropout_p: float, rng_state: Tensor,
                       deterministic: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for the forward that produced out, softmax_lse and rng_state (on the library's backend,
    whichever backend ran the forward)."""
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    seed, offset = rng_state.tolist() if dropout_p > 0 else (0, 0)
    options = _options(softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, dropout_p, seed, offset,
                       deterministic)
    allocate, _workspace = workspace_allocator(q.device)
    with _device_guard(q):
        _errors.check(_C.backward(cu_seqlens_q is not None, spec(q), spec(k), spec(v), spec(out), spec(dout),
                                  spec(softmax_lse), spec(dq), spec(dk), spec(dv), spec(cu_seqlens_q),
                                  spec(cu_seqlens_k), max_seqlen_q, max_seqlen_k, options, stream_of(q), allocate))
    return dq, dk, dv


@attention_backward.register_fake
def _(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      window_left, window_right, softcap, alibi_slopes, dropout_p, rng_state, deterministic):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
     window_right, softcap, alibi_slopes, dropout_p, _return_softmax, deterministic) = inputs
    out, lse, _probs, rng_state = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state)
    ctx.set_materialize_grads(False)  # no zero tensors for the gradients of lse, S_dmask and rng_state (unused)
    ctx.paged = block_table is not None
    ctx.settings = (max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap, dropout_p,
                    deterministic)


def _backward(ctx, dout, _dlse, _dprobs, _drng):
    if ctx.paged:
        raise _errors.UnsupportedError("block_table: there is no backward through a paged KV cache "
                                       "(FlashAttention-2 has none either)")
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state = ctx.saved_tensors
    max_q, max_k, scale, causal, left, right, softcap, dropout_p, deterministic = ctx.settings
    if dout is None:  # the loss does not depend on out
        dout = torch.zeros_like(out)
    elif dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, causal,
                                    left, right, softcap, alibi_slopes, dropout_p, rng_state, deterministic)
    return (dq, dk, dv) + (None,) * 14


attention_forward.register_autograd(_backward, setup_context=_setup_context)
