"""CUDA event timing shared by the GPU benchmarks: the median of `repeat` runs after `warmup` runs. A run makes
`calls` calls back to back (with more than one, host work overlaps the GPU's) and counts the time per call."""
import torch


def time_ms(fn, warmup=5, repeat=20, calls=1):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]
