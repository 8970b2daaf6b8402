"""The `flaggems` backend: FlashAttention-2's forward on FlagGems' Triton kernels (`flag_gems.ops.flash_api`,
PyPI `flag-gems`), the backend FlashAttention-Plus started from.

What it serves and what it leaves to the library (docs/backends.md has the table):
- the forward of every function (dense, varlen, the paged KV cache once gathered, the KV-cache API) with
  MQA/GQA and the LSE, full or causal attention (causal in the dense layout); head dims FlagGems does not
  take (it wants multiples of 32) are zero-padded here, the scale being that of the real head dim;
- calls with dropout run on the library's backend, with a one-time warning: FlagGems draws its own dropout
  mask, which no backward (ours or FA2's) can replay, and returns no S_dmask without it;
- so do calls with ALiBi, softcap, a sliding window, or causal masks over variable lengths: FlagGems 5.0.2
  got them wrong in this package's test suite (measured on the H100 and H200);
- every backward runs on the library's backend, from FlagGems' output and LSE (FlagGems has no FA2-style
  backward);
- arguments are checked by the library's core first, so errors read the same on every backend.

Whether it can run is decided once per process: the package must import, and one tiny forward must
compile and run (a FlagGems release can fail to build its kernels with a newer Triton than it was tested
with; that is reported as the reason, never a crash of the caller).
"""
import functools
import importlib
import importlib.util
import math
import warnings

import torch
import torch.nn.functional as F

from . import _errors


@functools.lru_cache(maxsize=None)
def _flash_api():
    return importlib.import_module("flag_gems.ops.flash_api")


def versions():
    """'flag_gems X, triton Y' (for messages and info())."""
    import flag_gems
    import triton
    return f"flag_gems {getattr(flag_gems, '__version__', '?')}, triton {triton.__version__}"


def _import_problem():
    if importlib.util.find_spec("flag_gems") is None:
        return "the flag_gems package is not installed (pip install flash-attn-plus[flaggems])"
    try:
        _flash_api()
    except Exception as error:  # noqa: BLE001 - any failure of a third-party import is a reason, not a crash
        return f"importing flag_gems failed: {type(error).__name__}: {error}"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (FlagGems' kernels run on the GPU)"
    return ""


@functools.lru_cache(maxsize=None)
def unusable_reason():
    """'' when the backend can run, else why not (import, device, or its kernels failing to build/run)."""
    problem = _import_problem()
    if problem:
        return problem
    try:
        q = torch.randn(1, 16, 2, 32, device="cuda", dtype=torch.float16)
        out = torch.empty_like(q)
        lse = torch.empty(1, 2, 16, device="cuda")
        forward(q, q, q, out, lse, None, None, 16, 16, 32 ** -0.5, True, -1, -1, 0.0, None)
        expected = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, q, q)),
                                                                    is_causal=True).transpose(1, 2)
        torch.cuda.synchronize()
        if not torch.allclose(out.float(), expected.float(), atol=2e-2):
            return f"its attention kernel gave wrong results on this GPU ({versions()})"
    except Exception as error:  # noqa: BLE001 - e.g. a Triton that this FlagGems release cannot compile for
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"its attention kernel failed to build or run ({versions()}): {type(error).__name__}: {first_line}"
    return ""


def check_tensors(q):
    """FlagGems runs float16/bfloat16 CUDA tensors, as FlashAttention-2 does; anything else is refused (an
    explicitly chosen backend never moves data to another device)."""
    if q.device.type != "cuda":
        raise _errors.UnsupportedError(f"q: backend 'flaggems' runs on CUDA tensors, got {q.device.type} tensors")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise _errors.UnsupportedError(f"q: backend 'flaggems' takes float16 and bfloat16, got {q.dtype}")


# Features whose FlagGems results failed FlashAttention-2's accuracy rule in this package's test suite
# (flag_gems 5.0.2, Triton 3.6, H100/H200; bench/RESULTS.md): calls using them run on the library's backend.
_MEASURED_WRONG = "its results failed FlashAttention-2's accuracy rule in this package's tests (flag_gems 5.0.2)"


def fallback_reason(varlen, causal, window_left, window_right, softcap, alibi_slopes, dropout_p):
    """Why this call goes to the library's backend instead ('' when FlagGems serves it)."""
    if dropout_p > 0:
        return ("dropout: FlagGems draws its own mask, which the backward cannot replay; calls with dropout run on "
                "the library's backend")
    if alibi_slopes is not None:
        return f"alibi_slopes: {_MEASURED_WRONG}; calls with ALiBi run on the library's backend"
    if softcap > 0:
        return f"softcap: {_MEASURED_WRONG}; calls with softcap run on the library's backend"
    if window_left >= 0 or (window_right >= 0 and not causal):
        return f"window_size: {_MEASURED_WRONG}; sliding-window calls run on the library's backend"
    if varlen and causal:
        return (f"causal with variable lengths (varlen, KV cache): {_MEASURED_WRONG}; these calls run on the "
                f"library's backend")
    return ""


_warned = set()


def warn_fallback(reason):
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"flash_attn_plus backend 'flaggems': {reason}", stacklevel=3)


def forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
            window_left, window_right, softcap, alibi_slopes):
    """Writes out and lse (FA2's layouts) for an already validated call without dropout."""
    api = _flash_api()
    head_dim = q.shape[-1]
    padded = math.ceil(head_dim / 32) * 32  # FlagGems takes head dims in multiples of 32
    if padded != head_dim:
        q, k, v = (F.pad(t, (0, padded - head_dim)) for t in (q, k, v))
    if cu_seqlens_q is None:
        # FlagGems' split-KV path combines splits where causal rows have no keys into NaN: left out.
        result = api.mha_fwd(q, k, v, None, alibi_slopes, 0.0, softmax_scale, causal, window_left, window_right,
                             softcap, False, disable_splitkv=True)
    else:
        result = api.mha_varlan_fwd(q, k, v, None, cu_seqlens_q, cu_seqlens_k, None, None, None, alibi_slopes,
                                    max_seqlen_q, max_seqlen_k, 0.0, softmax_scale, False, causal, window_left,
                                    window_right, softcap, False, None)
    out.copy_(result[0][..., :head_dim])
    lse.copy_(result[4].reshape(lse.shape))
