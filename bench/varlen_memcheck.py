"""Run under compute-sanitizer (memcheck): varlen calls whose device-resident cu_seqlens are corrupt (decreasing,
past the end of the tensors, negative) must read and write nothing out of bounds, forward and backward, on every
kernel family (Hopper's and the mma.sync ones: FLASH_ATTENTION_PLUS_PORTABLE_KERNELS=1 forces the latter). Then
the same calls with the index checks on must each raise an error naming the argument.

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/varlen_memcheck.py
"""
import torch

import flash_attn_plus as fap

torch.manual_seed(0)
heads, heads_k, dim, total = 8, 2, 128, 300
CORRUPT = {
    "decreasing": ([0, 200, 120, 300], [0, 200, 120, 300]),
    "past the end": ([0, 100, 250, 1 << 20], [0, 100, 250, 300]),
    "keys past the end": ([0, 100, 250, 300], [0, 100, 9000, 1 << 30]),
    "negative": ([0, -50, 100, 300], [-7, 100, 200, 300]),
}


def call(cu_q, cu_k, backward):
    q = torch.randn(total, heads, dim, dtype=torch.bfloat16, device="cuda", requires_grad=backward)
    k, v = (torch.randn(total, heads_k, dim, dtype=torch.bfloat16, device="cuda", requires_grad=backward)
            for _ in range(2))
    out = fap.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 256, 256, causal=True)
    if backward:
        out.backward(torch.ones_like(out))
    torch.cuda.synchronize()


for name, (q_offsets, k_offsets) in CORRUPT.items():
    cu_q, cu_k = (torch.tensor(x, dtype=torch.int32, device="cuda") for x in (q_offsets, k_offsets))
    for backward in (False, True):
        call(cu_q, cu_k, backward)
    print(f"{name}: forward and backward ran", flush=True)
    with fap.checked_indices():
        try:
            call(cu_q, cu_k, False)
            raise SystemExit(f"{name}: the index checks raised nothing")
        except fap.InvalidArgumentError as error:
            print(f"{name}: checked mode: {error}", flush=True)
