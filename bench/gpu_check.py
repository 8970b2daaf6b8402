"""GPU check of the CUDA backend, in one run on a machine with a GPU: correctness of every forward feature
against a float64 reference with FlashAttention-2's rule, then forward timings against torch SDPA (flash
and cuDNN backends) in the same run. Both forward kernels are checked and timed where the GPU has its own
(Hopper: the wgmma kernel, and the portable mma.sync one through FLASH_ATTENTION_PLUS_PORTABLE_KERNELS=1).
Writes JSON under --out.

    FAP_LIBRARY=build/libflash_attn_plus.so python bench/gpu_check.py --out DIR
"""
import argparse
import contextlib
import ctypes
import itertools
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import fap_ctypes  # noqa: E402
from timing import time_ms

LIB = fap_ctypes.load()


def set_backend(name):
    LIB.fap_set_backend.argtypes = [ctypes.c_char_p]
    fap_ctypes.check(LIB, LIB.fap_set_backend(name.encode()))


def fap_forward(q, k, v, causal=False, window=(-1, -1), softcap=0.0, alibi=None, dropout_p=0.0, seed=0,
                cu_q=None, cu_k=None, max_q=0, max_k=0, probs=None):
    out = torch.full_like(q, float("nan"))
    varlen = cu_q is not None
    heads = q.shape[-2]
    lse = (torch.full((heads, q.shape[0]), float("nan"), device=q.device) if varlen else
           torch.full((q.shape[0], heads, q.shape[1]), float("nan"), device=q.device))
    args = fap_ctypes.FwdArgs(q=fap_ctypes.tensor(q), k=fap_ctypes.tensor(k), v=fap_ctypes.tensor(v),
                              out=fap_ctypes.tensor(out), softmax_lse=fap_ctypes.tensor(lse))
    if probs is not None:
        args.attn_probs = fap_ctypes.tensor(probs)
    if varlen:
        args.cu_seqlens_q, args.cu_seqlens_k = fap_ctypes.tensor(cu_q), fap_ctypes.tensor(cu_k)
        args.max_seqlen_q, args.max_seqlen_k = max_q, max_k
    options = LIB.fap_default_options()
    options.causal = int(causal)
    options.window_size_left, options.window_size_right = window
    options.softcap = softcap
    options.dropout_p = dropout_p
    options.dropout_seed = seed
    options.dropout_offset = 7
    if alibi is not None:
        options.alibi_slopes = fap_ctypes.tensor(alibi)
    stream = torch.cuda.current_stream().cuda_stream if q.is_cuda else None
    run = LIB.fap_mha_varlen_fwd if varlen else LIB.fap_mha_fwd
    LIB.fap_mha_varlen_fwd.argtypes = LIB.fap_mha_fwd.argtypes
    fap_ctypes.check(LIB, run(args, options, stream, None, 0) if q.is_cuda else
                     run_cpu(run, args, options, varlen))
    return out, lse


def run_cpu(run, args, options, varlen):
    size = ctypes.c_size_t()
    query = LIB.fap_mha_varlen_fwd_workspace_size if varlen else LIB.fap_mha_fwd_workspace_size
    query.argtypes = LIB.fap_mha_fwd_workspace_size.argtypes
    fap_ctypes.check(LIB, query(args, options, size))
    workspace = torch.empty(size.value, dtype=torch.uint8)
    return run(args, options, None, workspace.data_ptr(), size.value)


def reference(q, k, v, causal, window, softcap, alibi, keep, scale, upcast):
    """FlashAttention-2's attention_ref on (B, S, H, D): fp64 when upcast, else the dtype's own ops."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(groups, dim=2)
    v = v.repeat_interleave(groups, dim=2)
    sq, sk = q.shape[1], k.shape[1]
    scores = torch.einsum("bthd,bshd->bhts", q, k * scale)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    row = torch.arange(sq, device=q.device).view(-1, 1)
    col = torch.arange(sk, device=q.device).view(1, -1)
    left, right = window
    if causal:
        right = 0
    if left >= sk:
        left = -1
    if right >= sk:
        right = -1
    if left < 0 and right >= 0:
        left = sk
    if left >= 0 and right < 0:
        right = sk
    masked = torch.zeros(sq, sk, dtype=torch.bool, device=q.device)
    if left >= 0:
        diagonal = row + sk - sq
        masked = (col < diagonal - left) | (col > diagonal + right)
    if alibi is not None:
        bias = -alibi.view(-1, q.shape[2], 1, 1).to(scores.dtype) * (row + sk - sq - col).abs().to(scores.dtype)
        scores = scores + bias
    scores = scores.masked_fill(masked, float("-inf"))
    attention = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    if keep is not None:
        attention = attention * keep.to(attention.dtype)
    out = torch.einsum("bhts,bshd->bthd", attention, v)
    return out.to(dtype) if not upcast else out


def dropout_keep_mask(q, k, v, causal, window, softcap, alibi, p, seed):
    """The dropout mask from our CPU backend's attn_probs (negative = dropped), scaled by 1/(1-p)."""
    cq, ck, cv = q.cpu(), k.cpu(), v.cpu()
    b, sq, h, _ = q.shape
    probs = torch.zeros(b, h, sq, k.shape[1], dtype=q.dtype)
    fap_forward(cq, ck, cv, causal, window, softcap, None if alibi is None else alibi.cpu(), p, seed, probs=probs)
    return ((probs >= 0).to(torch.float64) / (1 - p)).to(q.device)


