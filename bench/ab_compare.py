"""Builds of the library side by side in one process, beside torch SDPA's flash (FlashAttention-2's own sm_80
kernels) and cuDNN backends, and FlashAttention-4 (`flash_attn.cute`) where it is importable: each shape's
forward and backward through the C API of every build, in interleaved rounds (the order rotating from round to
round; median of the rounds' medians; each timing over --calls back-to-back calls), on the same tensors. For checking
that a change leaves the kernels' speed alone (or by how much it moves it), and with
FLASH_ATTENTION_PLUS_PORTABLE_KERNELS=1 for timing the mma.sync kernels against FlashAttention-2 on one GPU.

    python bench/ab_compare.py --out results.json before=old/libflash_attn_plus.so after=build/libflash_attn_plus.so

Shapes: bf16, batch x seqlen = 16k tokens, heads x head_dim = 2048, head dims 64/128/256, 1k/4k/16k, causal or
not (--quick: 4k and 16k at d = 128). TFLOP/s with FlashAttention's convention (forward 4 b h sq sk d, halved for
causal; backward 2.5x). Ratios: every build to the first one, to SDPA flash and to FlashAttention-4. The first
forward and backward call of each shape is recorded for every build (`NAME_first_call_s`: its kernels' run-time
compile, into an empty kernel cache unless --warm-cache) and for FA4 (`fa4_first_call_s`). --deterministic adds
every build's deterministic mode (`NAME_det`).
"""
import argparse
import ctypes
import json

import os
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fap_ctypes as fc
from timing import time_ms


