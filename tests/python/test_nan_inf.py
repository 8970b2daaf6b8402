"""FlashAttention-2's NaN and Inf semantics, on every backend the suite runs (CPU; CUDA tensors with
--device cuda, the mma.sync kernels with FLASH_ATTENTION_PLUS_PORTABLE_KERNELS=1, the decode kernels through
flash_attn_with_kvcache):

- NaN in q, k or v makes NaN exactly the rows that attend to it. A masked score is replaced by the mask, so a
  NaN the mask hides leaves its row alone; for v, rows whose key tile holds the NaN may be NaN as well (0 x NaN
  in the tile product, as in FlashAttention-2's kernels, which skip only whole tiles).
- +-inf follows IEEE through the softmax: a +inf score makes its row NaN (exp(inf - inf)), a -inf score drops
  its key; inf in v gives inf in the rows that attend to it.
- softmax_lse is +inf on a row whose sum is NaN (FlashAttention-2's rule, as for an empty row).
- A huge softmax_scale stays finite (the row max gives exp(0) whatever the scale).
- Backward: a NaN lse makes its row's gradients NaN; an lse of -inf is read as 0 (FlashAttention-2's shift).

The float64 reference (reference.py, which masks by replacement as FlashAttention-2 does) is the semantics;
unmasked calls are also checked against SDPA's math backend (IEEE softmax), and on CUDA causal and unmasked
calls against SDPA's flash backend, which runs FlashAttention-2's own kernels."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_attn_plus as fap
from flash_attn_plus.interface import _flash_attn_backward, _flash_attn_forward
from reference import allowed_keys, attention

NAN, INF = float("nan"), float("inf")
# name: (tensor, value)
POISONS = {"q_nan": ("q", NAN), "k_nan": ("k", NAN), "v_nan": ("v", NAN), "q_inf": ("q", INF),
           "q_neginf": ("q", -INF), "k_inf": ("k", INF), "k_neginf": ("k", -INF), "v_inf": ("v", INF)}
MASKS = {"none": (False, (-1, -1)), "causal": (True, (-1, -1)), "local": (False, (16, 4))}
BATCH, HEADS, HEADS_K, HEAD_DIM = 2, 4, 2, 64
POISONED_BATCH, POISONED_KV_HEAD, POISONED_COLUMN = 1, 0, 5


def make_inputs(seqlen_q, seqlen_k, dtype, device):
    q = torch.randn(BATCH, seqlen_q, HEADS, HEAD_DIM, dtype=dtype, device=device)
    k, v = (torch.randn(BATCH, seqlen_k, HEADS_K, HEAD_DIM, dtype=dtype, device=device) for _ in range(2))
    return q, k, v


def poison(tensors, name, position):
    """A copy of (q, k, v) with one element set: in q at (row position, first query head of the poisoned kv
    head), in k or v at (key position, poisoned kv head)."""
    which, value = POISONS[name]
    q, k, v = (t.clone() for t in tensors)
    target = {"q": q, "k": k, "v": v}[which]
    head = POISONED_KV_HEAD * (HEADS // HEADS_K) if which == "q" else POISONED_KV_HEAD
    target[POISONED_BATCH, position, head, POISONED_COLUMN] = value
    return q, k, v


def attending_rows(name, position, seqlen_q, seqlen_k, causal, window, device):
    """(BATCH, seqlen_q, HEADS) bool: the rows whose softmax sees the poisoned element."""
    rows = torch.zeros(BATCH, seqlen_q, HEADS, dtype=torch.bool, device=device)
    group = HEADS // HEADS_K
    if POISONS[name][0] == "q":
        rows[POISONED_BATCH, position, POISONED_KV_HEAD * group] = True
    else:
        allowed = allowed_keys(seqlen_q, seqlen_k, causal, window, device=device)[:, position]
        rows[POISONED_BATCH, :, POISONED_KV_HEAD * group:(POISONED_KV_HEAD + 1) * group] = allowed.view(-1, 1)
    return rows


def fa2_lse(lse):
    """FlashAttention-2 writes +inf where the row sum is NaN."""
    return lse.nan_to_num(nan=INF, posinf=INF, neginf=-INF)


def assert_same_specials(ours, expected, where, what):
    """NaN, +inf and -inf at exactly the same elements of the selected rows."""
    ours, expected = ours.double()[where], expected.double()[where]
    assert torch.equal(ours.isnan(), expected.isnan()), f"{what}: NaN elements differ from the reference"
    assert torch.equal(ours == INF, expected == INF), f"{what}: +inf elements differ from the reference"
    assert torch.equal(ours == -INF, expected == -INF), f"{what}: -inf elements differ from the reference"


def assert_rule(ours, reference, plain, finite, factor, what):
    """FA2's rule on the elements the reference has finite: ours finite there and within `factor` x plain
    PyTorch's error."""
    ours, reference, plain = ours.double()[finite], reference.double()[finite], plain.double()[finite]
    assert ours.isfinite().all(), f"{what}: non-finite where the reference is finite"
    assert plain.isfinite().all(), f"{what}: plain PyTorch non-finite where float64 is finite (bad case)"
    error, baseline = (ours - reference).abs().max().item(), (plain - reference).abs().max().item()
    assert error <= factor * baseline + 1e-5, f"{what}: error {error:.3g} > {factor} x plain PyTorch's {baseline:.3g}"


