"""Host time per call (CPU wall time of back-to-back calls on a tiny problem, so the GPU never holds the host
back): our forward and backward through the Python package, torch SDPA's beside them, the floors torch's
autograd sets on this host (an autograd.Function that does nothing; the autograd engine's backward of one), the
library's backward call without the autograd engine, and a cProfile of our forward and backward.

    python bench/host_overhead.py      (needs flash_attn_plus importable and a CUDA GPU)
"""
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

import flash_attn_plus as fap
from flash_attn_plus import ops


class _Nothing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def host_us(fn, calls=500):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main():
    q, k, v = (torch.randn(1, 128, 1, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = fap.flash_attn_func(q, k, v)
    dout = torch.randn_like(out)
    backward = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    tq, tk, tv = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    sdpa_out = F.scaled_dot_product_attention(tq, tk, tv)
    sdpa_backward = lambda: torch.autograd.grad(sdpa_out, (tq, tk, tv), dout.transpose(1, 2), retain_graph=True)
    print(f"host time per backward call: {host_us(backward):.1f} us")
    print(f"host time per forward call: {host_us(lambda: fap.flash_attn_func(q, k, v)):.1f} us")
    with torch.no_grad():
        print(f"host time per forward call without autograd: {host_us(lambda: fap.flash_attn_func(q, k, v)):.1f} us")
    print(f"SDPA host time per backward call: {host_us(sdpa_backward):.1f} us")
    print(f"SDPA host time per forward call: {host_us(lambda: F.scaled_dot_product_attention(tq, tk, tv)):.1f} us")
    print(f"floor: an autograd.Function that does nothing, forward: {host_us(lambda: _Nothing.apply(q)):.1f} us")
    nothing = _Nothing.apply(q)
    print(f"floor: the engine's backward of it: "
          f"{host_us(lambda: torch.autograd.grad(nothing, q, dout, retain_graph=True)):.1f} us")
    _, lse, _ = fap.flash_attn_func(q, k, v, return_attn_probs=True)
    options = ops.Options(q.shape[-1] ** -0.5, False, -1, -1, 0.0, 0.0, False)
    library_backward = lambda: ops._backward(dout, q, k, v, out, lse, None, None, None, 0, 0, (0, 0), options)
    print(f"the library's backward call without the autograd engine: {host_us(library_backward):.1f} us")
    for name, fn in (("forward", lambda: fap.flash_attn_func(q, k, v)), ("backward", backward)):
        profile = cProfile.Profile()
        profile.runcall(lambda: [fn() for _ in range(300)])
        torch.cuda.synchronize()
        print(f"--- cProfile of 300 {name} calls")
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
