"""Host time of each step of an eager forward call (flash_attn_func on a tiny CUDA problem, the GPU never
holding the host back), to see where bench/host_overhead.py's forward time goes. Each step is timed alone in a
loop of back-to-back calls (host_overhead.host_us).

    python bench/host_steps.py      (needs flash_attn_plus importable and a CUDA GPU)
"""
import threading

import torch

import flash_attn_plus as fap
from flash_attn_plus import backends, interface, ops
from flash_attn_plus._library import _C
from flash_attn_plus._tensors import allocate_workspace, stream_of
from host_overhead import host_us


def main():
    q, k, v = (torch.randn(1, 128, 1, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    # Warm up: kernels compiled or loaded, and the backward's compile thread (started by the first forward that
    # records autograd) finished, so that it takes no time from the steps.
    fap.flash_attn_func(q, k, v).sum().backward()
    for thread in threading.enumerate():
        if thread.name.startswith("flash_attn_plus"):
            thread.join()
    torch.cuda.synchronize()
    options = ops.Options(q.shape[-1] ** -0.5, False, -1, -1, 0.0, 0.0, False)
    out, lse, _ = ops._forward_outputs(q, k, None, 0, 0, False, False)
    c_options = ops._c_options(options)
    stream = stream_of(q)
    steps = {
        "flash_attn_func (autograd recording)": lambda: fap.flash_attn_func(q, k, v),
        "arguments: contiguity, window, Options": lambda: (
            interface._require_tensors(q=q, k=k, v=v), interface.maybe_contiguous(q), interface.maybe_contiguous(k),
            interface.maybe_contiguous(v), interface.window_pair((-1, -1)),
            ops.Options(q.shape[-1] ** -0.5, False, -1, -1, 0.0, 0.0, False)),
        "_traced(q, k, v)": lambda: ops._traced(q, k, v),
        "_compile_backward_ahead (already started)": lambda: ops._compile_backward_ahead(q, None, options),
        "_forward_outputs (out, lse)": lambda: ops._forward_outputs(q, k, None, 0, 0, False, False),
        "backends.python_backend()": backends.python_backend,
        "stream_of(q)": lambda: stream_of(q),
        "_c_options(options)": lambda: ops._c_options(options),
        "_C.forward (outputs given)": lambda: _C.forward(False, q, k, v, out, lse, None, None, None, None, None, 0, 0,
                                                         None, c_options, 0, 0, stream, allocate_workspace),
        "_forward (no autograd)": lambda: ops._forward(q, k, v, None, None, None, None, None, 0, 0, False, options),
    }
    for name, step in steps.items():
        print(f"{name}: {host_us(step):.1f} us", flush=True)
    with torch.no_grad():
        print(f"flash_attn_func (no autograd): {host_us(lambda: fap.flash_attn_func(q, k, v)):.1f} us", flush=True)


if __name__ == "__main__":
    main()