def row_nan(x):
    return x.isnan().any(-1)


def sdpa(q, k, v, causal, backend, scale=None):
    group = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("seqlens", [(8, 8), (100, 100), (64, 300)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("name", list(POISONS))
def test_poisoned_forward(name, mask, seqlens, dtype, device):
    seqlen_q, seqlen_k = seqlens
    causal, window = MASKS[mask]
    position = (seqlen_q if POISONS[name][0] == "q" else seqlen_k) // 2 + 1
    clean = make_inputs(seqlen_q, seqlen_k, dtype, device)
    q, k, v = poison(clean, name, position)
    out, lse, _ = fap.flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True)

    options = dict(causal=causal, window=window)
    reference, reference_lse = attention(q, k, v, **options)
    plain, _ = attention(q, k, v, dtype=dtype, **options)
    attending = attending_rows(name, position, seqlen_q, seqlen_k, causal, window, device)
    strict = torch.ones_like(attending)
    if POISONS[name][0] == "v":
        # Rows that do not attend to the poisoned key: the clean result, or NaN from 0 x NaN (0 x inf) in
        # their key tile. The reference's dense product has that everywhere, so they come from clean inputs.
        clean_reference, _ = attention(*clean, **options)
        clean_plain, _ = attention(*clean, dtype=dtype, **options)
        pick = attending.unsqueeze(-1)
        reference = torch.where(pick, reference, clean_reference)
        plain = torch.where(pick, plain, clean_plain.to(plain.dtype))
        group = HEADS // HEADS_K
        neighbours = torch.zeros_like(attending)
        neighbours[POISONED_BATCH, :, POISONED_KV_HEAD * group:(POISONED_KV_HEAD + 1) * group] = True
        strict = ~(neighbours & ~attending & row_nan(out))
    assert_same_specials(out, reference, strict, "out")
    finite = reference.isfinite() & strict.unsqueeze(-1)
    assert_rule(out, reference, plain, finite, 2, "out")

    expected_lse = fa2_lse(reference_lse)  # (B, H, Sq); v does not reach the lse
    assert_same_specials(lse, expected_lse, torch.ones_like(expected_lse, dtype=torch.bool), "softmax_lse")
    finite_lse = expected_lse.isfinite()
    error = (lse.double()[finite_lse] - expected_lse[finite_lse]).abs().max().item()
    assert error <= 1e-3 * (1 + expected_lse[finite_lse].abs().max().item()), f"softmax_lse: error {error:.3g}"

    # Which rows are NaN, against PyTorch's own attention: the math backend (IEEE softmax) where nothing is
    # masked, and on CUDA FlashAttention-2's kernels (SDPA flash) where SDPA can express the mask.
    if POISONS[name][0] != "v":
        if mask == "none":
            assert torch.equal(row_nan(out), row_nan(sdpa(q, k, v, False, SDPBackend.MATH))), "NaN rows vs SDPA math"
        if device.type == "cuda" and mask != "local" and seqlen_q == seqlen_k:
            flash = sdpa(q, k, v, causal, SDPBackend.FLASH_ATTENTION)
            assert torch.equal(row_nan(out), row_nan(flash)), "NaN rows vs SDPA flash (FlashAttention-2)"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["q_nan", "k_nan", "v_nan", "k_inf"])
