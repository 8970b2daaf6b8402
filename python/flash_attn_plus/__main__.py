"""python -m flash_attn_plus [batch seqlen heads head_dim]

The package's demo: the backends this machine has, then one causal attention (forward and backward) through
the best usable backend, on the GPU in bfloat16 when torch sees one, else on the CPU in float32, checked
against float64 under FlashAttention-2's error rule and timed. Exits non-zero when a check fails.
"""
import math
import sys
import time

import torch

import flash_attn_plus as fap


def reference(q, k, v, dout, dtype):
    """(out, dq, dk, dv) of causal attention computed by plain PyTorch in `dtype` (float64: the reference)."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    query, key, value = (x.transpose(1, 2) for x in leaves)
    scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    seqlen = scores.shape[-1]
    mask = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).tril()
    out = (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ value).transpose(1, 2)
    return (out,) + torch.autograd.grad(out, leaves, dout.to(dtype))


def main(argv):
    batch, seqlen, heads, head_dim = (int(x) for x in argv) if argv else (2, 1024, 8, 64)
    fap.info()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"\nflash_attn_plus {fap.__version__} from {fap.__file__}")
    print(f"causal attention, batch {batch}, seqlen {seqlen}, {heads} heads, head dim {head_dim}, {dtype} on {device}")
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)

    def step():
        out = fap.flash_attn_func(q, k, v, causal=True)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, grads

    start = time.perf_counter()
    out, grads = step()
    first = time.perf_counter() - start
    start = time.perf_counter()
    step()
    again = time.perf_counter() - start

    ok = True
    exact, plain = (reference(q, k, v, dout, precision) for precision in (torch.float64, dtype))
    for name, ours, want, low in zip(("out", "dq", "dk", "dv"), (out,) + grads, exact, plain):
        error = (ours.double() - want).abs().max().item()
        baseline = (low.double() - want).abs().max().item()
        factor = 2 if name == "out" else 3
        passed = error <= factor * baseline + 1e-5
        ok &= passed
        print(f"  {name}: max error {error:.2e} vs plain PyTorch's {baseline:.2e} (rule: <= {factor}x) "
              f"{'ok' if passed else 'FAILED'}")
    print(f"first call (kernels compiled or loaded): {first * 1e3:.1f} ms; again: {again * 1e3:.2f} ms")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
