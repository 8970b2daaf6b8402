"""flash_attn.bert_padding and flash_attn.layers.rotary equivalents: values, FA2's return conventions and
gradients."""
import pytest
import torch

from flash_attn_plus.bert_padding import (index_first_axis, index_first_axis_residual, index_put_first_axis, pad_input,
                                          unpad_input, unpad_input_for_concatenated_sequences)
from flash_attn_plus.rotary import apply_rotary, apply_rotary_emb
from reference import rotate_reference


@pytest.mark.parametrize("with_unused", [False, True])
def test_unpad_then_pad_round_trips(device, with_unused):
    hidden = torch.randn(3, 10, 4, 8, device=device, requires_grad=True)
    lengths = torch.tensor([10, 3, 6])
    mask = (torch.arange(10).view(1, -1) < lengths.view(-1, 1)).to(device)
    unused = None
    if with_unused:  # two tokens kept in the rows but not attended to
        unused = torch.zeros_like(mask)
        unused[1, 3:5] = True
    packed, indices, cu_seqlens, max_seqlen, used = unpad_input(hidden, mask, unused)
    extra = 2 if with_unused else 0
    assert packed.shape == (19 + extra, 4, 8) and indices.dtype == torch.int64
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 10, 13 + extra, 19 + extra]
    assert max_seqlen == 10 and isinstance(max_seqlen, int) and used.tolist() == [10, 3, 6]
    restored = pad_input(packed, indices, 3, 10)
    keep = (mask | unused) if unused is not None else mask
    assert torch.equal(restored, hidden * keep.view(3, 10, 1, 1))
    restored.sum().backward()
    assert torch.equal(hidden.grad, keep.view(3, 10, 1, 1).expand_as(hidden).float())


def test_index_helpers_and_their_gradients(device):
    x = torch.randn(6, 3, device=device, requires_grad=True)
    indices = torch.tensor([4, 0, 2], device=device)
    picked = index_first_axis(x, indices)
    assert torch.equal(picked, x[indices])
    placed = index_put_first_axis(picked, indices, 6)
    assert torch.equal(placed[indices], picked) and placed[1].abs().sum() == 0
    (placed * 2).sum().backward()
    assert torch.equal(x.grad[indices], torch.full((3, 3), 2.0, device=device)) and x.grad[1].abs().sum() == 0
    y = torch.randn(6, 3, device=device, requires_grad=True)
    picked, residual = index_first_axis_residual(y, indices)
    (picked.sum() + residual.sum()).backward()
    assert torch.equal(y.grad[indices], torch.full((3, 3), 2.0, device=device)) and torch.all(y.grad[1] == 1)


def test_unpad_for_concatenated_sequences(device):
    hidden = torch.arange(2 * 6, dtype=torch.float32, device=device).view(2, 6, 1)
    lengths = torch.tensor([[2, 3, 0, 0, 0, 0], [4, 0, 0, 0, 0, 0]], device=device)
    packed, indices, cu_seqlens, max_seqlen = unpad_input_for_concatenated_sequences(hidden, lengths)
    assert cu_seqlens.tolist() == [0, 2, 5, 9] and max_seqlen == 4
    assert packed.flatten().tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, 32])
@pytest.mark.parametrize("offsets", ["int", "tensor"])
def test_apply_rotary_emb(device, interleaved, rotary_dim, offsets):
    x = torch.randn(2, 7, 3, 32, dtype=torch.float16, device=device, requires_grad=True)
    angles = torch.rand(20, rotary_dim // 2, dtype=torch.float64, device=device) * 6
    cos, sin = angles.cos().half(), angles.sin().half()
    seqlen_offsets = 4 if offsets == "int" else torch.tensor([2, 9], device=device)
    out = apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=seqlen_offsets)
    for b in range(2):
        start = 4 if offsets == "int" else int(seqlen_offsets[b])
        expected = rotate_reference(x[b].detach(), cos, sin, torch.arange(start, start + 7), interleaved)
        assert (out[b].double() - expected).abs().max().item() < 2e-3
    # A rotation's gradient is the inverse rotation: |grad| row norms equal |upstream| row norms.
    upstream = torch.randn_like(out)
    out.backward(upstream)
    assert torch.allclose(x.grad.float().norm(dim=-1), upstream.float().norm(dim=-1), rtol=2e-3, atol=2e-3)


def test_apply_rotary_varlen_and_conjugate(device):
    x = torch.randn(9, 2, 16, dtype=torch.float32, device=device)
    cu_seqlens = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    angles = torch.rand(12, 8, dtype=torch.float64, device=device)
    cos, sin = angles.cos().float(), angles.sin().float()
    rotated = apply_rotary(x, cos, sin, cu_seqlens=cu_seqlens, max_seqlen=5)
    assert torch.allclose(rotated[4:], apply_rotary(x[4:].unsqueeze(0), cos, sin)[0])
    back = apply_rotary(rotated, cos, sin, cu_seqlens=cu_seqlens, max_seqlen=5, conjugate=True)
    assert torch.allclose(back, x, atol=1e-5)
    inplace = x.clone()
    assert apply_rotary_emb(inplace, cos, sin, inplace=True, cu_seqlens=cu_seqlens) is inplace
    assert torch.allclose(inplace, rotated)
