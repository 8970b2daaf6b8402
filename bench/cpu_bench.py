"""CPU benchmark: our CPU backend against PyTorch's CPU flash attention (the kernel behind
torch.nn.functional.scaled_dot_product_attention on CPU), forward and backward, same thread count.

    python bench/cpu_bench.py [--threads N] [--json out.json]

FLOP convention of FlashAttention: forward 4*b*h*s*s*d (half for causal), backward 2.5x the forward.
Each number is the median of several timed runs after a warm-up; both implementations see the same
tensors, in the (batch, seqlen, heads, head_dim) layout FlashAttention uses.
"""
import argparse
import ctypes
import json
import os
import platform
import statistics
import time

import torch

import fap_ctypes


def median_seconds(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_case(lib, batch, heads, seqlen, head_dim, causal, dtype, repeats):
    torch.manual_seed(0)
    shape = (batch, seqlen, heads, head_dim)
    q, k, v, dout = (torch.randn(shape, dtype=dtype) for _ in range(4))
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, seqlen, dtype=torch.float32)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    options = lib.fap_default_options()
    options.causal = int(causal)
    fwd = fap_ctypes.FwdArgs(q=fap_ctypes.tensor(q), k=fap_ctypes.tensor(k), v=fap_ctypes.tensor(v),
                             out=fap_ctypes.tensor(out), softmax_lse=fap_ctypes.tensor(lse))
    bwd = fap_ctypes.BwdArgs(q=fwd.q, k=fwd.k, v=fwd.v, out=fwd.out, dout=fap_ctypes.tensor(dout),
                             softmax_lse=fwd.softmax_lse, dq=fap_ctypes.tensor(dq), dk=fap_ctypes.tensor(dk),
                             dv=fap_ctypes.tensor(dv))
    size = ctypes.c_size_t()
    fap_ctypes.check(lib, lib.fap_mha_fwd_workspace_size(fwd, options, size))
    fwd_ws = torch.empty(size.value, dtype=torch.uint8)
    fap_ctypes.check(lib, lib.fap_mha_bwd_workspace_size(bwd, options, size))
    bwd_ws = torch.empty(size.value, dtype=torch.uint8)

    def ours_fwd():
        fap_ctypes.check(lib, lib.fap_mha_fwd(fwd, options, None, fwd_ws.data_ptr(), fwd_ws.numel()))

    def ours_bwd():
        fap_ctypes.check(lib, lib.fap_mha_bwd(bwd, options, None, bwd_ws.data_ptr(), bwd_ws.numel()))

    # torch's CPU flash kernel, called directly so that autograd bookkeeping is not timed.
    tq, tk, tv, tdout = (t.transpose(1, 2) for t in (q, k, v, dout))
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    t_out, t_lse = flash(tq, tk, tv, 0.0, causal)

    def torch_fwd():
        flash(tq, tk, tv, 0.0, causal)

    def torch_bwd():
        flash_bwd(tdout, tq, tk, tv, t_out, t_lse, 0.0, causal)

    ours_fwd()
    max_diff = (out.float() - t_out.transpose(1, 2).float()).abs().max().item()
    flops = 4.0 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
    result = {"batch": batch, "heads": heads, "seqlen": seqlen, "head_dim": head_dim, "causal": causal,
              "dtype": str(dtype).replace("torch.", ""), "max_abs_diff_vs_torch": max_diff}
    for name, fn, work in (("ours_fwd", ours_fwd, flops), ("torch_fwd", torch_fwd, flops),
                           ("ours_bwd", ours_bwd, 2.5 * flops), ("torch_bwd", torch_bwd, 2.5 * flops)):
        seconds = median_seconds(fn, repeats)
        result[name + "_ms"] = seconds * 1e3
        result[name + "_gflops"] = work / seconds * 1e-9
    result["fwd_speedup"] = result["torch_fwd_ms"] / result["ours_fwd_ms"]
    result["bwd_speedup"] = result["torch_bwd_ms"] / result["ours_bwd_ms"]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seqlens", default="512,1024,2048,4096")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--json")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by our library's OpenMP at first use
    torch.set_num_threads(args.threads)
    lib = fap_ctypes.load()
    rows = []
    print(f"threads={args.threads} torch={torch.__version__} cpu={platform.processor() or platform.machine()}")
    print(f"{'dtype':9} {'d':>4} {'seqlen':>6} {'causal':>6} | {'fwd ours':>9} {'torch':>7} {'x':>5} |"
          f" {'bwd ours':>9} {'torch':>7} {'x':>5}   (GFLOP/s)")
    for dtype in args.dtypes.split(","):
        for head_dim in map(int, args.head_dims.split(",")):
            for seqlen in map(int, args.seqlens.split(",")):
                for causal in (False, True):
                    r = run_case(lib, 1, 8, seqlen, head_dim, causal, getattr(torch, dtype), args.repeats)
                    rows.append(r)
                    print(f"{dtype:9} {head_dim:4} {seqlen:6} {str(causal):>6} | {r['ours_fwd_gflops']:9.1f}"
                          f" {r['torch_fwd_gflops']:7.1f} {r['fwd_speedup']:5.2f} | {r['ours_bwd_gflops']:9.1f}"
                          f" {r['torch_bwd_gflops']:7.1f} {r['bwd_speedup']:5.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "torch": torch.__version__, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
