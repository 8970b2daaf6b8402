"""A float64 (or plain low-precision) PyTorch attention with FlashAttention-2's exact semantics, written
from FA2's contract (docs/fa2-api.md in the shared docs), independently of the library."""
import math

import torch


def normalized_window(causal, window, seqlen_k):
    """FA2's rules: causal sets right = 0; a side >= seqlen_k is unbounded; a one-sided window gets
    seqlen_k on its unbounded side."""
    left, right = window
    if causal:
        right = 0
    left = -1 if left >= seqlen_k else left
    right = -1 if right >= seqlen_k else right
    if left < 0 and right >= 0:
        left = seqlen_k
    if left >= 0 and right < 0:
        right = seqlen_k
    return left, right


def allowed_keys(seqlen_q, seqlen_k, causal, window, window_seqlen_k=None, device="cpu"):
    """(seqlen_q, seqlen_k) bool: key j allowed for query i (bottom-right aligned)."""
    left, right = normalized_window(causal, window, seqlen_k if window_seqlen_k is None else window_seqlen_k)
    i = torch.arange(seqlen_q, device=device).view(-1, 1)
    j = torch.arange(seqlen_k, device=device).view(1, -1)
    diagonal = i + seqlen_k - seqlen_q
    allowed = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        allowed &= j <= diagonal + right
    if left >= 0:
        allowed &= j >= diagonal - left
    return allowed


def attention(q, k, v, softmax_scale=None, causal=False, window=(-1, -1), softcap=0.0, alibi_slopes=None,
              keep=None, dropout_p=0.0, dtype=torch.float64, window_seqlen_k=None):
    """q (B, Sq, H, D), k/v (B, Sk, Hk, D). Computes in `dtype` (float64: the reference; the inputs' own
    dtype: what plain PyTorch does in low precision). keep: (B, H, Sq, Sk) bool dropout mask.
    Returns (out in `dtype`, lse (B, H, Sq) float64 with +inf on empty rows)."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, heads_k = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    qf, kf, vf = (x.to(dtype) for x in (q, k, v))
    kf = kf.repeat_interleave(heads // heads_k, dim=2)
    vf = vf.repeat_interleave(heads // heads_k, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", qf * scale, kf)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = allowed_keys(seqlen_q, seqlen_k, causal, window, window_seqlen_k, q.device)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dtype).view(-1 if alibi_slopes.dim() == 2 else 1, heads, 1, 1)
        i = torch.arange(seqlen_q, device=q.device).view(-1, 1)
        j = torch.arange(seqlen_k, device=q.device).view(1, -1)
        distance = (i + seqlen_k - seqlen_q - j).abs().to(dtype)
        scores = scores - slopes * distance
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores.double(), dim=-1)
    empty = ~allowed.any(dim=-1)
    lse = lse.masked_fill(empty, float("inf"))
    # Rows with no allowed key give 0 (FA2); softmax runs on a finite stand-in so no NaN reaches the gradient.
    empty_rows = empty.view(1, 1, seqlen_q, 1)
    probs = torch.softmax(scores.masked_fill(empty_rows, 0.0), dim=-1).masked_fill(empty_rows, 0.0)
    if keep is not None:
        probs = probs.masked_fill(~keep, 0.0) / (1.0 - dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vf)
    return out, lse


def rotate_reference(x, cos, sin, positions, interleaved):
    """x (seqlen, heads, head_dim) in float64, rotated at integer positions (seqlen,)."""
    x = x.double().clone()
    half = cos.shape[-1]
    for t, position in enumerate(positions.tolist()):
        c, s = cos[position].double(), sin[position].double()
        for i in range(half):
            a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
            xa, xb = x[t, :, a].clone(), x[t, :, b].clone()
            x[t, :, a], x[t, :, b] = xa * c[i] - xb * s[i], xa * s[i] + xb * c[i]
    return x
