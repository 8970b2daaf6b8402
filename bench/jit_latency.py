"""Run-time compilation latency on the GPU: the first call of a kernel configuration (NVRTC compile + load),
the next call in the same process (memory cache), and the first call in a new process (disk cache), for
the forward and the backward of one problem (bf16, d = 128, causal, batch 2, seqlen 2048, 16 heads).
Before timing, each process runs the same calls on CPU tensors and loads the driver and NVRTC (info()),
so that torch's one-time set-up of custom ops and autograd is not counted as compilation.

    python bench/jit_latency.py --out DIR
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, os, sys, time, torch
import flash_attn_plus as fap
fap.info()
warm = [torch.randn(1, 16, 2, 128, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
fap.flash_attn_func(*warm, causal=True).sum().backward()
q, k, v = (torch.randn(2, 2048, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
torch.cuda.synchronize()
times = {}
for name in ("first", "second"):
    start = time.perf_counter()
    out = fap.flash_attn_func(q, k, v, causal=True)
    torch.cuda.synchronize()
    times[name + "_forward_ms"] = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    times[name + "_backward_ms"] = (time.perf_counter() - start) * 1e3
print(json.dumps(times))
"""


def run_child(cache_dir):
    env = dict(os.environ, FLASH_ATTENTION_PLUS_CACHE_DIR=cache_dir)
    output = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache_dir:
        cold = run_child(cache_dir)   # empty cache: compiles, then the memory cache
        warm = run_child(cache_dir)   # new process: the disk cache
    result = {"cold_process": cold, "warm_disk_process": warm}
    print(json.dumps(result, indent=1))
    with open(os.path.join(args.out, "jit_latency.json"), "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