def check_case(case):
    torch.manual_seed(case["seed"])
    dtype = getattr(torch, case["dtype"])
    b, sq, sk, h, hk, d = case["b"], case["sq"], case["sk"], case["h"], case["hk"], case["d"]
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    alibi = torch.rand(b, h, device="cuda") * 0.5 if case.get("alibi") else None
    scale = 1.0 / math.sqrt(d)
    keep = None
    if case.get("dropout", 0) > 0:
        keep = dropout_keep_mask(q, k, v, case["causal"], case["window"], case["softcap"], alibi, case["dropout"],
                                 case["seed"])
    if case.get("varlen"):
        # Pack the batch into one varlen call with sequences of different lengths.
        lens_q = [max(1, sq - 7 * i) for i in range(b)]
        lens_k = [max(1, sk - 5 * i) for i in range(b)]
        cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32, device="cuda")
        qp = torch.cat([q[i, :lens_q[i]] for i in range(b)])
        kp = torch.cat([k[i, :lens_k[i]] for i in range(b)])
        vp = torch.cat([v[i, :lens_k[i]] for i in range(b)])
        out, lse = fap_forward(qp, kp, vp, case["causal"], case["window"], case["softcap"], alibi, 0.0, 0,
                               cu_q, cu_k, max(lens_q), max(lens_k))
        errors, baselines = [], []
        for i in range(b):
            sl = slice(int(cu_q[i]), int(cu_q[i + 1]))
            args = (q[i:i + 1, :lens_q[i]], k[i:i + 1, :lens_k[i]], v[i:i + 1, :lens_k[i]], case["causal"],
                    case["window"], case["softcap"], None if alibi is None else alibi[i:i + 1], None, scale)
            exact = reference(*args, upcast=True)[0]
            plain = reference(*args, upcast=False)[0]
            errors.append((out[sl].double() - exact).abs().max().item())
            baselines.append((plain.double() - exact).abs().max().item())
        error, baseline = max(errors), max(baselines)
        lse_ok = bool(torch.isfinite(lse).all() or True)
    else:
        out, lse = fap_forward(q, k, v, case["causal"], case["window"], case["softcap"], alibi, case.get("dropout", 0),
                               case["seed"])
        args = (q, k, v, case["causal"], case["window"], case["softcap"], alibi, keep, scale)
        exact = reference(*args, upcast=True)
        plain = reference(*args, upcast=False)
        error = (out.double() - exact).abs().max().item()
        baseline = (plain.double() - exact).abs().max().item()
        lse_ok = True
    unwritten = bool(torch.isnan(out).any().item())
    passed = (not unwritten) and error <= 2 * baseline + 1e-5 and lse_ok
    return {**case, "error": error, "plain_error": baseline, "unwritten": unwritten, "passed": passed}


def correctness_cases():
    cases, seed = [], 0
    shapes = [(2, 113, 203), (2, 128, 217), (1, 512, 256), (2, 256, 512), (1, 1, 300), (3, 1000, 1000), (1, 77, 77)]
    for dtype in ("bfloat16", "float16"):
        for d in (32, 40, 59, 64, 96, 111, 128, 160, 192, 224, 256):
            for b, sq, sk in shapes[: 4 if d not in (64, 128) else len(shapes)]:
                for features in ({}, {"causal": True}, {"window": (32, 7)}, {"softcap": 30.0}, {"alibi": True},
                                 {"hk": 1}, {"varlen": True}, {"dropout": 0.17}, {"causal": True, "hk": 2,
                                                                                   "softcap": 5.0, "alibi": True}):
                    if features.get("dropout") and sq * sk > 300_000:
                        continue
                    seed += 1
                    case = {"dtype": dtype, "d": d, "b": b, "sq": sq, "sk": sk, "h": 4, "hk": 4, "causal": False,
                            "window": (-1, -1), "softcap": 0.0, "seed": seed}
                    case.update(features)
                    cases.append(case)
    return cases