def test_poisoned_backward(name, causal, device):
    """Rows whose output is NaN get NaN dq; dq is finite wherever the float64 reference's is, and every finite
    gradient is within FA2's rule (3x plain PyTorch). dk and dv may also be NaN where a NaN q or k meets a
    masked-out zero of dS in a tile product (0 x NaN, as in FlashAttention-2's kernels)."""
    seqlen, dtype = 100, torch.bfloat16
    q, k, v = poison(make_inputs(seqlen, seqlen, dtype, device), name, seqlen // 2 + 1)
    dout = torch.randn(BATCH, seqlen, HEADS, HEAD_DIM, dtype=dtype, device=device)

    def gradients(function, dtype_of_leaves):
        leaves = [t.detach().to(dtype_of_leaves).requires_grad_() for t in (q, k, v)]
        out = function(*leaves)
        out.backward(dout.to(out.dtype))
        return out, [t.grad for t in leaves]

    out, ours = gradients(lambda *t: fap.flash_attn_func(*t, causal=causal), dtype)
    _, reference = gradients(lambda *t: attention(*t, causal=causal)[0], torch.float64)
    _, plain = gradients(lambda *t: attention(*t, causal=causal, dtype=dtype)[0], dtype)
    assert row_nan(ours[0])[row_nan(out)].all(), "dq: a NaN output row with a finite gradient"
    for what, g, r, p in zip(("dq", "dk", "dv"), ours, reference, plain):
        comparable = r.isfinite() & p.isfinite() & (g.isfinite() if what != "dq" else True)
        assert_rule(g, r, p, comparable, 3, what)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("value", [NAN, -INF], ids=["nan", "neginf"])
def test_backward_with_special_lse(value, causal, device):
    """FlashAttention-2's backward recomputes P = exp(scale * s - lse): a NaN lse makes that row's P NaN (and
    so its dq and the dk/dv of the keys it attends to); an lse of -inf is read as 0, P = exp(scale * s)."""
    seqlen, dtype, scale = 64, torch.float16, HEAD_DIM ** -0.5
    q, k, v = make_inputs(seqlen, seqlen, dtype, device)
    out, lse, _, _ = _flash_attn_forward(q, k, v, 0.0, scale, causal)
    row = seqlen // 2
    lse = lse.clone()
    lse[POISONED_BATCH, 0, row] = value
    dout = torch.randn_like(out)
    dq, dk, dv = (torch.full_like(t, NAN) for t in (q, k, v))
    _flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, 0.0, scale, causal, -1, -1, 0.0, None, False)

    # float64: P from the given lse (FA2's reading), D from the given out, then the softmax backward.
    group = HEADS // HEADS_K
    qf, dof, of = (t.double().transpose(1, 2) for t in (q, dout, out))
    kf, vf = (t.double().repeat_interleave(group, dim=2).transpose(1, 2) for t in (k, v))
    allowed = allowed_keys(seqlen, seqlen, causal, (-1, -1), device=device)
    shift = lse.double().masked_fill(lse == -INF, 0.0).unsqueeze(-1)
    probs = torch.exp(scale * qf @ kf.transpose(-1, -2) - shift).masked_fill(~allowed, 0.0)
    dprobs = dof @ vf.transpose(-1, -2)
    dscores = probs * (dprobs - (dof * of).sum(-1, keepdim=True))
    expected = [scale * dscores @ kf, scale * dscores.transpose(-1, -2) @ qf, probs.transpose(-1, -2) @ dof]
    expected = [expected[0].transpose(1, 2)] + [
        g.transpose(1, 2).reshape(BATCH, seqlen, HEADS_K, group, HEAD_DIM).sum(3) for g in expected[1:]]
    for what, g, e in zip(("dq", "dk", "dv"), (dq, dk, dv), expected):
        assert torch.equal(g.isnan(), e.isnan()), f"{what}: NaN elements differ from FlashAttention-2's reading"
        finite = e.isfinite()
        error = (g.double()[finite] - e[finite]).abs().max().item()
        assert error <= 2e-2 * (1 + e[finite].abs().max().item()), f"{what}: error {error:.3g}"
    if value != value:
        assert dq[POISONED_BATCH, row, 0].isnan().all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [1e4, 1e10])
