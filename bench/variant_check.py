"""Checks builds of the C library against a float64 reference on the GPU, before timing them with ab_compare.py:
each build's forward (output, LSE) and backward (dq, dk, dv) on fresh random bf16 inputs, over shapes that reach
every kind of tile edge (odd lengths, seqlen_q != seqlen_k, causal bottom-right, a window, GQA, head dims 64-256),
with FlashAttention-2's rule: max error at most 2x (gradients 3x) that of plain PyTorch in bf16, both against the
float64 reference. --deterministic also runs the deterministic mode and checks that two calls agree bitwise.

    python bench/variant_check.py [--deterministic] --out check.json NAME=path/libflash_attn_plus.so ...
"""
import argparse
import ctypes
import json
import math

import torch

import fap_ctypes as fc

# (batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim, causal, window)
SHAPES = [(2, 1000, 1000, 4, 4, 64, False, None), (2, 1000, 1000, 4, 2, 64, True, None),
          (1, 333, 777, 4, 1, 128, True, None), (2, 1024, 1024, 4, 4, 128, False, None),
          (1, 777, 333, 2, 2, 128, False, (100, 20)), (2, 517, 517, 2, 2, 256, True, None),
          (1, 1024, 1024, 4, 2, 256, False, None), (1, 200, 900, 2, 2, 96, False, None),
          (1, 300, 300, 2, 2, 192, True, None), (1, 1100, 1300, 4, 2, 64, True, None),
          (1, 1500, 1500, 2, 2, 64, False, (300, 40))]


def reference(q, k, v, dout, causal, window):
    """Output, LSE and gradients of attention in q's dtype (float64 for the reference), FA2's mask rules."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    sq, sk, hq, hk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    kk, vv = (x.repeat_interleave(hq // hk, dim=2) for x in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(q.shape[-1])
    row = torch.arange(sq, device=q.device)[:, None] + sk - sq
    col = torch.arange(sk, device=q.device)[None, :]
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= col <= row
    if window:
        allowed &= (col >= row - window[0]) & (col <= row + window[1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores.float() if scores.dtype != torch.float64 else scores, dim=-1)
    probs = torch.softmax(scores.float() if scores.dtype != torch.float64 else scores, dim=-1).to(q.dtype)
    out = torch.einsum("bhqk,bkhd->bqhd", probs.nan_to_num(0.0), vv)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(q.dtype))
    return out.detach(), lse.detach(), grads


def run_build(lib, q, k, v, dout, causal, window, deterministic):
    out, grads = torch.empty_like(q), [torch.full_like(x, float("nan")) for x in (q, k, v)]
    out.fill_(float("nan"))
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("nan"), device=q.device)
    options = lib.fap_default_options()
    options.causal = int(causal)
    options.deterministic = int(deterministic)
    if window:
        options.window_size_left, options.window_size_right = window
    fwd = fc.FwdArgs(q=fc.tensor(q), k=fc.tensor(k), v=fc.tensor(v), out=fc.tensor(out), softmax_lse=fc.tensor(lse))
    bwd = fc.BwdArgs(q=fc.tensor(q), k=fc.tensor(k), v=fc.tensor(v), out=fc.tensor(out), dout=fc.tensor(dout),
                     softmax_lse=fc.tensor(lse), dq=fc.tensor(grads[0]), dk=fc.tensor(grads[1]), dv=fc.tensor(grads[2]))
    size = ctypes.c_size_t()
    fc.check(lib, lib.fap_mha_bwd_workspace_size(ctypes.byref(bwd), ctypes.byref(options), ctypes.byref(size)))
    workspace = torch.empty(max(size.value, 16), dtype=torch.uint8, device=q.device)
    stream = torch.cuda.current_stream().cuda_stream if q.is_cuda else None
    fc.check(lib, lib.fap_mha_fwd(ctypes.byref(fwd), ctypes.byref(options), stream, None, 0))
    fc.check(lib, lib.fap_mha_bwd(ctypes.byref(bwd), ctypes.byref(options), stream, workspace.data_ptr(), size.value))
    if q.is_cuda:
        torch.cuda.synchronize()
    return out, lse, grads


def max_error(x, ref):
    return (x.double() - ref).abs().max().item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("builds", nargs="+", help="NAME=path of a libflash_attn_plus.so")
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu checks the script itself against the CPU backend")
    parser.add_argument("--out", default="variant_check.json")
    args = parser.parse_args()
    builds = [(name, fc.load(path)) for name, path in (b.split("=", 1) for b in args.builds)]
    results, failures = [], 0
    torch.manual_seed(0)
    for b, sq, sk, hq, hk, d, causal, window in SHAPES:
        q = torch.randn(b, sq, hq, d, device=args.device, dtype=torch.bfloat16)
        k, v = (torch.randn(b, sk, hk, d, device=args.device, dtype=torch.bfloat16) for _ in range(2))
        dout = torch.randn_like(q)
        ref = reference(*(x.double() for x in (q, k, v, dout)), causal, window)
        plain = reference(q, k, v, dout, causal, window)
        bounds = [2 * max_error(plain[0], ref[0]) + 1e-5] + [3 * max_error(g, r) + 1e-5 for g, r in zip(plain[2], ref[2])]
        for name, lib in builds:
            for deterministic in ([False, True] if args.deterministic else [False]):
                out, lse, grads = run_build(lib, q, k, v, dout, causal, window, deterministic)
                errors = [max_error(out, ref[0])] + [max_error(g, r) for g, r in zip(grads, ref[2])]
                finite = ref[1].isfinite()  # rows that see no key: FA2 returns +inf, the reference -inf
                lse_error = max_error(lse[finite], ref[1][finite].float().double())
                ok_empty = bool((lse[~finite] == float("inf")).all())
                ok = all(e <= bound for e, bound in zip(errors, bounds)) and lse_error < 1e-3 and ok_empty
                if deterministic:
                    again = run_build(lib, q, k, v, dout, causal, window, True)[2]
                    ok &= all(torch.equal(a, c) for a, c in zip(grads, again))
                failures += not ok
                entry = dict(build=name, shape=[b, sq, sk, hq, hk, d], causal=causal, window=window,
                             deterministic=deterministic, errors=errors, bounds=bounds, lse_error=lse_error, ok=ok)
                results.append(entry)
                print(("ok  " if ok else "FAIL"), name, entry["shape"], "causal" if causal else "", window or "",
                      "det" if deterministic else "", " ".join(f"{e:.2e}/{bd:.2e}" for e, bd in zip(errors, bounds)))
    with open(args.out, "w") as f:
        json.dump(dict(failures=failures, results=results), f, indent=1)
    print(f"{failures} failures in {len(results)} checks")
    raise SystemExit(failures > 0)


if __name__ == "__main__":
    main()
