"""The two routes of flash_attn_plus.ops: eager calls reach the library without the custom ops' dispatch, traced
calls (a dispatch mode, as AOTAutograd and make_fx use) go through the custom ops; both give the same results,
forward and backward, dropout included."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flash_attn_plus as fap
from flash_attn_plus import ops


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _step(q, k, v, dout, **options):
    out = fap.flash_attn_func(q, k, v, **options)
    return (out,) + torch.autograd.grad(out, (q, k, v), dout)


def _inputs(device, dtype=torch.bfloat16):
    q, k, v = (torch.randn(2, 45, 4, 32, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    return q, k, v, torch.randn(2, 45, 4, 32, dtype=dtype, device=device)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_eager_route_skips_the_custom_ops(device, monkeypatch, dropout_p):
    q, k, v, dout = _inputs(device)
    options = dict(causal=True, softcap=3.0, dropout_p=dropout_p)
    torch.manual_seed(5)
    with _OpLog() as log:
        traced = _step(q, k, v, dout, **options)
    assert "flash_attn_plus.fwd.default" in log.names and "flash_attn_plus.bwd.default" in log.names

    def refuse(*args, **kwargs):
        raise AssertionError("an eager call reached a custom op")

    monkeypatch.setattr(ops, "attention_forward_op", refuse)
    monkeypatch.setattr(ops, "attention_backward_op", refuse)
    torch.manual_seed(5)  # the same dropout draw
    eager = _step(q, k, v, dout, **options)
    for mine, theirs in zip(eager, traced):
        assert torch.equal(mine, theirs)


def test_eager_route_keeps_fa2_outputs(device):
    q, k, v, _ = _inputs(device)
    out, lse, s_dmask = fap.flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.requires_grad and not lse.requires_grad
    assert lse.shape == (2, 4, 45) and lse.dtype == torch.float32 and s_dmask.numel() == 0
    with torch.no_grad():
        assert not fap.flash_attn_func(q, k, v).requires_grad

