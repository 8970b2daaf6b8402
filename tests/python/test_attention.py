"""flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func: outputs, LSE and gradients against
float64 with FA2's rule, over dtypes, masks, features, GQA/MQA, head dims and sequence-length pairs."""
import itertools

import pytest
import torch

import flash_attn_plus as fap
from attention_case import MASKS, Packing, check_gradients, check_lse, check_rule, feature_options, leaves
from reference import attention

pytestmark = pytest.mark.usefixtures("api_backend")  # every case on each backend (conftest.py)

DTYPES = [torch.float16, torch.bfloat16]
FEATURES = ["plain", "softcap", "alibi", "alibi_batch"]
HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA
SEQLENS = [(1, 37), (37, 37), (64, 128), (113, 79), (128, 64), (7, 3)]
HEAD_DIMS = [32, 59, 64, 128, 8, 96, 256, 200]


def _cases(packing):
    """Every (dtype, mask, feature, heads) combination; head dim and lengths rotate through their lists so
    each value meets every other axis."""
    heads = HEADS[:1] if packing == "qkvpacked" else HEADS
    for index, (dtype, mask, feature, (h, hk)) in enumerate(itertools.product(DTYPES, MASKS, FEATURES, heads)):
        seqlen_q, seqlen_k = SEQLENS[index % len(SEQLENS)]
        if packing == "qkvpacked":
            seqlen_k = seqlen_q
        head_dim = HEAD_DIMS[(index // len(SEQLENS) + index) % len(HEAD_DIMS)]
        yield pytest.param(packing, dtype, mask, feature, h, hk, seqlen_q, seqlen_k, head_dim,
                           id=f"{packing}-{str(dtype)[6:]}-{mask}-{feature}-h{h}k{hk}-q{seqlen_q}k{seqlen_k}-d{head_dim}")


CASES = [case for packing in ("func", "kvpacked", "qkvpacked") for case in _cases(packing)]


def check_call(packing, dtype, mask, feature, batch, heads, heads_k, seqlen_q, seqlen_k, head_dim, device):
    """One call of a packing's function on fresh inputs: output shape and dtype, output, LSE and gradients against
    float64 with FA2's rule."""
    layout = Packing(packing)
    tensors = layout.make(batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, dtype, device)
    causal, window = MASKS[mask]
    options = dict(causal=causal, window_size=window, **feature_options(feature, batch, heads, device))

    ours = leaves(tensors)
    out, lse, _ = layout.call(ours, return_attn_probs=True, **options)
    exact = leaves(tensors, torch.float64)
    plain = leaves(tensors)
    out_ref, lse_ref = attention(*layout.split(exact), **options_for_reference(options))
    out_pt, _ = attention(*layout.split(plain), dtype=dtype, **options_for_reference(options))

    assert out.shape == (batch, seqlen_q, heads, head_dim) and out.dtype == dtype
    assert lse.shape == (batch, heads, seqlen_q) and lse.dtype == torch.float32
    check_rule("out", out, out_ref, out_pt, 2)
    check_lse(lse, lse_ref)

    names = "qkv" if packing == "func" else ["q", "kv"] if packing == "kvpacked" else ["qkv"]
    check_gradients(torch.randn_like(out), (out, out_ref, out_pt), names, ours, exact, plain)


@pytest.mark.parametrize("packing,dtype,mask,feature,heads,heads_k,seqlen_q,seqlen_k,head_dim", CASES)
def test_output_lse_and_gradients(device, packing, dtype, mask, feature, heads, heads_k, seqlen_q, seqlen_k, head_dim):
    check_call(packing, dtype, mask, feature, 2, heads, heads_k, seqlen_q, seqlen_k, head_dim, device)


def options_for_reference(options):
    return {"causal": options["causal"], "window": options["window_size"], "softcap": options.get("softcap", 0.0),
            "alibi_slopes": options.get("alibi_slopes")}


@pytest.mark.parametrize("mask,feature,head_dim", [("none", "plain", 64), ("causal", "alibi", 40),
                                                   ("local", "softcap", 64), ("causal_local", "plain", 64)])
def test_long_query_sequences(device, mask, feature, head_dim):
    """Past 1k queries at d <= 64 Hopper's forward takes blocks of 192 rows (three consumer warpgroups): a length
    that ends inside a block, against a longer key sequence, GQA."""
    check_call("func", torch.bfloat16, mask, feature, 1, 2, 1, 1100, 1300, head_dim, device)


def test_causal_grid_across_the_batch(device):
    """Under a causal mask the CUDA kernels' grid is (batch, blocks, heads), each head's costliest blocks of the
    whole batch first: several batch entries and heads, row and key blocks of unequal cost."""
    if device == "cpu":
        pytest.skip("the order of the CUDA kernels' grid; the CPU backend has none")
    check_call("func", torch.bfloat16, "causal", "plain", 2, 9, 9, 2048, 2048, 256, device)


@pytest.mark.parametrize("seqlen_q,seqlen_k,causal,window", [
    (5, 2, True, (-1, -1)),     # rows 0-2 see no key: out 0, lse +inf, zero gradients
    (4, 9, False, (0, 0)),       # one key per row
    (6, 6, False, (2, 100)),     # a side >= seqlen_k is unbounded
    (9, 3, False, (1, -1)),      # one-sided window with seqlen_q > seqlen_k
    (3, 0, False, (-1, -1)),     # no keys at all
])
def test_edge_masks(device, seqlen_q, seqlen_k, causal, window):
    q = torch.randn(2, seqlen_q, 2, 16, dtype=torch.float16, device=device)
    k, v = (torch.randn(2, seqlen_k, 2, 16, dtype=torch.float16, device=device) for _ in range(2))
    out, lse, _ = fap.flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True)
    out_ref, lse_ref = attention(q.double(), k.double(), v.double(), causal=causal, window=window)
    out_pt, _ = attention(q, k, v, causal=causal, window=window, dtype=torch.float16)
    check_rule("out", out, out_ref, out_pt, 2)
    check_lse(lse, lse_ref)
    empty = torch.isinf(lse_ref).transpose(1, 2)  # (batch, seqlen_q, heads)
    assert torch.all(out[empty] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_scale_and_noncontiguous_views(device, dtype):
    base = torch.randn(2, 40, 6, 3, 32, dtype=dtype, device=device)
    q, k, v = base[:, :, :, 0], base[:, :, :, 1], base[:, :, :, 2]  # strided views, last dim contiguous
    out = fap.flash_attn_func(q, k, v, softmax_scale=0.3, causal=True)
    out_ref, _ = attention(q.double(), k.double(), v.double(), softmax_scale=0.3, causal=True)
    out_pt, _ = attention(q, k, v, softmax_scale=0.3, causal=True, dtype=dtype)
    check_rule("out", out, out_ref, out_pt, 2)
    transposed = fap.flash_attn_func(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, softmax_scale=0.3,
                                     causal=True)  # last dim not contiguous: copied, as FA2 does
    assert torch.equal(out, transposed)


def check_deterministic_gradients(q, k, v, runs, **options):
    """The deterministic mode's gradients: bitwise equal over `runs` calls and equal, up to the order of the fp32
    sums, to the default mode's."""
    dout = torch.randn_like(q)
    default = torch.autograd.grad(fap.flash_attn_func(q, k, v, **options), (q, k, v), dout)
    first, *others = [torch.autograd.grad(fap.flash_attn_func(q, k, v, deterministic=True, **options), (q, k, v), dout)
                      for _ in range(runs)]
    for run in others:
        for a, b in zip(first, run):
            assert torch.equal(a, b)
    for a, b in zip(first, default):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("head_dim,seqlen", [(64, 700), (256, 350)])
def test_deterministic_backward_with_several_key_blocks_per_cta(device, head_dim, seqlen):
    """The CUDA kernels' deterministic mode gives each CTA an accumulator slice and several key blocks in turn
    (8 x 8 (batch, head) pairs take 4 slices; these lengths make 6 key blocks), except Hopper's at d = 256,
    which orders its additions into one accumulator: check_deterministic_gradients over 10 runs."""
    if device.type != "cuda":
        pytest.skip("the CUDA kernels' slices; the CPU backend sums in one order anyway (test below)")
    q, k, v = (torch.randn(8, seqlen, 8, head_dim, dtype=torch.bfloat16, device=device, requires_grad=True)
               for _ in range(3))
    check_deterministic_gradients(q, k, v, 10, causal=True)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("mask", ["none", "causal", "window"])
def test_deterministic_backward_orders_dq_additions(device, head_dim, mask):
    """Many CTAs of one (batch, head) in flight at once (2k keys: 16-32 key blocks), GQA, causal with fewer queries
    than keys and a sliding window (whose query blocks are first seen by a key block past the first, where the
    ordered additions of Hopper's d = 256 kernel start their count): check_deterministic_gradients over 5 runs."""
    if device.type != "cuda":
        pytest.skip("the CUDA kernels' order of additions; the CPU backend sums in one order anyway")
    q = torch.randn(2, 1500, 8, head_dim, dtype=torch.bfloat16, device=device, requires_grad=True)
    k, v = (torch.randn(2, 2100, 2, head_dim, dtype=torch.bfloat16, device=device, requires_grad=True)
            for _ in range(2))
    options = {"none": {}, "causal": {"causal": True}, "window": {"window_size": (300, 40)}}[mask]
    check_deterministic_gradients(q, k, v, 5, **options)


def test_deterministic_backward_is_bitwise_reproducible(device):
    q, k, v = (torch.randn(2, 150, 4, 64, dtype=torch.bfloat16, device=device, requires_grad=True) for _ in range(3))
    runs = []
    for _ in range(10):
        out = fap.flash_attn_func(q, k, v, causal=True, deterministic=True)
        runs.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)
