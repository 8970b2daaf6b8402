"""Rotary position embeddings in plain PyTorch (differentiable through autograd), with FA2's conventions:
cos/sin are (seqlen_ro, rotary_dim / 2); interleaved=True rotates pairs (0, 1), (2, 3), ... (GPT-J),
False rotates the halves (i, i + rotary_dim / 2) (GPT-NeoX); dimensions past rotary_dim are untouched.
The rotation is computed in float32 and rounded once, as FA2's Triton kernel does.
"""
import torch

from . import _errors


def rotate(x, cos, sin, positions, interleaved=False, conjugate=False):
    """x (..., seqlen, nheads, headdim) rotated by the angles at `positions` (an integer tensor broadcastable
    to x's (..., seqlen)); returns a new tensor."""
    half = cos.shape[-1]
    rotary_dim = 2 * half
    if rotary_dim > x.shape[-1]:
        raise _errors.InvalidArgumentError(f"cos: rotary_dim {rotary_dim} (2 * cos.shape[-1]) exceeds headdim {x.shape[-1]}")
    if cos.shape != sin.shape:
        raise _errors.InvalidArgumentError(f"sin: expected the shape of cos {tuple(cos.shape)}, got {tuple(sin.shape)}")
    if positions.numel() and int(positions.max()) >= cos.shape[0]:  # an index past cos would fault on the GPU
        raise _errors.InvalidArgumentError(
            f"cos: has {cos.shape[0]} positions (seqlen_ro), position {int(positions.max())} is needed")
    c = cos.float()[positions].unsqueeze(-2)
    s = sin.float()[positions].unsqueeze(-2)
    if conjugate:
        s = -s
    part = x[..., :rotary_dim].float()
    if interleaved:
        x1, x2 = part[..., 0::2], part[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = part[..., :half], part[..., half:]
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)


def _positions(x, seqlen_offsets, cu_seqlens, max_seqlen):
    device = x.device
    if cu_seqlens is None:
        positions = torch.arange(x.shape[1], device=device)
        offsets = seqlen_offsets.to(device).long().view(-1, 1) if torch.is_tensor(seqlen_offsets) else seqlen_offsets
        return (positions + offsets).expand(x.shape[0], -1) if torch.is_tensor(offsets) else positions + offsets
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    sequence = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=x.shape[0])
    positions = torch.arange(x.shape[0], device=device) - cu_seqlens[:-1].long()[sequence]
    if torch.is_tensor(seqlen_offsets):
        return positions + seqlen_offsets.to(device).long()[sequence]
    return positions + seqlen_offsets


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     max_seqlen=None):
    """FA2's flash_attn.layers.rotary.apply_rotary_emb: x (batch, seqlen, nheads, headdim), or
    (total, nheads, headdim) with cu_seqlens; seqlen_offsets an int or a (batch,) tensor."""
    rotated = rotate(x, cos, sin, _positions(x, seqlen_offsets, cu_seqlens, max_seqlen), interleaved)
    if inplace:
        return x.copy_(rotated)
    return rotated


def apply_rotary(x, cos, sin, seqlen_offsets=0, cu_seqlens=None, max_seqlen=None, interleaved=False, inplace=False,
                 conjugate=False):
    """FA2's flash_attn.ops.triton.rotary.apply_rotary (same arguments), in PyTorch."""
    rotated = rotate(x, cos, sin, _positions(x, seqlen_offsets, cu_seqlens, max_seqlen), interleaved, conjugate)
    return x.copy_(rotated) if inplace else rotated
