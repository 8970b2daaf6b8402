"""Backward on the GPU: TFLOP/s of our CUDA backward beside torch SDPA's flash and cuDNN backwards (same run,
bf16, 16k tokens per shape; each implementation timed in 3 interleaved rounds, the median kept), the
deterministic mode's bitwise reproducibility over 10 runs and its cost.
FLOPs: FlashAttention's convention, backward = 2.5 x forward (4 b h s^2 d, half when causal).

    python bench/gpu_backward.py --out DIR      (needs flash_attn_plus importable and a CUDA GPU)
"""
import argparse
import contextlib
import json
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_attn_plus as fap
from timing import time_ms


ROUNDS = 3  # each implementation is timed once per round, the rounds interleaved; the median round is kept


@contextlib.contextmanager
def portable_kernels():
    os.environ["FLASH_ATTENTION_PLUS_PORTABLE_KERNELS"] = "1"
    try:
        yield
    finally:
        del os.environ["FLASH_ATTENTION_PLUS_PORTABLE_KERNELS"]


def backward_timer(forward, inputs, dout, context=contextlib.nullcontext):
    """A function timing the backward alone (median of 10 after 3 warm-ups; the forward runs once, on the first
    call, and its graph is kept between runs)."""
    graph = []

    def timed():
        with context():
            if not graph:
                graph.append(forward(*inputs))
            return time_ms(lambda: torch.autograd.grad(graph[0], inputs, dout, retain_graph=True), warmup=3, repeat=10)
    return timed


def implementations(q, k, v, dout, causal):
    """(name, timer) of every implementation the GPU runs."""
    ours = lambda q, k, v: fap.flash_attn_func(q, k, v, causal=causal)
    timers = [("ours", backward_timer(ours, (q, k, v), dout))]
    if torch.cuda.get_device_capability() == (9, 0):  # the portable kernels on the same GPU
        timers.append(("ours_mma_sync", backward_timer(ours, (q, k, v), dout, portable_kernels)))
    timers.append(("ours_deterministic", backward_timer(
        lambda q, k, v: fap.flash_attn_func(q, k, v, causal=causal, deterministic=True), (q, k, v), dout)))
    tq, tk, tv = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        timers.append((name, backward_timer(sdpa, (tq, tk, tv), dout.transpose(1, 2),
                                            lambda backend=backend: sdpa_kernel(backend))))
    return timers


def benchmark():
    rows = []
    for d, heads in ((64, 32), (128, 16), (256, 8)):
        for causal in (False, True):
            for s in (2048, 4096, 8192, 16384):
                b = 16384 // s
                q, k, v = (torch.randn(b, s, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                dout = torch.randn(b, s, heads, d, device="cuda", dtype=torch.bfloat16)
                flops = 2.5 * 4 * b * heads * s * s * d / (2 if causal else 1)
                row = {"d": d, "heads": heads, "batch": b, "seqlen": s, "causal": causal}
                times, timers = {}, implementations(q, k, v, dout, causal)
                for _ in range(ROUNDS):
                    for name, timer in timers:
                        if name + "_error" in row:
                            continue
                        try:
                            times.setdefault(name, []).append(timer())
                        except RuntimeError as error:  # an SDPA backend that does not take the shape
                            row[name + "_ms"], row[name + "_error"] = None, str(error)[:200]
                            times.pop(name, None)
                for name, values in times.items():
                    row[name + "_ms"] = sorted(values)[len(values) // 2]
                    row[name + "_tflops"] = flops / row[name + "_ms"] / 1e9
                rows.append(row)
                print(f"bwd d={d} s={s} causal={causal}: ours {row['ours_tflops']:.0f} mma.sync "
                      f"{row.get('ours_mma_sync_tflops', 0):.0f} flash "
                      f"{row.get('sdpa_flash_tflops', 0):.0f} cudnn {row.get('sdpa_cudnn_tflops', 0):.0f} "
                      f"deterministic {row.get('ours_deterministic_tflops', 0):.0f} TFLOP/s",
                      flush=True)
    return rows


def determinism(runs=10):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4096, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    result = {}
    for deterministic in (True, False):
        grads = []
        for _ in range(runs):
            out = fap.flash_attn_func(q, k, v, causal=True, deterministic=deterministic)
            grads.append(torch.autograd.grad(out, (q, k, v), dout))
        identical = all(torch.equal(a, b) for run in grads[1:] for a, b in zip(grads[0], run))
        result["deterministic" if deterministic else "default"] = {"runs": runs, "bitwise_identical": identical}
    print("determinism:", result, flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "determinism": determinism(),
              "benchmark": benchmark()}
    with open(os.path.join(args.out, "gpu_backward.json"), "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
