"""The first training step of a fresh process, as a user sees it: `import flash_attn_plus`, then a forward and
a backward (bf16, d = 128, causal, batch 2, seqlen 1024, 8 heads) timed until the GPU is done, then the same
step again (the kernels' own time plus the host path). Each process has initialised torch, CUDA and the autograd
engine before the clock starts (torch's own start-up is not ours). Processes in a row on one cache directory:
- `cold`: an empty kernel cache (every kernel compiled at run time);
- `warm`: the kernels in the disk cache;
- `warm_again`: the same, once more (the spread between the two is noise);
- `sdpa_flash`: the same step with torch's SDPA flash backend (FlashAttention-2's precompiled kernels).

    python bench/jit_latency.py --out DIR
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time, torch
# torch's own first-use costs, paid before the clock: CUDA, cuBLAS, and the autograd engine (its first backward
# with explicit gradients imports sympy, about 2-3 s).
w = torch.randn(64, 64, device="cuda", requires_grad=True)
(w @ w).backward(torch.ones(64, 64, device="cuda"))
q, k, v = (torch.randn(2, 1024, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
torch.cuda.synchronize()
start = time.perf_counter()
if sys.argv[1] == "sdpa":
    def attention(q, k, v):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
else:
    import flash_attn_plus as fap
    def attention(q, k, v):
        return fap.flash_attn_func(q, k, v, causal=True)
imported = time.perf_counter()
times = {"import_ms": (imported - start) * 1e3}
for name in ("first", "second"):
    start = time.perf_counter()
    out = attention(q, k, v)
    torch.cuda.synchronize()
    forward = time.perf_counter()
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    end = time.perf_counter()
    times[name + "_forward_ms"] = (forward - start) * 1e3
    times[name + "_backward_ms"] = (end - forward) * 1e3
    times[name + "_step_ms"] = (end - start) * 1e3
times["first_step_beyond_second_ms"] = times["first_step_ms"] - times["second_step_ms"]
times["import_and_first_step_ms"] = times["import_ms"] + times["first_step_ms"]
print(json.dumps(times))
"""


def run_child(cache_dir, implementation="flash_attn_plus"):
    env = dict(os.environ, FLASH_ATTENTION_PLUS_CACHE_DIR=cache_dir, FLASH_ATTENTION_PLUS_JIT_QUIET="0")
    output = subprocess.run([sys.executable, "-c", CHILD, implementation], env=env, capture_output=True, text=True,
                            check=True)
    times = json.loads(output.stdout.strip().splitlines()[-1])
    times["kernels_compiled"] = sum("flash_attn_plus: compiling" in line for line in output.stderr.splitlines())
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache_dir:
        result = {name: run_child(cache_dir) for name in ("cold", "warm", "warm_again")}
    result["sdpa_flash"] = run_child(cache_dir, "sdpa")  # torch's precompiled FA2 kernels, for comparison
    print(json.dumps(result, indent=1))
    with open(os.path.join(args.out, "jit_latency.json"), "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
