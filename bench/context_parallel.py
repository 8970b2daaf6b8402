"""Context-parallel attention on one and on several GPUs of a host: tokens per second of a forward + backward step
and the memory each GPU adds to its inputs, for one sequence per step.

    python3 bench/context_parallel.py --world-sizes 1 2 --seqlens 32768 131072 --out results.json

One GPU runs flash_attn_func over the whole sequence; N GPUs run ring attention (zigzag layout under a causal
mask, contiguous otherwise) over N shards, one process per GPU over NCCL. Memory per GPU from torch's allocator,
beyond the inputs and their gradients (q, k, v, dout, dq, dk, dv of the rank's shard): `saved_gib` is what the
forward leaves for the backward (the output and what autograd keeps: a model's activation memory grows with it,
layer by layer), `peak_gib` the step's peak (transient buffers included: one layer's at a time).
"""
import argparse
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist


def _step_function(world_size, layout, causal):
    import flash_attn_plus as fap
    from flash_attn_plus import context_parallel as cp
    if world_size == 1:
        return lambda q, k, v: fap.flash_attn_func(q, k, v, causal=causal)
    return lambda q, k, v: cp.ring_flash_attn_func(q, k, v, causal=causal, layout=layout)


def _rank_main(rank, world_size, store, args, results_path):
    torch.cuda.set_device(rank)
    if world_size > 1:
        dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world_size)
    layout = "zigzag" if args.causal else "contiguous"
    step = _step_function(world_size, layout, args.causal)
    rows = []
    for seqlen in args.seqlens:
        local = seqlen // world_size
        shape_q = (1, local, args.heads, args.head_dim)
        shape_kv = (1, local, args.heads_k, args.head_dim)
        q = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        dout = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16)
        for _ in range(args.warmup):
            step(q, k, v).backward(dout)
        torch.cuda.synchronize()
        q.grad, k.grad, v.grad = (torch.zeros_like(x) for x in (q, k, v))
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            if world_size > 1:
                dist.barrier()
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = step(q, k, v)
            saved = torch.cuda.memory_allocated() - base  # out and what autograd keeps for the backward
            out.backward(dout)
            del out
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds = sorted(times)[len(times) // 2]
        if world_size > 1:  # the step ends when the slowest rank ends
            slowest = torch.tensor([seconds], device="cuda")
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            seconds = slowest.item()
        rows.append(dict(world_size=world_size, seqlen=seqlen, seconds=seconds, tokens_per_s=seqlen / seconds,
                         saved_gib=saved / 2**30, peak_gib=(torch.cuda.max_memory_allocated() - base) / 2**30,
                         rank=rank, layout=layout if world_size > 1 else "whole"))
        del q, k, v, dout
        torch.cuda.empty_cache()
    if rank == 0:
        with open(results_path, "w") as f:
            json.dump(rows, f)
    if world_size > 1:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[32768, 65536, 131072, 262144])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--heads-k", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = []
    for world_size in args.world_sizes:
        if world_size > torch.cuda.device_count():
            print(f"world size {world_size}: only {torch.cuda.device_count()} GPUs")
            continue
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "rows.json")
            torch.multiprocessing.spawn(_rank_main, args=(world_size, os.path.join(folder, "store"), args, path),
                                        nprocs=world_size, join=True)
            with open(path) as f:
                results += json.load(f)
    single = {row["seqlen"]: row["tokens_per_s"] for row in results if row["world_size"] == 1}
    for row in results:
        if row["seqlen"] in single:
            row["speedup_vs_one_gpu"] = row["tokens_per_s"] / single[row["seqlen"]]
        print(f"{row['world_size']} GPU(s) seqlen {row['seqlen']:>7}: {row['tokens_per_s']:>10.0f} tokens/s "
              f"({row['seconds'] * 1e3:8.1f} ms), saved for backward {row['saved_gib']:.2f} GiB/GPU, step peak "
              f"{row['peak_gib']:.2f} GiB/GPU, "
              f"x{row.get('speedup_vs_one_gpu', float('nan')):.2f} vs one GPU")
    config = dict(heads=args.heads, heads_k=args.heads_k, head_dim=args.head_dim, causal=args.causal,
                  dtype="bfloat16", gpu=torch.cuda.get_device_name(0), torch=torch.__version__)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(config=config, results=results), f, indent=1)


if __name__ == "__main__":
    main()
