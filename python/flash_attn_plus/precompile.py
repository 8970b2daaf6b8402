"""Compiling the CUDA kernels ahead of use (warm-up before serving or training, or filling a shared cache).

A kernel configuration depends only on the dtype, the head dim and which features are on (mask, softcap,
ALiBi, dropout), never on batch size or sequence lengths, so one tiny call per combination compiles (or
loads from the disk cache) exactly the kernels later calls will use. The library prints a line per kernel
it compiles ("flash_attn_plus: compiling ...") unless FLASH_ATTENTION_PLUS_JIT_QUIET is set.
"""
import itertools

import torch

from . import _errors
from .interface import flash_attn_func


def precompile(head_dims, dtypes=(torch.bfloat16,), causal=(False, True), window=(False,), softcap=(False,),
               alibi=(False,), dropout=(False,), backward=True, device=None):
    """Compiles the forward (and with backward=True the backward) kernels for every combination of the
    arguments (each a tuple of the values to cover). Returns the combinations, as dicts, in order."""
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda":
        raise _errors.InvalidArgumentError(f"device: precompile compiles CUDA kernels, got {device}")
    done = []
    for head_dim, dtype, is_causal, has_window, has_softcap, has_alibi, has_dropout in itertools.product(
            head_dims, dtypes, causal, window, softcap, alibi, dropout):
        q, k, v = (torch.randn(1, 2, 2, head_dim, device=device, dtype=dtype, requires_grad=backward)
                   for _ in range(3))
        out = flash_attn_func(q, k, v, dropout_p=0.1 if has_dropout else 0.0, causal=is_causal,
                              window_size=(1, 1) if has_window else (-1, -1), softcap=5.0 if has_softcap else 0.0,
                              alibi_slopes=torch.ones(2, device=device) if has_alibi else None)
        if backward:
            out.sum().backward()
        done.append({"head_dim": head_dim, "dtype": dtype, "causal": is_causal, "window": has_window,
                     "softcap": has_softcap, "alibi": has_alibi, "dropout": has_dropout})
    torch.cuda.synchronize(device)
    return done
