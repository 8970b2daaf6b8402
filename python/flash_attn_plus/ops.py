"""The attention operations over the C API: an eager path and torch.library custom ops, with autograd.

Two routes run the same implementation (`_forward`, `_backward`):
- eager calls (nothing traces: no torch.compile, no dispatch mode such as FakeTensorMode or make_fx, plain
  tensors) go through `_AttentionFunction`, a torch.autograd.Function that calls the C library directly: the
  custom ops' dispatch layers cost more host time than everything else in a call;
- traced calls go through the custom ops `flash_attn_plus::fwd` / `flash_attn_plus::bwd`, which torch.compile,
  AOTAutograd and functorch understand (fake implementations, registered autograd).

`flash_attn_plus::fwd` serves the dense and the varlen layout (varlen when cu_seqlens_q is given) and FA2's
paged KV cache (`block_table`, read in place by the library); `flash_attn_plus::bwd` is its gradient. Outputs are allocated here through
torch; everything else (every argument check included) happens in the C library, once per call (a plan).

FA2's options travel as one `Options` tuple; the custom ops take its fields as their last parameters (a custom
op's schema lists plain values only).

Dropout draws (seed, offset) from torch's generator of the tensors' device, the way FA2 does: on CUDA the
Philox offset of torch's CUDA generator is advanced, on the CPU one 63-bit seed is drawn from torch's CPU
generator. torch.utils.checkpoint saves and restores those generator states, so a recomputation reproduces the
mask. The (seed, offset) pair is returned as `rng_state` (int64, on the tensors' device as FA2's) and replayed by
the backward.
"""
import threading
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _errors, backends, flaggems
from ._library import _C
from ._tensors import allocate_workspace, dtype_code, stream_of

_UINT64 = 1 << 64


class Options(NamedTuple):
    """FA2's options of one call, normalised by the Python API (the C library checks them)."""
    softmax_scale: float
    causal: bool
    window_left: int
    window_right: int
    softcap: float
    dropout_p: float
    deterministic: bool


def round_multiple(x, m):
    return (x + m - 1) // m * m


def _draw_dropout_rng(device, increment):
    """(seed, offset) for one dropout call, from torch's generator of `device`."""
    if device.type == "cuda":
        generator = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
        seed, offset = generator.initial_seed(), generator.get_offset()
        generator.set_offset(offset + increment)  # as FA2: batch * heads * 32, a multiple of 4
        return seed, offset
    return int(torch.randint(0, (1 << 63) - 1, (), dtype=torch.int64)), 0


def _traced(*tensors):
    """Whether torch is tracing this call (torch.compile, AOTAutograd's dispatch modes, functorch), so that it
    must go through the custom ops."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return True
    for tensor in tensors:
        if tensor is not None and (type(tensor) not in (Tensor, torch.nn.Parameter)
                                   or torch._C._functorch.is_functorch_wrapped_tensor(tensor)):
            return True
    return False


def _c_options(options):
    """Options as the extension takes them (a plain tuple of Python scalars)."""
    return (float(options.softmax_scale), bool(options.causal), int(options.window_left), int(options.window_right),
            float(options.softcap), float(options.dropout_p), bool(options.deterministic))


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


def _forward_outputs(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, return_softmax, with_probs):
    """out, softmax_lse and S_dmask (None unless asked for; empty without dropout, as FA2's)."""
    lse_shape, probs_shape = _forward_shapes(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, with_probs)
    probs = q.new_empty(probs_shape) if return_softmax else None
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32), probs


def _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, alibi_slopes, max_seqlen_q, max_seqlen_k,
             return_softmax, options):
    """(out, softmax_lse, S_dmask, (seed, offset)); S_dmask is None unless return_softmax, and empty unless
    dropout_p > 0 too."""
    varlen = cu_seqlens_q is not None
    with_probs = return_softmax and options.dropout_p > 0
    out, lse, probs = _forward_outputs(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, return_softmax, with_probs)
    # FlagGems has no paged cache or used key counts: those calls stay on the library.
    if backends.python_backend() == "flaggems" and block_table is None and seqused_k is None:
        reason = flaggems.fallback_reason(varlen, options.causal, options.window_left, options.window_right,
                                          options.softcap, alibi_slopes, options.dropout_p)
        if not reason:
            # The library's checks (fap_check_fwd), so that errors read the same on every backend.
            _errors.check(_C.check_forward(varlen, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                           max_seqlen_q, max_seqlen_k, alibi_slopes, _c_options(options)))
            flaggems.check_tensors(q)
            with torch.cuda.device(q.device):
                flaggems.forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 options.softmax_scale, options.causal, options.window_left, options.window_right,
                                 options.softcap, alibi_slopes)
            return out, lse, probs, (0, 0)
        flaggems.warn_fallback(reason)
    seed = offset = 0
    if options.dropout_p > 0:
        if q.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise _errors.UnsupportedError(
                "dropout_p: dropout inside a CUDA graph capture is not supported yet (its random offsets are read on "
                "the host when the graph is recorded, so every replay would draw the same mask)")
        batch = cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0]
        seed, offset = _draw_dropout_rng(q.device, max(batch, 1) * q.shape[-2] * 32)
    _errors.check(_C.forward(varlen, q, k, v, out, lse, probs if with_probs else None, cu_seqlens_q, cu_seqlens_k,
                             seqused_k, block_table, max_seqlen_q, max_seqlen_k, alibi_slopes, _c_options(options), seed % _UINT64,
                             offset % _UINT64, stream_of(q), allocate_workspace))
    return out, lse, probs, (seed, offset)