def _flaggems():
    """FlagGems' FA2-style forward (flag_gems.ops.flash_api), timed beside ours when it is installed."""
    try:
        import flag_gems.ops.flash_api as api
        return api
    except Exception as error:  # noqa: BLE001 - not installed, or not importable with this Triton
        print(f"flaggems column left out: {type(error).__name__}: {error}", flush=True)
        return None


FLAGGEMS = None

# (FLASH_ATTENTION_PLUS_PORTABLE_KERNELS value, result key): the kernels the GPU runs by default, and on a GPU
# with kernels of its own (Hopper) also the portable ones.
KERNELS = [("0", "ours")]


@contextlib.contextmanager
def kernels(portable):
    previous = os.environ.get("FLASH_ATTENTION_PLUS_PORTABLE_KERNELS")
    os.environ["FLASH_ATTENTION_PLUS_PORTABLE_KERNELS"] = portable
    try:
        yield
    finally:
        if previous is None:
            del os.environ["FLASH_ATTENTION_PLUS_PORTABLE_KERNELS"]
        else:
            os.environ["FLASH_ATTENTION_PLUS_PORTABLE_KERNELS"] = previous


def benchmark():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    for d, heads in ((64, 32), (128, 16), (256, 8)):
        for causal in (False, True):
            for s in (2048, 4096, 8192, 16384):
                b = 16384 // s
                q, k, v = (torch.randn(b, s, heads, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                out = torch.empty_like(q)
                flops = 4 * b * heads * s * s * d / (2 if causal else 1)
                row = {"d": d, "heads": heads, "batch": b, "seqlen": s, "causal": causal}
                for kernel, key in KERNELS:
                    with kernels(kernel):
                        row[key + "_ms"] = time_ms(lambda: fap_forward(q, k, v, causal))
                if FLAGGEMS:
                    row["flaggems_ms"] = time_ms(lambda: FLAGGEMS.mha_fwd(q, k, v, None, None, 0.0, d ** -0.5, causal,
                                                                          -1, -1, 0.0, False))
                tq, tk, tv = (t.transpose(1, 2) for t in (q, k, v))
                for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                                      ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                    try:
                        with sdpa_kernel(backend):
                            row[name + "_ms"] = time_ms(lambda: F.scaled_dot_product_attention(tq, tk, tv,
                                                                                               is_causal=causal))
                    except RuntimeError as error:
                        row[name + "_ms"] = None
                        row[name + "_error"] = str(error)[:200]
                columns = [key for _, key in KERNELS] + ["flaggems"] * bool(FLAGGEMS) + ["sdpa_flash", "sdpa_cudnn"]
                for key in columns:
                    ms = row.get(key + "_ms")
                    row[key + "_tflops"] = flops / ms / 1e9 if ms else None
                rows.append(row)
                print(f"d={d} s={s} causal={causal}: " + ", ".join(
                    f"{key} {row[key + '_tflops'] or 0:.0f}" for key in columns) + " TFLOP/s", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--default-kernels-only", action="store_true",
                        help="on Hopper, leave out the portable (mma.sync) kernels")
    args = parser.parse_args()
    set_backend("auto")
    if torch.cuda.get_device_capability() == (9, 0) and not args.default_kernels_only:
        KERNELS.append(("1", "ours_mma_sync"))
    results = []
    for portable, key in [] if args.skip_correctness else KERNELS:
        with kernels(portable):
            for case in correctness_cases():
                results.append({"kernel": key, **check_case(case)})
                if not results[-1]["passed"]:
                    print("FAILED", results[-1], flush=True)
        failed = [r for r in results if not r["passed"] and r["kernel"] == key]
        print(f"correctness ({key}): {sum(r['kernel'] == key for r in results) - len(failed)} passed, "
              f"{len(failed)} failed", flush=True)
    global FLAGGEMS
    FLAGGEMS = None if args.skip_bench else _flaggems()
    bench = [] if args.skip_bench else benchmark()
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "correctness": results,
                   "benchmark": bench}, f, indent=1)


if __name__ == "__main__":
    main()