def test_huge_softmax_scale_stays_finite(scale, causal, device):
    """At these scales the softmax is the row's argmax; SDPA's output is finite, and so is ours."""
    q, k, v = make_inputs(128, 128, torch.bfloat16, device)
    out, lse, _ = fap.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, return_attn_probs=True)
    assert out.isfinite().all() and lse.isfinite().all()
    reference, reference_lse = attention(q, k, v, softmax_scale=scale, causal=causal)
    assert (out.double() - reference).abs().max().item() <= 2e-2
    assert ((lse.double() - reference_lse).abs() / reference_lse.abs().clamp_min(1)).max().item() <= 1e-5
    assert sdpa(q, k, v, causal, SDPBackend.MATH, scale=scale).isfinite().all()


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("seqlen_q", [1, 4])
def test_poisoned_kv_cache(seqlen_q, num_splits, device):
    """The decode path: NaN in a cache row that a sequence uses makes that sequence's rows of the kv head NaN
    (lse +inf) whatever the split; NaN past a sequence's cache_seqlens is never read."""
    dtype, capacity = torch.bfloat16, 256
    cache_seqlens = torch.tensor([100, 200], dtype=torch.int32, device=device)
    q = torch.randn(BATCH, seqlen_q, HEADS, HEAD_DIM, dtype=dtype, device=device)
    k_cache, v_cache = (torch.randn(BATCH, capacity, HEADS_K, HEAD_DIM, dtype=dtype, device=device) for _ in range(2))
    k_cache[0, 150:, POISONED_KV_HEAD] = NAN  # past sequence 0's 100 keys
    k_cache[POISONED_BATCH, 120, POISONED_KV_HEAD, POISONED_COLUMN] = NAN
    out, lse = fap.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, causal=True,
                                           num_splits=num_splits, return_softmax_lse=True)
    group = HEADS // HEADS_K
    for b, used in enumerate(cache_seqlens.tolist()):
        reference, reference_lse = attention(q[b:b + 1], k_cache[b:b + 1, :used], v_cache[b:b + 1, :used], causal=True)
        plain, _ = attention(q[b:b + 1], k_cache[b:b + 1, :used], v_cache[b:b + 1, :used], causal=True, dtype=dtype)
        assert_same_specials(out[b:b + 1], reference, torch.ones(1, seqlen_q, HEADS, dtype=torch.bool, device=device),
                             f"out of sequence {b}")
        assert_rule(out[b:b + 1], reference, plain, reference.isfinite(), 2, f"out of sequence {b}")
        expected_lse = fa2_lse(reference_lse)
        assert torch.equal(lse[b:b + 1] == INF, expected_lse == INF), f"softmax_lse of sequence {b}: +inf rows"
    poisoned_heads = slice(POISONED_KV_HEAD * group, (POISONED_KV_HEAD + 1) * group)
    assert out[POISONED_BATCH, :, poisoned_heads].isnan().all()
    assert (lse[POISONED_BATCH, poisoned_heads] == INF).all()


def test_huge_softmax_scale_in_the_kv_cache_path(device):
    q = torch.randn(BATCH, 1, HEADS, HEAD_DIM, dtype=torch.bfloat16, device=device)
    k_cache, v_cache = (torch.randn(BATCH, 512, HEADS_K, HEAD_DIM, dtype=torch.bfloat16, device=device)
                        for _ in range(2))
    for num_splits in (1, 4):
        out = fap.flash_attn_with_kvcache(q, k_cache, v_cache, softmax_scale=1e10, num_splits=num_splits)
        reference, _ = attention(q, k_cache, v_cache, softmax_scale=1e10)
        assert out.isfinite().all()
        assert (out.double() - reference).abs().max().item() <= 2e-2
