"""Dropout: the mask S_dmask reports is the one applied (forward and backward), its rate is dropout_p, it is
a pure function of torch's RNG state (manual_seed, checkpoint recomputation) and it changes between calls."""
import pytest
import torch
import torch.utils.checkpoint

import flash_attn_plus as fap
from attention_case import check_gradients, check_rule
from reference import allowed_keys, attention

pytestmark = pytest.mark.usefixtures("api_backend")  # every case on each backend (conftest.py)

P = 0.17


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (30, 10))])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(128, 128), (97, 160)])
def test_s_dmask_is_the_applied_mask(device, dtype, causal, window, seqlen_q, seqlen_k):
    batch, heads, head_dim = 2, 4, 32
    tensors = [torch.randn(batch, s, heads, head_dim, dtype=dtype, device=device, requires_grad=True)
               for s in (seqlen_q, seqlen_k, seqlen_k)]
    out, lse, s_dmask = fap.flash_attn_func(*tensors, dropout_p=P, causal=causal, window_size=window,
                                            return_attn_probs=True)
    assert s_dmask.shape == (batch, heads, -(-seqlen_q // 128) * 128, -(-seqlen_k // 128) * 128)
    s_dmask = s_dmask[:, :, :seqlen_q, :seqlen_k].double()
    allowed = allowed_keys(seqlen_q, seqlen_k, causal, window, device=device)
    keep = (s_dmask >= 0) | ~allowed
    dropped = (~keep & allowed).sum().item() / (allowed.sum().item() * batch * heads)
    assert abs(dropped - P) <= (0.01 if window == (-1, -1) else 0.025)

    exact = [t.detach().double().requires_grad_() for t in tensors]
    plain = [t.detach().clone().requires_grad_() for t in tensors]
    options = dict(causal=causal, window=window, keep=keep, dropout_p=P)
    out_ref, lse_ref = attention(*exact, **options)
    out_pt, _ = attention(*plain, dtype=dtype, **options)
    check_rule("out", out, out_ref, out_pt, 2)
    probs = s_dmask.abs() / s_dmask.abs().sum(-1, keepdim=True)  # one block: exp(s - rowmax) per element
    probs_ref = torch.softmax(_scores(exact, causal, window), dim=-1)
    assert (probs - probs_ref).abs().max().item() < 1e-2

    check_gradients(torch.randn_like(out), (out, out_ref, out_pt), "qkv", tensors, exact, plain)


def _check_against_mask(tensors, out, s_dmask, dout, causal, heads_k=None):
    """FA2's test recipe for one sequence: the reference rebuilt from S_dmask's signs (kept: >= 0) and its
    probabilities (|S_dmask| normalised per row), outputs and gradients under FA2's rule."""
    seqlen_q, seqlen_k = tensors[0].shape[1], tensors[1].shape[1]
    allowed = allowed_keys(seqlen_q, seqlen_k, causal, (-1, -1), device=s_dmask.device)
    keep = (s_dmask >= 0) | ~allowed
    exact = [t.detach().double().requires_grad_() for t in tensors]
    plain = [t.detach().clone().requires_grad_() for t in tensors]
    out_ref, _ = attention(*exact, causal=causal, keep=keep, dropout_p=P)
    out_pt, _ = attention(*plain, dtype=tensors[0].dtype, causal=causal, keep=keep, dropout_p=P)
    check_rule("out", out, out_ref, out_pt, 2)
    scores = _scores([t.repeat_interleave(tensors[0].shape[2] // t.shape[2], dim=2) for t in exact[:2]], causal,
                     (-1, -1))
    probs = s_dmask.abs() / s_dmask.abs().sum(-1, keepdim=True)
    assert (probs - torch.softmax(scores, dim=-1)).abs().max().item() < 1e-2
    out_ref.backward(dout.double())
    out_pt.backward(dout)
    return exact, plain


@pytest.mark.parametrize("layout", ["qkvpacked", "kvpacked_gqa", "varlen_gqa"])
@pytest.mark.parametrize("causal", [False, True])
def test_s_dmask_rebuilds_the_reference_in_every_layout(device, layout, causal):
    """FA2's own dropout tests rebuild their reference from S_dmask: the packed, GQA and varlen entry points
    return the mask they applied, in FA2's shapes."""
    heads, heads_k, head_dim = 4, (4 if layout == "qkvpacked" else 2), 32
    lengths = [70, 130] if layout.startswith("varlen") else [100, 100]
    q, k, v = ([torch.randn(length, h, head_dim, dtype=torch.bfloat16, device=device) for length in lengths]
               for h in (heads, heads_k, heads_k))
    dout = [torch.randn_like(x) for x in q]
    if layout.startswith("varlen"):
        cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32, device=device)
        leaves = [torch.cat(x).requires_grad_() for x in (q, k, v)]
        out, _, s_dmask = fap.flash_attn_varlen_func(*leaves, cu, cu, max(lengths), max(lengths), dropout_p=P,
                                                     causal=causal, return_attn_probs=True)
        assert s_dmask.shape == (2, heads, 256, 256)
        out.backward(torch.cat(dout))
        outs = out.split(lengths)
        grads = [x.grad.split(lengths) for x in leaves]
    else:
        if layout == "qkvpacked":
            packed = torch.stack([torch.stack(x) for x in (q, k, v)], dim=2).requires_grad_()
            out, _, s_dmask = fap.flash_attn_qkvpacked_func(packed, dropout_p=P, causal=causal, return_attn_probs=True)
        else:
            packed = torch.stack([torch.stack(x) for x in (k, v)], dim=2).requires_grad_()
            query = torch.stack(q).requires_grad_()
            out, _, s_dmask = fap.flash_attn_kvpacked_func(query, packed, dropout_p=P, causal=causal,
                                                           return_attn_probs=True)
        assert s_dmask.shape == (2, heads, 128, 128)
        out.backward(torch.stack(dout))
        outs = out.unbind(0)
        if layout == "qkvpacked":
            grads = [packed.grad[:, :, i].unbind(0) for i in range(3)]
        else:
            grads = [query.grad.unbind(0)] + [packed.grad[:, :, i].unbind(0) for i in range(2)]
    for b, length in enumerate(lengths):
        tensors = [x[b][None] for x in (q, k, v)]
        exact, plain = _check_against_mask(tensors, outs[b][None], s_dmask[b, :, :length, :length].double(),
                                           dout[b][None], causal)
        for name, mine, reference, low in zip("qkv", (g[b] for g in grads), exact, plain):
            check_rule(f"d{name}", mine[None], reference.grad, low.grad, 3)


def _scores(tensors, causal, window):
    q, k = tensors[:2]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.detach() * q.shape[-1] ** -0.5, k.detach())
    allowed = allowed_keys(q.shape[1], k.shape[1], causal, window, device=q.device)
    return scores.masked_fill(~allowed, float("-inf"))


def _qkv(device, requires_grad=False):
    return [torch.randn(2, 96, 4, 64, dtype=torch.bfloat16, device=device, requires_grad=requires_grad)
            for _ in range(3)]


def test_same_seed_same_mask_new_call_new_mask(device):
    q, k, v = _qkv(device)
    torch.manual_seed(7)
    first = fap.flash_attn_func(q, k, v, dropout_p=P)
    second = fap.flash_attn_func(q, k, v, dropout_p=P)
    torch.manual_seed(7)
    again = fap.flash_attn_func(q, k, v, dropout_p=P)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)
    assert not torch.equal(first, fap.flash_attn_func(q, k, v))


def test_checkpoint_recomputation_replays_the_mask(device):
    def block(q, k, v):
        return fap.flash_attn_func(q, k, v, dropout_p=P, causal=True) * 2

    q, k, v = _qkv(device, requires_grad=True)
    torch.manual_seed(3)
    plain_grads = torch.autograd.grad(block(q, k, v).sum(), (q, k, v))
    torch.manual_seed(3)
    out = torch.utils.checkpoint.checkpoint(block, q, k, v, use_reentrant=False)
    checkpointed = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(plain_grads, checkpointed):
        assert torch.equal(a, b)


def test_dropout_is_unbiased(device):
    """E[out] over many masks approaches the output without dropout (kept entries scale by 1 / (1 - p))."""
    q, k, v = (torch.randn(1, 64, 2, 32, dtype=torch.float16, device=device) for _ in range(3))
    mean = sum(fap.flash_attn_func(q, k, v, dropout_p=0.5).float() for _ in range(200)) / 200
    assert (mean - fap.flash_attn_func(q, k, v).float()).abs().mean().item() < 0.03


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads_k", [4, 2])
def test_cuda_dropout_gradients_match_the_cpu_backend_under_the_same_mask(device, causal, heads_k):
    """The mask is the same Philox function on both backends, so the CPU backend in float32, replaying the
    CUDA call's rng_state, is a reference for the CUDA backward with dropout."""
    if device.type != "cuda":
        pytest.skip("compares the CUDA backend with the CPU backend")
    from flash_attn_plus.interface import _flash_attn_backward, _flash_attn_forward
    q = torch.randn(2, 97, 4, 64, dtype=torch.bfloat16, device=device)
    k, v = (torch.randn(2, 130, heads_k, 64, dtype=torch.bfloat16, device=device) for _ in range(2))
    out, lse, _, rng_state = _flash_attn_forward(q, k, v, P, 0.125, causal, -1, -1, 0.0, None, False)
    dout = torch.randn_like(out)

    def gradients(tensors):
        dq, dk, dv = (torch.empty_like(x) for x in tensors[:3])
        _flash_attn_backward(tensors[3], *tensors[:3], tensors[4], tensors[5], dq, dk, dv, P, 0.125, causal, -1, -1,
                             0.0, None, False, rng_state)
        return dq, dk, dv

    on_cuda = gradients([q, k, v, dout, out, lse])
    host = [x.cpu() for x in (q, k, v, dout, out)] + [lse.cpu()]
    exact = gradients([x.float() for x in host[:5]] + [host[5]])
    low = gradients(host)
    for name, mine, reference, plain in zip("qkv", on_cuda, exact, low):
        check_rule(f"d{name}", mine.cpu(), reference, plain, 3)
