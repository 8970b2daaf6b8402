"""The flaggems backend on a GPU, in one run on a machine with a GPU: whether it is usable (and why not), the
latency of its first call and of each call that brings a new batch size, head count, sequence length,
scale or head dim (FlagGems' Triton kernels are specialised on them), and the same call switched between
the cuda, flaggems and cpu backends in one process with matching results. Writes JSON under --out.

    python bench/gpu_flaggems.py --out DIR     (needs flash_attn_plus importable, flag_gems installed)
"""
import argparse
import json
import os
import time

import torch

import flash_attn_plus as fap


def _timed_call(b, s, h, d, scale=None):
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    torch.cuda.synchronize()
    start = time.perf_counter()
    fap.flash_attn_func(q, k, v, softmax_scale=scale, causal=True)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def latencies():
    """Wall-clock ms of calls in order; each row names what is new in it."""
    steps = [("first call (import done, kernels compiled)", (2, 1024, 8, 128)),
             ("same shape again", (2, 1024, 8, 128)),
             ("new batch size", (3, 1024, 8, 128)),
             ("new sequence length", (3, 1500, 8, 128)),
             ("new head count", (3, 1500, 12, 128)),
             ("new softmax scale", (3, 1500, 12, 128, 0.1)),
             ("new head dim", (3, 1500, 12, 64)),
             ("all of the above seen before", (3, 1500, 12, 64))]
    rows = []
    for name, shape in steps:
        ms = _timed_call(*shape)
        rows.append({"step": name, "shape": shape, "ms": ms})
        print(f"{name:45s} {str(shape):28s} {ms:9.1f} ms", flush=True)
    return rows


def switching():
    """One problem on each backend in turn, in one process: outputs and LSE against the cuda backend's."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 300, 8, 128, device="cuda", dtype=torch.float16) for _ in range(3))
    results = {}
    for name in ("cuda", "flaggems", "cpu", "flaggems", "cuda"):
        tensors = (q, k, v) if name != "cpu" else (q.cpu(), k.cpu(), v.cpu())
        with fap.backend(name):
            out, lse, _ = fap.flash_attn_func(*tensors, causal=True, window_size=(100, 0), softcap=20.0,
                                              return_attn_probs=True)
        results.setdefault(name, []).append((out.cuda().float(), lse.cuda()))
    reference_out, reference_lse = results["cuda"][0]
    report = {}
    for name, runs in results.items():
        report[name] = [{"max_out_diff": (out - reference_out).abs().max().item(),
                         "max_lse_diff": (lse - reference_lse).abs().max().item()} for out, lse in runs]
    print("switching:", report, flush=True)
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    start = time.perf_counter()
    reason = fap.flaggems.unusable_reason()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "usable": not reason,
              "reason": reason, "probe_ms": (time.perf_counter() - start) * 1e3}
    print(f"flaggems usable: {not reason} {reason} (import and probe {result['probe_ms']:.0f} ms)", flush=True)
    if not reason:
        result["versions"] = fap.flaggems.versions()
        with fap.backend("flaggems"):
            result["latency"] = latencies()
        result["switching"] = switching()
    with open(os.path.join(args.out, "gpu_flaggems.json"), "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
