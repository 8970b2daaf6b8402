"""Swapping FlashAttention-Plus into an existing model.

A causal self-attention block written for PyTorch's scaled_dot_product_attention changes one line: the
attention call (FA2's layout is (batch, seqlen, heads, head_dim), so the transposes go away too). Code
written against FlashAttention-2 (`from flash_attn import flash_attn_func`) needs no change at all once the
`flash_attn` drop-in (compat/) is installed. Runs on CUDA when available, else on the CPU backend.

    python examples/drop_in.py
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from flash_attn_plus import flash_attn_func


class CausalSelfAttention(nn.Module):
    def __init__(self, dim, heads, use_flash):
        super().__init__()
        self.heads, self.use_flash = heads, use_flash
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        batch, seqlen, dim = x.shape
        q, k, v = self.qkv(x).view(batch, seqlen, 3, self.heads, dim // self.heads).unbind(2)
        if self.use_flash:
            y = flash_attn_func(q, k, v, causal=True)  # the swap
        else:
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True).transpose(1, 2)
        return self.proj(y.reshape(batch, seqlen, dim))


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    reference = CausalSelfAttention(512, 8, use_flash=False).to(device, torch.bfloat16)
    swapped = CausalSelfAttention(512, 8, use_flash=True).to(device, torch.bfloat16)
    swapped.load_state_dict(reference.state_dict())
    x = torch.randn(4, 256, 512, device=device, dtype=torch.bfloat16)
    expected, got = reference(x).float(), swapped(x).float()
    print(f"device {device}: max |flash_attn_plus - sdpa| = {(got - expected).abs().max().item():.4f} "
          f"(outputs of magnitude {expected.abs().max().item():.2f}, bf16)")
    swapped(x).float().square().mean().backward()  # training goes through our backward too
    print("backward ok: |grad qkv| =", swapped.qkv.weight.grad.float().norm().item())


if __name__ == "__main__":
    main()