def _backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q, max_seqlen_k,
              rng, options):
    """(dq, dk, dv) for the forward that produced out and softmax_lse with dropout state rng = (seed, offset),
    on the library's backend whichever backend ran the forward."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    seed, offset = rng if options.dropout_p > 0 else (0, 0)
    _errors.check(_C.backward(cu_seqlens_q is not None, q, k, v, out, dout, softmax_lse, dq, dk, dv, cu_seqlens_q,
                              cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, _c_options(options),
                              seed % _UINT64, offset % _UINT64, stream_of(q), allocate_workspace))
    return dq, dk, dv


def _rng_tensor(rng, device):
    """(seed, offset) as FA2's rng_state: int64 on the tensors' device (as FA2's), the unsigned values' two's
    complement. Without dropout it is made on the device without a copy from the host: a CUDA graph can capture
    that (torch.compile's mode="reduce-overhead"), and a CPU output would split inductor's graph around the op."""
    if rng == (0, 0):
        return torch.zeros(2, dtype=torch.int64, device=device)
    return torch.tensor([value - _UINT64 if value >= 1 << 63 else value for value in rng], dtype=torch.int64).to(device)


def _rng_values(rng_state):
    return tuple(rng_state.tolist())


def rng_state_tensor(rng, device):
    """FA2's rng_state from what attention_forward returned (a tensor from the custom op, (seed, offset) from the
    eager route)."""
    return rng if isinstance(rng, Tensor) else _rng_tensor(rng, device)


@torch.library.custom_op("flash_attn_plus::fwd", mutates_args=())
def attention_forward_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor],
                         cu_seqlens_k: Optional[Tensor], seqused_k: Optional[Tensor], block_table: Optional[Tensor],
                         alibi_slopes: Optional[Tensor],
                         max_seqlen_q: int, max_seqlen_k: int, return_softmax: bool, softmax_scale: float,
                         causal: bool, window_left: int, window_right: int, softcap: float, dropout_p: float,
                         deterministic: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, softmax_lse, S_dmask, rng_state); the last seven parameters are Options' fields."""
    options = Options(softmax_scale, causal, window_left, window_right, softcap, dropout_p, deterministic)
    out, lse, probs, rng = _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, alibi_slopes,
                                    max_seqlen_q, max_seqlen_k, return_softmax, options)
    return out, lse, probs if probs is not None else q.new_empty((0,)), _rng_tensor(rng, q.device)


@attention_forward_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, alibi_slopes, max_seqlen_q, max_seqlen_k,
      return_softmax, *options):
    out, lse, probs = _forward_outputs(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, True,
                                       return_softmax and Options(*options).dropout_p > 0)
    return out, lse, probs, torch.empty(2, dtype=torch.int64, device=q.device)


@torch.library.custom_op("flash_attn_plus::bwd", mutates_args=())
def attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor,
                          cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                          alibi_slopes: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, rng_state: Tensor,
                          softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
                          dropout_p: float, deterministic: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv); the last seven parameters are Options' fields."""
    options = Options(softmax_scale, causal, window_left, window_right, softcap, dropout_p, deterministic)
    rng = _rng_values(rng_state) if dropout_p > 0 else (0, 0)
    return _backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q,
                     max_seqlen_k, rng, options)


@attention_backward_op.register_fake
def _(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q, max_seqlen_k,
      rng_state, *options):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _prepare_dout(dout, out):
    if dout is None:  # the loss does not depend on out
        return torch.zeros_like(out)
    return dout if dout.stride(-1) == 1 else dout.contiguous()


def _no_backward(name, what):
    raise _errors.UnsupportedError(f"{name}: there is no backward through {what} (FlashAttention-2 has none either)")


