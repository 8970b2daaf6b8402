"""A few training steps of a small transformer block with our attention and with eager attention give the
same loss curve (bf16 tolerance): forward, backward and optimizer together."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flash_attn_plus as fap

pytestmark = pytest.mark.usefixtures("api_backend")  # every case on each backend (conftest.py)


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, use_flash):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.use_flash = heads, kv_heads, dim // heads, use_flash
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def attention(self, x):
        batch, seqlen, dim = x.shape
        q = self.q(x).view(batch, seqlen, self.heads, self.head_dim)
        k, v = self.kv(x).view(batch, seqlen, 2, self.kv_heads, self.head_dim).unbind(2)
        if self.use_flash:
            y = fap.flash_attn_func(q, k, v, causal=True, window_size=(48, 0))
        else:  # eager: explicit scores, GQA by repetition, the same sliding causal window
            k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=2) for t in (k, v))
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * self.head_dim ** -0.5
            i = torch.arange(seqlen, device=x.device)
            allowed = (i.view(-1, 1) >= i.view(1, -1)) & (i.view(-1, 1) - i.view(1, -1) <= 48)
            y = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)
        return self.proj(y.reshape(batch, seqlen, dim))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _losses(use_flash, device, steps=8):
    torch.manual_seed(0)
    model = nn.Sequential(Block(128, 4, 2, use_flash), Block(128, 4, 2, use_flash)).to(device, torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(4, 96, 128, generator=generator).to(device, torch.bfloat16)
    targets = torch.randn(4, 96, 128, generator=generator).to(device, torch.bfloat16)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(model(inputs).float(), targets.float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_training_steps_match_eager_attention(device):
    ours, eager = _losses(True, device), _losses(False, device)
    assert ours[-1] < ours[0] * 0.9, f"the loss should fall: {ours}"
    for step, (a, b) in enumerate(zip(ours, eager)):
        assert a == pytest.approx(b, rel=0.02), f"step {step}: {ours} vs eager {eager}"
