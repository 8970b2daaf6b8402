"""Shared machinery of the attention tests: inputs for each FA2 function, the float64 reference, plain
low-precision PyTorch, and FA2's error rule (ours at most 2x, gradients 3x, plain PyTorch's error, both
measured against float64)."""
import torch

import flash_attn_plus as fap
from reference import attention

# name: (causal, window_size)
MASKS = {"none": (False, (-1, -1)), "causal": (True, (-1, -1)), "local": (False, (17, 5)),
         "causal_local": (True, (23, -1))}


def feature_options(feature, batch, heads, device):
    """softcap / alibi_slopes for a named feature."""
    if feature == "softcap":
        return {"softcap": 4.0}
    if feature == "alibi":
        return {"alibi_slopes": torch.rand(heads, device=device, dtype=torch.float32) * 0.3}
    if feature == "alibi_batch":
        return {"alibi_slopes": torch.rand(batch, heads, device=device, dtype=torch.float32) * 0.3}
    return {}


class Packing:
    """How a function takes q, k, v: separate, kv packed or qkv packed (dense layout)."""

    def __init__(self, name):
        self.name = name

    def make(self, batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, dtype, device):
        def randn(*shape):
            return torch.randn(*shape, dtype=dtype, device=device)

        if self.name == "func":
            return [randn(batch, seqlen_q, heads, head_dim), randn(batch, seqlen_k, heads_k, head_dim),
                    randn(batch, seqlen_k, heads_k, head_dim)]
        if self.name == "kvpacked":
            return [randn(batch, seqlen_q, heads, head_dim), randn(batch, seqlen_k, 2, heads_k, head_dim)]
        return [randn(batch, seqlen_q, 3, heads, head_dim)]

    def split(self, tensors):
        if self.name == "func":
            return tensors
        if self.name == "kvpacked":
            return [tensors[0], tensors[1][:, :, 0], tensors[1][:, :, 1]]
        return list(tensors[0].unbind(2))

    def call(self, tensors, **options):
        function = {"func": fap.flash_attn_func, "kvpacked": fap.flash_attn_kvpacked_func,
                    "qkvpacked": fap.flash_attn_qkvpacked_func}[self.name]
        return function(*tensors, **options)


def max_error(x, reference):
    return (x.double() - reference.double()).abs().max().item()


def check_rule(name, ours, reference, plain, factor):
    error, baseline = max_error(ours, reference), max_error(plain, reference)
    assert error <= factor * baseline + 1e-5, f"{name}: error {error:.3g} > {factor} x plain PyTorch's {baseline:.3g}"


def check_lse(lse, reference_lse):
    finite = torch.isfinite(reference_lse)
    assert torch.equal(torch.isinf(lse.double()), ~finite), "softmax_lse: +inf exactly on the rows with no key"
    if finite.any():
        error = (lse.double()[finite] - reference_lse[finite]).abs().max().item()
        assert error <= 1e-4 * (1 + reference_lse[finite].abs().max().item()), f"softmax_lse: error {error:.3g}"


def check_gradients(dout, outputs, names, ours, exact, plain):
    """Backward of (ours, float64 reference, plain PyTorch) = outputs from dout, then each named gradient of ours
    under FA2's rule (3x plain PyTorch's error)."""
    out, out_ref, out_pt = outputs
    out.backward(dout)
    out_ref.backward(dout.double())
    out_pt.backward(dout)
    for name, mine, reference, low in zip(names, ours, exact, plain):
        check_rule(f"d{name}", mine.grad, reference.grad, low.grad, 3)


def leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def grads(outputs_and_leaves, dout):
    out, tensors = outputs_and_leaves
    out.backward(dout.to(out.dtype))
    return [t.grad for t in tensors]
