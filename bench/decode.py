"""Decode benchmark: one new query row per sequence against a KV cache (flash_attn_with_kvcache), dense and paged,
beside torch SDPA's flash (FlashAttention-2) and cuDNN backends on the same cache in one run. Bandwidth = bytes of
K and V read / time; every call is timed inside a CUDA graph of 20 calls (GPU time only, no host time). Also the
host time of one eager decode call.

    python bench/decode.py --out DIR [--quick]     (needs flash_attn_plus importable and a CUDA GPU)
"""
import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_attn_plus as fap
from host_overhead import host_us

CALLS = 20


def graph_ms(fn):
    """GPU time per call of `fn`, captured CALLS times in one CUDA graph (median of 10 replays)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / CALLS)
    return sorted(times)[len(times) // 2]


def paged_copy(k, page, table=None):
    """k (batch, length, heads, d) as a cache of pages of `page` rows, placed by `table` (default: a shuffled
    order), and the table."""
    batch, length = k.shape[:2]
    blocks = (length + page - 1) // page
    if table is None:
        table = torch.randperm(batch * blocks, device=k.device).view(batch, blocks).int()
    cache = k.new_zeros(batch * blocks, page, *k.shape[2:])
    padded = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, blocks * page - length)).view(batch, blocks, page, *k.shape[2:])
    cache[table.long().flatten()] = padded.flatten(0, 1)
    return cache, table


def case(batch, length, heads, heads_k, dim, pages, dtype=torch.bfloat16):
    q = torch.randn(batch, 1, heads, dim, dtype=dtype, device="cuda")
    k = torch.randn(batch, length, heads_k, dim, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    seqlens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
    gbytes = 2 * k.numel() * k.element_size() / 1e9
    row = {"batch": batch, "cache": length, "heads": heads, "heads_k": heads_k, "head_dim": dim}

    def bandwidth(ms):
        return round(gbytes / ms, 3)  # GB / ms = TB/s

    ours = fap.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens)
    row["ours_dense"] = bandwidth(graph_ms(lambda: fap.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens)))
    for page in pages:
        k_cache, table = paged_copy(k, page)
        v_cache, _ = paged_copy(v, page, table)
        out = fap.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table)
        row[f"paged{page}_max_diff"] = (out.float() - ours.float()).abs().max().item()
        row[f"ours_paged{page}"] = bandwidth(graph_ms(
            lambda: fap.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table)))
        del k_cache, v_cache
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    reference = F.scaled_dot_product_attention(qt.float(), kt.float(), vt.float(), enable_gqa=True).transpose(1, 2)
    row["ours_max_error"] = (ours.float() - reference).abs().max().item()
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
                row[name] = bandwidth(graph_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)))
        except RuntimeError as error:
            row[name] = None
            row[f"{name}_error"] = str(error).splitlines()[0][:160]
    return row


def chunked_prefill(batch, chunk, length, page=16, heads=32, heads_k=8, dim=128, dtype=torch.bfloat16):
    """A chunk of `chunk` new query rows per sequence against its cache of `length` keys (the chunk's keys last),
    causal: the varlen call over a paged cache (the decode kernels) beside the same call over packed keys (the
    prefill kernels) and SDPA; TFLOP/s with FlashAttention's convention for a causal rectangle."""
    q = torch.randn(batch * chunk, heads, dim, dtype=dtype, device="cuda")
    k, v = (torch.randn(batch, length, heads_k, dim, dtype=dtype, device="cuda") for _ in range(2))
    cu_q = torch.arange(0, (batch + 1) * chunk, chunk, dtype=torch.int32, device="cuda")
    cu_k = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device="cuda")
    k_cache, table = paged_copy(k, page)
    v_cache, _ = paged_copy(v, page, table)
    packed_k, packed_v = k.flatten(0, 1), v.flatten(0, 1)
    # Row i of the chunk sees keys up to length - chunk + i: (chunk * length - chunk^2 / 2) products per head.
    flops = 4 * batch * heads * dim * (chunk * length - chunk * chunk / 2)
    row = {"batch": batch, "chunk": chunk, "cache": length, "page": page}
    calls = {
        "ours_paged": lambda: fap.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, chunk, length, causal=True,
                                                         block_table=table),
        "ours_packed": lambda: fap.flash_attn_varlen_func(q, packed_k, packed_v, cu_q, cu_k, chunk, length,
                                                          causal=True),
    }
    qt, kt, vt = q.view(batch, chunk, heads, dim).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    bottom_right = torch.ones(chunk, length, dtype=torch.bool, device="cuda").tril(length - chunk)
    calls["sdpa_efficient_masked"] = lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bottom_right,
                                                                             enable_gqa=True)
    for name, call in calls.items():
        try:
            row[name] = round(flops / graph_ms(call) / 1e9, 1)
        except RuntimeError as error:
            row[name], row[f"{name}_error"] = None, str(error).splitlines()[0][:160]
    return row


def decode_host_us():
    """Host time of an eager decode call and of SDPA's on the same cache (host_overhead.host_us)."""
    q = torch.randn(8, 1, 32, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(8, 1024, 8, 128, dtype=torch.bfloat16, device="cuda")
    seqlens = torch.full((8,), 1024, dtype=torch.int32, device="cuda")
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    return {"ours": round(host_us(lambda: fap.flash_attn_with_kvcache(q, k, k, cache_seqlens=seqlens), 300), 1),
            "sdpa": round(host_us(lambda: F.scaled_dot_product_attention(qt, kt, kt, enable_gqa=True), 300), 1)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="only the GQA 32/8, d 128 table")
    parser.add_argument("--prefill", action="store_true", help="only chunked prefill over a paged cache")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.prefill:
        rows = [chunked_prefill(batch, chunk, length) for batch, chunk, length in
                ((4, 512, 4096), (4, 2048, 8192), (16, 128, 2048))]
        for row in rows:
            print(json.dumps(row), flush=True)
        with open(f"{args.out}/prefill.json", "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "unit": "TFLOP/s",
                       "rows": rows}, handle, indent=1)
        return
    rows = []
    shapes = [(1, 8192), (1, 65536), (32, 4096), (32, 32768), (128, 4096)]
    for batch, length in shapes:
        rows.append(case(batch, length, 32, 8, 128, (16, 256)))
        print(json.dumps(rows[-1]), flush=True)
    if not args.quick:
        for heads_k, dim in ((32, 128), (8, 64), (8, 256)):
            for batch, length in ((1, 1024), (1, 16384), (16, 8192), (64, 2048)):
                rows.append(case(batch, length, 32, heads_k, dim, (1, 16, 256) if dim == 128 else (16,)))
                print(json.dumps(rows[-1]), flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
              "rows": rows, "host_us": decode_host_us()}
    print(json.dumps(result["host_us"]))
    with open(f"{args.out}/decode.json", "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