def _check_differentiable(block_table, seqused_k):
    if block_table is not None:
        _no_backward("block_table", "a paged KV cache")
    if seqused_k is not None:
        _no_backward("seqused_k", "used key counts")


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, alibi_slopes, max_seqlen_q, max_seqlen_k = inputs[:10]
    out, lse, _probs, rng_state = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state)
    ctx.set_materialize_grads(False)  # no zero tensors for the gradients of lse, S_dmask and rng_state (unused)
    ctx.undifferentiable = (block_table, seqused_k)
    ctx.lengths = (max_seqlen_q, max_seqlen_k)
    ctx.options = Options(*inputs[11:])


def _op_backward(ctx, dout, _dlse, _dprobs, _drng):
    _check_differentiable(*ctx.undifferentiable)
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(_prepare_dout(dout, out), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                       alibi_slopes, *ctx.lengths, rng_state, *ctx.options)
    return (dq, dk, dv) + (None,) * 15


attention_forward_op.register_autograd(_op_backward, setup_context=_setup_context)


class _Call(NamedTuple):
    """What a forward takes besides q, k and v (one argument of _AttentionFunction.apply: each argument costs
    autograd host time). Its tensors never need gradients (FA2 gives none for them)."""
    cu_seqlens_q: Optional[Tensor]
    cu_seqlens_k: Optional[Tensor]
    seqused_k: Optional[Tensor]
    block_table: Optional[Tensor]
    alibi_slopes: Optional[Tensor]
    max_seqlen_q: int
    max_seqlen_k: int
    return_softmax: bool
    options: Options


class _AttentionFunction(torch.autograd.Function):
    """The eager route: the same forward and backward without the custom ops' dispatch."""

    @staticmethod
    def forward(ctx, q, k, v, call):
        out, lse, probs, rng = _forward(q, k, v, *call)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_materialize_grads(False)
        ctx.call, ctx.rng = call, rng
        ctx.mark_non_differentiable(lse, *([probs] if probs is not None else []))
        return out, lse, probs, rng

    @staticmethod
    def backward(ctx, dout, _dlse, _dprobs, _drng):
        call = ctx.call
        _check_differentiable(call.block_table, call.seqused_k)
        q, k, v, out, lse = ctx.saved_tensors
        dout = _prepare_dout(dout, out)
        common = (dout, q, k, v, out, lse, call.cu_seqlens_q, call.cu_seqlens_k, call.alibi_slopes, call.max_seqlen_q,
                  call.max_seqlen_k)
        if _traced(dout, q):  # e.g. compiled autograd tracing this backward
            grads = attention_backward_op(*common, _rng_tensor(ctx.rng, q.device), *call.options)
        else:
            grads = _backward(*common, ctx.rng, call.options)
        return grads + (None,)


_backward_kernels_started = set()


def _compile_backward_ahead(q, alibi_slopes, options):
    """Starts compiling (or loading from the disk cache) the backward's kernels on another thread, once per kind
    of call and device: a fresh process's first training step then waits for the longer of the forward's and the
    backward's compiles rather than for their sum. Errors are left to the backward itself to report. The thread is
    not a daemon: an exiting interpreter waits for it rather than unloading the library under it."""
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    spec = (True, dtype_code(q.dtype), q.shape[-1],
            bool(options.causal or options.window_left >= 0 or options.window_right >= 0), options.softcap > 0,
            alibi_slopes is not None, options.dropout_p > 0)
    if (spec, index) in _backward_kernels_started:
        return
    _backward_kernels_started.add((spec, index))
    threading.Thread(target=_C.precompile, args=([spec], index), name="flash_attn_plus backward kernels").start()


def attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, alibi_slopes, max_seqlen_q, max_seqlen_k,
                      return_softmax, options, seqused_k=None):
    """(out, softmax_lse, S_dmask, rng_state) with autograd to q, k, v, by the eager route unless torch traces
    the call."""
    if _traced(q, k, v):
        return attention_forward_op(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, alibi_slopes,
                                    max_seqlen_q, max_seqlen_k, return_softmax, *options)
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        # Nothing for autograd to record (inference, torch.no_grad()): the call skips autograd.Function's cost.
        return _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, alibi_slopes, max_seqlen_q,
                        max_seqlen_k, return_softmax, options)
    if q.is_cuda and block_table is None and seqused_k is None:
        _compile_backward_ahead(q, alibi_slopes, options)
    return _AttentionFunction.apply(q, k, v, _Call(cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, alibi_slopes,
                                                   max_seqlen_q, max_seqlen_k, return_softmax, options))


def attention_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q,
                       max_seqlen_k, rng_state, options):
    """(dq, dk, dv) for FA2's explicit backward functions (rng_state as returned by the forward)."""
    if _traced(dout, q, k, v):
        return attention_backward_op(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
                                     max_seqlen_q, max_seqlen_k, rng_state, *options)
    rng = _rng_values(rng_state) if options.dropout_p > 0 else (0, 0)
    return _backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q,
                     max_seqlen_k, rng, options)
