"""The CUDA kernels are compiled once per configuration: new batch sizes and sequence lengths reuse the
compiled kernel (they are kernel arguments), and a new process finds it in the disk cache."""
import os
import subprocess
import sys

import pytest

CALLS = r"""
import torch, flash_attn_plus as fap
for batch, seqlen_q, seqlen_k in ((1, 128, 128), (3, 77, 300), (8, 1000, 999), (2, 1, 4096)):
    q = torch.randn(batch, seqlen_q, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(batch, seqlen_k, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    fap.flash_attn_func(q, k, v, causal=True).sum().backward()
torch.cuda.synchronize()
"""


def _compile_log(cache_dir, code=CALLS):
    """The lines of stderr that report a compilation or a marker, for `code` run in a new process."""
    env = {key: value for key, value in os.environ.items() if key != "FLASH_ATTENTION_PLUS_JIT_QUIET"}
    env["FLASH_ATTENTION_PLUS_CACHE_DIR"] = str(cache_dir)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stderr.splitlines() if "compiling" in line or line == "MARK"]


def test_batch_and_sequence_lengths_never_recompile(device, tmp_path):
    if device.type != "cuda":
        pytest.skip("compiles CUDA kernels")
    first = _compile_log(tmp_path)
    assert len(first) == 2, first  # one forward and one backward configuration for all four shapes
    assert _compile_log(tmp_path) == []  # a new process: both from the disk cache


def test_precompile_compiles_what_the_calls_use(device, tmp_path):
    if device.type != "cuda":
        pytest.skip("compiles CUDA kernels")
    log = _compile_log(tmp_path, "import sys, torch, flash_attn_plus as fap\n"
                                 "fap.precompile(head_dims=(64,), causal=(True,))\n"
                                 "print('MARK', file=sys.stderr, flush=True)\n" + CALLS)
    # Forward and backward compiled before the calls, the forward in both schedules of the sm_90 kernel (short
    # calls persistent, long ones one CTA per row block) where the GPU has it.
    forward = sum("attention_fwd" in line for line in log[:-1])
    assert log[-1] == "MARK" and forward in (1, 2) and len(log) == forward + 2, log


def test_a_forward_autograd_will_differentiate_compiles_the_backward_ahead(device, tmp_path):
    """The backward's kernels start compiling during the first forward (on another thread); without gradients
    (no_grad, or inputs that need none) nothing but the forward's kernels is compiled."""
    if device.type != "cuda":
        pytest.skip("compiles CUDA kernels")
    forward_only = ("import sys, threading, torch, flash_attn_plus as fap\n"
                    "q, k, v = (torch.randn(2, 64, 4, 64, device='cuda', dtype=torch.float16, requires_grad={grad})"
                    " for _ in range(3))\n"
                    "fap.flash_attn_func(q, k, v, causal=True)\n"
                    "[t.join() for t in threading.enumerate() if t is not threading.main_thread()]\n")
    with_grad = _compile_log(tmp_path / "grad", forward_only.format(grad=True))
    assert len(with_grad) == 2 and sum("attention_bwd" in line for line in with_grad) == 1, with_grad
    without = _compile_log(tmp_path / "nograd", forward_only.format(grad=False))
    assert len(without) == 1 and "attention_fwd" in without[0], without


def test_precompile_is_for_cuda():
    import flash_attn_plus as fap
    with pytest.raises(fap.InvalidArgumentError, match="device"):
        fap.precompile(head_dims=(64,), device="cpu")
