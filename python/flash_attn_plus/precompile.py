"""Compiling the CUDA kernels ahead of use (warm-up before serving or training, or filling a shared cache).

A kernel configuration depends only on the dtype, the head dim and which features are on (mask, softcap,
ALiBi, dropout), never on batch size or sequence lengths, so the library compiles (or loads from the disk
cache) exactly the kernels later calls will use from that list alone (`fap_precompile` in the C API). It prints
a line per kernel it compiles ("flash_attn_plus: compiling ...") unless FLASH_ATTENTION_PLUS_JIT_QUIET is set.
"""
import itertools

import torch

from . import _errors
from ._library import _C
from ._tensors import dtype_code


def precompile(head_dims, dtypes=(torch.bfloat16,), causal=(False, True), window=(False,), softcap=(False,),
               alibi=(False,), dropout=(False,), backward=True, device=None):
    """Compiles the forward (and with backward=True the backward) kernels for every combination of the
    arguments (each a tuple of the values to cover). Returns the combinations, as dicts, in order."""
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda":
        raise _errors.InvalidArgumentError(f"device: precompile compiles CUDA kernels, got {device}")
    done, specs = [], []
    for head_dim, dtype, is_causal, has_window, has_softcap, has_alibi, has_dropout in itertools.product(
            head_dims, dtypes, causal, window, softcap, alibi, dropout):
        for direction in (False, True) if backward else (False,):
            # A causal mask is the window (left, 0): the same kernels.
            specs.append((direction, dtype_code(dtype), int(head_dim), bool(is_causal or has_window),
                          bool(has_softcap), bool(has_alibi), bool(has_dropout)))
        done.append({"head_dim": head_dim, "dtype": dtype, "causal": is_causal, "window": has_window,
                     "softcap": has_softcap, "alibi": has_alibi, "dropout": has_dropout})
    index = device.index if device.index is not None else torch.cuda.current_device()
    _errors.check(_C.precompile(specs, index))
    return done
