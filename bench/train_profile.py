"""One training shape's forward and backward, a few times, for a profiler: ours (with
FLASH_ATTENTION_PLUS_PORTABLE_KERNELS=1 the mma.sync kernels), torch SDPA's flash backend (FlashAttention-2's
kernels) or FlashAttention-4 (`flash_attn.cute`, where it is installed), so that all run under the same ncu sections.

    ncu -k regex:'attention_bwd$|flash_bwd_dq_dk_dv' --launch-skip 2 --launch-count 1 \\
        python bench/train_profile.py --impl fa2 --head-dim 128 --seqlen 16384
    ncu -k regex:'attention_fwd$|FlashAttentionForward' --launch-skip 2 --launch-count 1 \\
        python bench/train_profile.py --impl fa4 --head-dim 128 --seqlen 1024
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_attn_plus as fap


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=("ours", "fa2", "fa4"), default="ours")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=16384)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    batch, heads = 16384 // args.seqlen, 2048 // args.head_dim
    q, k, v = (torch.randn(batch, args.seqlen, heads, args.head_dim, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    for _ in range(args.repeat):
        if args.impl == "ours":
            out = fap.flash_attn_func(q, k, v, causal=args.causal)
            torch.autograd.grad(out, (q, k, v), dout)
        elif args.impl == "fa4":
            from flash_attn.cute import flash_attn_func

            out = flash_attn_func(q, k, v, causal=args.causal)[0]
            torch.autograd.grad(out, (q, k, v), dout)
        else:
            tq, tk, tv = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=args.causal)
            torch.autograd.grad(out, (tq, tk, tv), dout.transpose(1, 2))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