def library_calls(lib, q, k, v, dout, causal, deterministic=False):
    """(forward, backward) through the C API of one build, each with its own outputs, and the seconds its first
    forward and backward took."""
    out, grads = torch.empty_like(q), [torch.empty_like(x) for x in (q, k, v)]
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], device="cuda")
    options = lib.fap_default_options()
    options.causal = int(causal)
    options.deterministic = int(deterministic)
    fwd = fc.FwdArgs(q=fc.tensor(q), k=fc.tensor(k), v=fc.tensor(v), out=fc.tensor(out), softmax_lse=fc.tensor(lse))
    bwd = fc.BwdArgs(q=fc.tensor(q), k=fc.tensor(k), v=fc.tensor(v), out=fc.tensor(out), dout=fc.tensor(dout),
                     softmax_lse=fc.tensor(lse), dq=fc.tensor(grads[0]), dk=fc.tensor(grads[1]), dv=fc.tensor(grads[2]))
    size = ctypes.c_size_t()
    fc.check(lib, lib.fap_mha_bwd_workspace_size(ctypes.byref(bwd), ctypes.byref(options), ctypes.byref(size)))
    workspace = torch.empty(max(size.value, 16), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream

    def forward():
        fc.check(lib, lib.fap_mha_fwd(ctypes.byref(fwd), ctypes.byref(options), stream, None, 0))

    def backward():
        fc.check(lib, lib.fap_mha_bwd(ctypes.byref(bwd), ctypes.byref(options), stream, workspace.data_ptr(),
                                      size.value))

    start = time.perf_counter()
    forward()  # out and lse for the backward
    backward()
    torch.cuda.synchronize()
    return (forward, backward), time.perf_counter() - start


def sdpa_calls(backend, q, k, v, dout, causal):
    """(forward, backward) of torch SDPA with one backend ((batch, heads, seqlen, d) views of the same tensors)."""
    tq, tk, tv = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    tdout = dout.transpose(1, 2)
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

    def forward():
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

    def backward():
        torch.autograd.grad(out, (tq, tk, tv), tdout, retain_graph=True)

    return forward, backward


def fa4_calls(q, k, v, dout, causal):
    """(forward, backward) of FlashAttention-4 on the same tensors, and the seconds its first call took."""
    from flash_attn.cute import flash_attn_func

    tq, tk, tv = (x.detach().requires_grad_() for x in (q, k, v))
    start = time.perf_counter()
    out = flash_attn_func(tq, tk, tv, causal=causal)[0]
    torch.autograd.grad(out, (tq, tk, tv), dout, retain_graph=True)
    torch.cuda.synchronize()
    first_call = time.perf_counter() - start

    def forward():
        flash_attn_func(tq, tk, tv, causal=causal)

    def backward():
        torch.autograd.grad(out, (tq, tk, tv), dout, retain_graph=True)

    return (forward, backward), first_call


def fa4_importable():
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError as error:
        print(f"FlashAttention-4 not timed: {error}")
        return False
    return True


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("builds", nargs="+", help="NAME=path of a libflash_attn_plus.so; the first is the reference")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="d = 128 at 4k and 16k only")
    parser.add_argument("--head-dims", type=int, nargs="+", help="instead of 64, 128, 256")
    parser.add_argument("--seqlens", type=int, nargs="+", help="instead of 1k, 4k, 16k")
    parser.add_argument("--directions", default="fwd,bwd", help="fwd, bwd or both (comma-separated)")
    parser.add_argument("--calls", type=int, default=10,
                        help="back-to-back calls per timed interval, so that a call's host time under its GPU time "
                             "does not count (FlashAttention-4's host path is Python)")
    parser.add_argument("--deterministic", action="store_true",
                        help="also time every build in the deterministic mode, as NAME_det")
    parser.add_argument("--out", default="ab_compare.json")
    parser.add_argument("--warm-cache", action="store_true",
                        help="keep the kernel cache (FLASH_ATTENTION_PLUS_CACHE_DIR); by default an empty one")
    args = parser.parse_args()
    if not args.warm_cache:  # read at the libraries' first call
        os.environ["FLASH_ATTENTION_PLUS_CACHE_DIR"] = tempfile.mkdtemp(prefix="fap_kernels_")
    directions = args.directions.split(",")
    libraries = {name: fc.load(path) for name, path in (b.split("=", 1) for b in args.builds)}
    first = next(iter(libraries))
    with_fa4 = fa4_importable()
    head_dims, seqlens = ((128,), (4096, 16384)) if args.quick else ((64, 128, 256), (1024, 4096, 16384))
    head_dims, seqlens = args.head_dims or head_dims, args.seqlens or seqlens
    rows = []
    for head_dim in head_dims:
        for seqlen in seqlens:
            for causal in (False, True):
                batch, heads = 16384 // seqlen, 2048 // head_dim
                q, k, v, dout = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)
                                 for _ in range(4))
                calls, first_calls = {}, {}
                for name, lib in libraries.items():
                    calls[name], first_calls[name] = library_calls(lib, q, k, v, dout, causal)
                    if args.deterministic:
                        calls[f"{name}_det"], first_calls[f"{name}_det"] = library_calls(lib, q, k, v, dout, causal,
                                                                                      deterministic=True)
                for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                                      ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                    try:
                        calls[name] = sdpa_calls(backend, q, k, v, dout, causal)
                    except RuntimeError as error:  # a backend that does not take the shape
                        print(f"{name}: {str(error).splitlines()[0]}")
                if with_fa4:
                    calls["fa4"], first_calls["fa4"] = fa4_calls(q, k, v, dout, causal)
                times = {(name, kind): [] for name in calls for kind in directions}
                for round_index in range(args.rounds):
                    order = list(calls.items())
                    shift = round_index % len(order)
                    for name, (forward, backward) in order[shift:] + order[:shift]:  # rotate who goes first
                        for kind, call in (("fwd", forward), ("bwd", backward)):
                            if kind in directions:
                                times[(name, kind)].append(time_ms(call, warmup=3, repeat=10, calls=args.calls))
                flops = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
                row = {"head_dim": head_dim, "seqlen": seqlen, "causal": causal}
                row.update({f"{name}_first_call_s": seconds for name, seconds in first_calls.items()})
                for (name, kind), values in times.items():
                    ms = sorted(values)[len(values) // 2]
                    row[f"{kind}_{name}_tflops"] = flops * (2.5 if kind == "bwd" else 1) / ms / 1e9
                text = f"d={head_dim:3d} s={seqlen:5d} causal={int(causal)}"
                for kind in directions:
                    text += f"  {kind}"
                    for name in calls:
                        row[f"{kind}_{name}_over_{first}"] = row[f"{kind}_{name}_tflops"] / row[f"{kind}_{first}_tflops"]
                        if "sdpa_flash" in calls:
                            row[f"{kind}_{name}_over_fa2"] = row[f"{kind}_{name}_tflops"] / row[f"{kind}_sdpa_flash_tflops"]
                        if "fa4" in calls:
                            row[f"{kind}_{name}_over_fa4"] = row[f"{kind}_{name}_tflops"] / row[f"{kind}_fa4_tflops"]
                        text += f" {name} {row[f'{kind}_{name}_tflops']:6.1f}"
                        ours = name in libraries or name.removesuffix("_det") in libraries
                        if ours and "sdpa_flash" in calls:
                            text += f" ({row[f'{kind}_{name}_over_fa2']:.2f}x FA2)"
                        if ours and "fa4" in calls:
                            text += f" ({row[f'{kind}_{name}_over_fa4']:.2f}x FA4)"
                text += "  first call " + " ".join(f"{name} {seconds:.2f} s" for name, seconds in first_calls.items())
                rows.append(row)
                print(text, flush=True)
    with open(args.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "builds": args.builds,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
