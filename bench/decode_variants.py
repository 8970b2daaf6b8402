"""Builds of the library side by side on the decode benchmark's main table (GQA 32/8, d 128, bf16, one query row;
dense caches, or paged ones with --pages): each build's KV-cache call through the C API (bench/fap_ctypes.py),
timed inside a CUDA graph of 20 calls, in interleaved rounds. For choosing the decode kernels' tile shape and split
rule between builds that differ only there. --layout heads-outer stores each head's rows contiguously (the cache
tensor a strided view of (batch, heads, length, d)) instead of FA2's interleaved (batch, length, heads, d);
--cudnn times torch SDPA's cuDNN backend on the same caches in the same rounds.

    python bench/decode_variants.py --out results.json NAME=path/libflash_attn_plus.so ...
"""
import argparse
import ctypes
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fap_ctypes as fc
from decode import graph_ms, paged_copy


def kv_cache_call(lib, q, k, v, out, lse, seqlens, num_splits, table=None):
    options = lib.fap_default_options()
    args = fc.FwdArgs(q=fc.tensor(q), k=fc.tensor(k), v=fc.tensor(v), out=fc.tensor(out), softmax_lse=fc.tensor(lse),
                      cache_seqlens=fc.tensor(seqlens), rotary_interleaved=1, num_splits=num_splits)
    if table is not None:
        args.block_table = fc.tensor(table)
    size = ctypes.c_size_t()
    fc.check(lib, lib.fap_mha_fwd_workspace_size(ctypes.byref(args), ctypes.byref(options), ctypes.byref(size)))
    workspace = torch.empty(max(size.value, 16), dtype=torch.uint8, device="cuda")

    def call():
        stream = torch.cuda.current_stream().cuda_stream
        fc.check(lib, lib.fap_mha_fwd(ctypes.byref(args), ctypes.byref(options), stream, workspace.data_ptr(),
                                      size.value))
    return call


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("builds", nargs="+", help="NAME=path of a libflash_attn_plus.so")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--splits", default="0", help="comma-separated num_splits values to try with every build")
    parser.add_argument("--pages", default="0", help="comma-separated page sizes (0: a dense cache)")
    parser.add_argument("--layout", choices=("interleaved", "heads-outer"), default="interleaved")
    parser.add_argument("--cudnn", action="store_true", help="also time SDPA's cuDNN backend (dense caches)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    libraries = {name: fc.load(path) for name, path in (b.split("=", 1) for b in args.builds)}
    clashes = set(libraries) & {"batch", "cache", "page", "num_splits", "cudnn"}
    if clashes:
        parser.error(f"build names {sorted(clashes)} are the rows' own keys")
    rows = []
    for batch, length in ((1, 8192), (1, 65536), (32, 4096), (32, 32768), (128, 4096)):
        q = torch.randn(batch, 1, 32, 128, dtype=torch.bfloat16, device="cuda")
        if args.layout == "heads-outer":
            k, v = (torch.randn(batch, 8, length, 128, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
                    for _ in range(2))
        else:
            k, v = (torch.randn(batch, length, 8, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        seqlens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
        out, lse = torch.empty_like(q), torch.empty(batch, 32, 1, device="cuda")
        gbytes = 2 * k.numel() * 2 / 1e9
        for page, splits in ((int(p), int(s)) for p in args.pages.split(",") for s in args.splits.split(",")):
            k_cache, v_cache, table = k, v, None
            if page:
                k_cache, table = paged_copy(k, page)
                v_cache, _ = paged_copy(v, page, table)
            calls = {name: kv_cache_call(lib, q, k_cache, v_cache, out, lse, seqlens, splits, table)
                     for name, lib in libraries.items()}
            if args.cudnn and not page:
                qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

                def cudnn_call():
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
                calls["cudnn"] = cudnn_call
            times = {name: [] for name in calls}
            for round_index in range(args.rounds):
                order = list(calls.items())
                for name, call in order[::-1] if round_index % 2 else order:
                    times[name].append(graph_ms(call))
            row = {"batch": batch, "cache": length, "page": page, "num_splits": splits}
            row.update({name: round(gbytes / sorted(t)[len(t) // 2], 3) for name, t in times.items()})
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as handle:
        json.dump({"gpu": torch.cuda.get_device_name(), "unit": "TB/s", "layout": args.layout, "builds": args.builds,
                   "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
