"""Each kernel of a backward call, ours beside FlashAttention-2's (SDPA flash), from torch's profiler: bf16,
b * s = 16k tokens, heads * d = 2048, d 64/128/256, 1k and 16k tokens per sequence, causal and not. Device time
per call of every kernel (preprocess, main, conversion, any clearing), in µs, into --out.

    python bench/backward_kernel_times.py --out times.json      (needs flash_attn_plus importable and a CUDA GPU;
    FLASH_ATTENTION_PLUS_PORTABLE_KERNELS=1 times the mma.sync kernels on Hopper)
"""
import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_attn_plus as fap
from gpu_backward_overheads import kernel_times_us


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="backward_kernel_times.json")
    args = parser.parse_args()
    results = {}
    for d in (64, 128, 256):
        for s in (1024, 16384):
            for causal in (False, True):
                b, h = 16384 // s, 2048 // d
                q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                dout = torch.randn_like(q)
                out = fap.flash_attn_func(q, k, v, causal=causal)
                ours = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
                tq, tk, tv = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    sdpa_out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
                    theirs = lambda: torch.autograd.grad(sdpa_out, (tq, tk, tv), dout.transpose(1, 2),
                                                         retain_graph=True)
                    ours(), theirs()  # compiled and warm before the profile
                    times = {name: {kernel[:90]: round(us, 1) for kernel, us in kernel_times_us(fn).items()}
                             for name, fn in (("ours", ours), ("fa2", theirs))}
                key = f"d={d} s={s} causal={int(causal)}"
                results[key] = times
                print(key, {name: round(sum(t.values()), 1) for name, t in times.items()}, flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
