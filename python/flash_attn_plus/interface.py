"""FlashAttention-2's public functions (flash_attn.flash_attn_interface), same names, arguments, defaults and
return values, over the flash_attn_plus custom ops. The contract is FlashAttention-2 2.8's (its docstrings and
flash_api.cpp); docs/python.md lists where this package differs.
"""
import operator

import torch

from . import _errors
from .ops import Options, attention_backward, attention_forward, rng_state_tensor, round_multiple

# FA2 exports this flag (the ROCm Triton path); there is no such path here.
USE_TRITON_ROCM = False


def maybe_contiguous(x):
    return x.contiguous() if x is not None and x.stride(-1) != 1 else x


def _get_block_size_n(device, head_dim, is_dropout, is_causal):
    """The key-block width FA2's tests use to decode S_dmask. Our S_dmask holds exp(s - m) with m the
    maximum over the whole row, which is FA2's encoding for a single block, so the block spans any row."""
    return 1 << 30


def window_pair(window_size):
    """window_size as FA2 takes it: a pair of ints (each passed to its kernels as a 32-bit int; negative: no bound
    on that side)."""
    try:
        left, right = window_size
        sides = operator.index(left), operator.index(right)
    except (TypeError, ValueError):
        raise _errors.InvalidArgumentError(f"window_size: expected a pair of ints (left, right), got {window_size!r}") \
            from None
    if any(not -2**31 <= side < 2**31 for side in sides):
        raise _errors.InvalidArgumentError(f"window_size: expected ints in [-2^31, 2^31), got {window_size!r}")
    return sides


def _require_tensors(**tensors):
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")


