"""Two builds of the library timed side by side in one process: each shape's forward and backward through the C
API of build A and of build B, in interleaved rounds (each build first in every other round; median of the
rounds' medians), on the same tensors. For checking that a change leaves the kernels' speed alone (or by how
much it moves it).

    python bench/ab_compare.py --a old/libflash_attn_plus.so --b build/libflash_attn_plus.so --out results.json

Shapes: bf16, batch x seqlen = 16k tokens, heads x head_dim = 2048, head dims 64/128/256, 1k/4k/16k, causal or
not. TFLOP/s with FlashAttention's convention (forward 4 b h sq sk d, halved for causal; backward 2.5x).
"""
import argparse
import ctypes
import json

import torch

import fap_ctypes as fc
from timing import time_ms


def prepare(lib, q, k, v, out, lse, dout, grads, causal):
    options = lib.fap_default_options()
    options.causal = int(causal)
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

    return forward, backward


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--a", required=True, help="the first build's libflash_attn_plus.so (e.g. the previous commit)")
    parser.add_argument("--b", required=True, help="the second build's")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="ab_compare.json")
    args = parser.parse_args()
    libraries = {"a": fc.load(args.a), "b": fc.load(args.b)}
    rows = []
    for head_dim in (64, 128, 256):
        for seqlen in (1024, 4096, 16384):
            for causal in (False, True):
                batch, heads = 16384 // seqlen, 2048 // head_dim
                q, k, v, dout = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)
                                 for _ in range(4))
                out = torch.empty_like(q)
                lse = torch.empty(batch, heads, seqlen, device="cuda")
                grads = [torch.empty_like(x) for x in (q, k, v)]
                calls = {name: prepare(lib, q, k, v, out, lse, dout, grads, causal) for name, lib in libraries.items()}
                times = {(name, kind): [] for name in calls for kind in ("fwd", "bwd")}
                for round_index in range(args.rounds):
                    order = list(calls.items())
                    for name, (forward, backward) in order[::-1] if round_index % 2 else order:  # alternate who goes first
                        times[(name, "fwd")].append(time_ms(forward, warmup=3, repeat=10))
                        forward()  # out and lse of this build for its backward
                        times[(name, "bwd")].append(time_ms(backward, warmup=3, repeat=10))
                flops = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
                row = {"head_dim": head_dim, "seqlen": seqlen, "causal": causal}
                for (name, kind), values in times.items():
                    ms = sorted(values)[len(values) // 2]
                    row[f"{kind}_{name}_tflops"] = flops * (2.5 if kind == "bwd" else 1) / ms / 1e9
                row["fwd_b_over_a"] = row["fwd_b_tflops"] / row["fwd_a_tflops"]
                row["bwd_b_over_a"] = row["bwd_b_tflops"] / row["bwd_a_tflops"]
                rows.append(row)
                print(f"d={head_dim:3d} s={seqlen:5d} causal={int(causal)}  fwd {row['fwd_a_tflops']:6.1f} -> "
                      f"{row['fwd_b_tflops']:6.1f} ({row['fwd_b_over_a']:.3f}x)   bwd {row['bwd_a_tflops']:6.1f} -> "
                      f"{row['bwd_b_tflops']:6.1f} ({row['bwd_b_over_a']:.3f}x)", flush=True)
    with open(args.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "a": args.a, "b": args.b, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
