"""Where a short backward's time goes (b=8, s=2048, h=16, d=128, bf16, non-causal and causal): per-call
latency (events around one call, as bench/gpu_backward.py times it) and back-to-back time (10 calls between
two events, so that host work overlaps the GPU's) for ours and torch SDPA flash, and our kernels' times from
torch's profiler.

    python bench/gpu_backward_overheads.py      (needs flash_attn_plus importable and a CUDA GPU)
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_attn_plus as fap
from timing import time_ms


def kernel_times_us(fn, calls=5):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {event.key: event.device_time_total / event.count for event in profile.key_averages()
            if event.device_time_total > 0}


def main():
    for causal in (False, True):
        q, k, v = (torch.randn(8, 2048, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        dout = torch.randn_like(q)
        out = fap.flash_attn_func(q, k, v, causal=causal)
        tq, tk, tv = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa_out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        calls = {"ours": lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                 "sdpa_flash": lambda: torch.autograd.grad(sdpa_out, (tq, tk, tv), dout.transpose(1, 2),
                                                           retain_graph=True)}
        for name, fn in calls.items():
            print(f"causal={causal} {name}: latency {time_ms(fn, warmup=3, repeat=15):.3f} ms, "
                  f"back-to-back {time_ms(fn, warmup=1, repeat=5, calls=10):.3f} ms", flush=True)
        for kernel, us in kernel_times_us(calls["ours"]).items():
            print(f"  {kernel[:48]:48s} {us:8.1f} us", flush=True)


if __name__ == "__main__":
    main()