def _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
               window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table=None):
    _require_tensors(q=q, k=k, v=v)
    q, k, v = maybe_contiguous(q), maybe_contiguous(k), maybe_contiguous(v)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** (-0.5)
    left, right = window_pair(window_size)
    options = Options(softmax_scale, causal, left, right, 0.0 if softcap is None else softcap, dropout_p, deterministic)
    out, lse, probs, _ = attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, alibi_slopes,
                                           int(max_seqlen_q), int(max_seqlen_k), bool(return_attn_probs), options)
    return (out, lse, probs) if return_attn_probs else out


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                              alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv: (batch, seqlen, 3, nheads, headdim). Returns out (batch, seqlen, nheads, headdim), or
    (out, softmax_lse (batch, nheads, seqlen), S_dmask) with return_attn_probs=True."""
    _require_tensors(qkv=qkv)
    q, k, v = qkv.unbind(dim=2)
    return _attention(q, k, v, None, None, 0, 0, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                      deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                             alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q: (batch, seqlen_q, nheads, headdim), kv: (batch, seqlen_k, 2, nheads_k, headdim)."""
    _require_tensors(kv=kv)
    k, v = kv.unbind(dim=2)
    return _attention(q, k, v, None, None, 0, 0, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                      deterministic, return_attn_probs)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q: (batch, seqlen_q, nheads, headdim), k, v: (batch, seqlen_k, nheads_k, headdim), nheads % nheads_k == 0.
    causal aligns to the bottom-right corner; window_size (left, right) keeps keys j with
    i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right (-1: unbounded)."""
    return _attention(q, k, v, None, None, 0, 0, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                      deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv: (total, 3, nheads, headdim); cu_seqlens int32 (batch + 1). softmax_lse is (nheads, total)."""
    _require_tensors(qkv=qkv, cu_seqlens=cu_seqlens)
    q, k, v = qkv.unbind(dim=1)
    return _attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                      window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q: (total_q, nheads, headdim), kv: (total_k, 2, nheads_k, headdim)."""
    _require_tensors(kv=kv, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    k, v = kv.unbind(dim=1)
    return _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                      causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """q: (total_q, nheads, headdim), k, v: (total_k, nheads_k, headdim), or with block_table (batch, max_blocks)
    int32 a paged cache (num_blocks, page_block_size, nheads_k, headdim) (any page size)."""
    _require_tensors(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    return _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                      causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table)


# FA2's lower-level helpers, which some libraries import. Same signatures and returns as FA2 2.8.


def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left=-1, window_size_right=-1,
                        softcap=0.0, alibi_slopes=None, return_softmax=False):
    """Returns (out, softmax_lse, S_dmask, rng_state)."""
    return _forward_with_rng_state(q, k, v, None, None, 0, 0, dropout_p, softmax_scale, causal, window_size_left,
                                   window_size_right, softcap, alibi_slopes, return_softmax, None, None)


def _forward_with_rng_state(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                            causal, window_size_left, window_size_right, softcap, alibi_slopes, return_softmax,
                            block_table, seqused_k):
    q, k, v = maybe_contiguous(q), maybe_contiguous(k), maybe_contiguous(v)
    options = Options(softmax_scale, causal, window_size_left, window_size_right, softcap, dropout_p, False)
    out, lse, probs, rng = attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, alibi_slopes,
                                             int(max_seqlen_q), int(max_seqlen_k), bool(return_softmax), options,
                                             seqused_k)
    return out, lse, probs if probs is not None else q.new_empty((0,)), rng_state_tensor(rng, q.device)


def _unsupported_argument(name):
    raise _errors.UnsupportedError(f"{name}: not implemented by flash_attn_plus yet (pass None)")


def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                               softmax_scale, causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
                               alibi_slopes=None, return_softmax=False, block_table=None, leftpad_k=None,
                               seqused_k=None, zero_tensors=False):
    """Returns (out, softmax_lse (nheads, total_q), S_dmask, rng_state)."""
    if leftpad_k is not None:
        _unsupported_argument("leftpad_k")
    return _forward_with_rng_state(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                   softmax_scale, causal, window_size_left, window_size_right, softcap, alibi_slopes,
                                   return_softmax, block_table, seqused_k)


def _softmax_d(dout, out, varlen, cu_seqlens_q):
    """FA2's second backward output: rowsum(dout * out) in fp32, (batch, nheads, round128(seqlen_q)) or
    (nheads, total_q + 128 * batch)."""
    d = (dout.float() * out.float()).sum(-1)
    if varlen:
        pad = 128 * (cu_seqlens_q.shape[0] - 1)
        return torch.nn.functional.pad(d.transpose(0, 1), (0, pad))
    return torch.nn.functional.pad(d.transpose(1, 2), (0, round_multiple(d.shape[1], 128) - d.shape[1]))


def _backward_into(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap, alibi_slopes,
                   deterministic, rng_state):
    dout, q, k, v, out = (maybe_contiguous(x) for x in (dout, q, k, v, out))
    if rng_state is None:
        rng_state = torch.zeros(2, dtype=torch.int64)
    options = Options(softmax_scale, causal, window_size_left, window_size_right, softcap, dropout_p, deterministic)
    grads = attention_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
                               int(max_seqlen_q), int(max_seqlen_k), rng_state, options)
    for target, grad in zip((dq, dk, dv), grads):
        if target is not None:
            target.copy_(grad)
    return _softmax_d(dout, out, cu_seqlens_q is not None, cu_seqlens_q)


def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                         window_size_left, window_size_right, softcap, alibi_slopes, deterministic, rng_state=None):
    """Writes dq, dk, dv in place; returns softmax_d."""
    return _backward_into(dout, q, k, v, out, softmax_lse, dq, dk, dv, None, None, 0, 0, dropout_p, softmax_scale,
                          causal, window_size_left, window_size_right, softcap, alibi_slopes, deterministic, rng_state)


def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
                                softcap, alibi_slopes, deterministic, rng_state=None, zero_tensors=False):
    """Writes dq, dk, dv in place; returns softmax_d."""
    return _backward_into(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
                          alibi_slopes, deterministic, rng_state)
