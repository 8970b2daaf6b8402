"""The FA2 surface: exact signatures (HF discovers features with inspect.signature), the flash_attn drop-in
package and its module paths, the version libraries probe, and the underscore helpers' returns."""
import importlib.metadata
import inspect

import pytest
import torch
from packaging import version

import flash_attn_plus as fap
from attention_case import check_rule
from reference import attention

COMMON = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
          ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
SIGNATURES = {  # FA2 2.8.3, flash_attn/flash_attn_interface.py
    "flash_attn_qkvpacked_func": ["qkv"] + COMMON,
    "flash_attn_kvpacked_func": ["q", "kv"] + COMMON,
    "flash_attn_func": ["q", "k", "v"] + COMMON,
    "flash_attn_varlen_qkvpacked_func": ["qkv", "cu_seqlens", "max_seqlen"] + COMMON,
    "flash_attn_varlen_kvpacked_func": ["q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"] + COMMON,
    "flash_attn_varlen_func": ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"] + COMMON
    + [("block_table", None)],
    "flash_attn_with_kvcache": ["q", "k_cache", "v_cache", ("k", None), ("v", None), ("rotary_cos", None),
                                ("rotary_sin", None), ("cache_seqlens", None), ("cache_batch_idx", None),
                                ("cache_leftpad", None), ("block_table", None), ("softmax_scale", None),
                                ("causal", False), ("window_size", (-1, -1)), ("softcap", 0.0),
                                ("rotary_interleaved", True), ("alibi_slopes", None), ("num_splits", 0),
                                ("return_softmax_lse", False)],
}


def _described(function):
    return [p.name if p.default is inspect.Parameter.empty else (p.name, p.default)
            for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("name", list(SIGNATURES))
def test_signature_matches_fa2(name):
    assert _described(getattr(fap, name)) == SIGNATURES[name]


flash_attn = pytest.importorskip("flash_attn", reason="the flash_attn drop-in (compat/) is not installed")


@pytest.mark.parametrize("name", list(SIGNATURES))
def test_drop_in_exports_the_same_functions(name):
    import flash_attn.flash_attn_interface as interface
    assert getattr(flash_attn, name) is getattr(fap, name) is getattr(interface, name)


def test_drop_in_module_paths_and_version():
    from flash_attn.bert_padding import index_first_axis, pad_input, unpad_input  # noqa: F401
    from flash_attn.flash_attn_interface import (USE_TRITON_ROCM, _flash_attn_backward, _flash_attn_forward,  # noqa: F401
                                                 _flash_attn_varlen_backward, _flash_attn_varlen_forward,
                                                 _get_block_size_n, maybe_contiguous, round_multiple)
    from flash_attn.layers.rotary import apply_rotary_emb  # noqa: F401
    from flash_attn.ops.triton.rotary import apply_rotary  # noqa: F401
    assert hasattr(flash_attn, "__path__")  # a package other distributions can extend (pkgutil)
    # HF transformers: the distribution providing `flash_attn`, its metadata version >= 2.1.0.
    distributions = importlib.metadata.packages_distributions()["flash_attn"]
    assert distributions == ["flash-attn"]
    installed = version.parse(importlib.metadata.version("flash-attn"))
    assert installed >= version.parse("2.4.1") and installed.local.startswith("plus")
    assert version.parse(flash_attn.__version__) == version.parse(installed.base_version)


@pytest.mark.parametrize("varlen", [False, True])
def test_underscore_helpers_follow_fa2(device, varlen):
    from flash_attn.flash_attn_interface import (_flash_attn_backward, _flash_attn_forward, _flash_attn_varlen_backward,
                                                 _flash_attn_varlen_forward)
    q, k, v = (torch.randn(2, 40, 4, 64, dtype=torch.float16, device=device) for _ in range(3))
    scale = 0.125
    if varlen:
        cu = torch.tensor([0, 40, 80], dtype=torch.int32, device=device)
        flat = [x.reshape(80, 4, 64) for x in (q, k, v)]
        out, lse, s_dmask, rng_state = _flash_attn_varlen_forward(*flat, cu, cu, 40, 40, 0.0, scale, True)
        assert out.shape == (80, 4, 64) and lse.shape == (4, 80)
        out = out.view(2, 40, 4, 64)
    else:
        out, lse, s_dmask, rng_state = _flash_attn_forward(q, k, v, 0.0, scale, True, -1, -1, 0.0, None, False)
        assert lse.shape == (2, 4, 40)
    assert s_dmask.numel() == 0 and rng_state.shape == (2,) and rng_state.dtype == torch.int64
    assert rng_state.device == q.device  # as FA2's
    out_ref, _ = attention(q.double(), k.double(), v.double(), softmax_scale=scale, causal=True)
    out_pt, _ = attention(q, k, v, softmax_scale=scale, causal=True, dtype=torch.float16)
    check_rule("out", out, out_ref, out_pt, 2)
    dout = torch.randn_like(out)
    dq, dk, dv = (torch.full_like(x, float("nan")) for x in (q, k, v))
    if varlen:
        softmax_d = _flash_attn_varlen_backward(dout.view(80, 4, 64), *flat, out.view(80, 4, 64), lse,
                                                *(x.view(80, 4, 64) for x in (dq, dk, dv)), cu, cu, 40, 40, 0.0,
                                                scale, True, -1, -1, 0.0, None, False, rng_state)
        assert softmax_d.shape == (4, 80 + 128 * 2)
    else:
        softmax_d = _flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, 0.0, scale, True, -1, -1, 0.0, None,
                                         False, rng_state)
        assert softmax_d.shape == (2, 4, 128)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out2 = fap.flash_attn_func(*leaves, softmax_scale=scale, causal=True)
    grads = torch.autograd.grad(out2, leaves, dout)
    for mine, theirs in zip((dq, dk, dv), grads):
        assert torch.equal(mine, theirs)


def test_varlen_forward_with_used_key_counts(device):
    """FA2's internal varlen forward takes seqused_k: sequence b attends to its first seqused_k[b] keys only
    (here against the same call over sequences cut to those keys); there is no backward through it."""
    from flash_attn.flash_attn_interface import _flash_attn_varlen_forward
    lengths_q, capacity, used = [3, 6], [7, 5], [4, 5]
    q = torch.randn(sum(lengths_q), 4, 32, dtype=torch.float16, device=device)
    k, v = (torch.randn(sum(capacity), 2, 32, dtype=torch.float16, device=device) for _ in range(2))
    cu_q = torch.tensor([0, 3, 9], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 7, 12], dtype=torch.int32, device=device)
    seqused_k = torch.tensor(used, dtype=torch.int32, device=device)
    out, lse, _, _ = _flash_attn_varlen_forward(q, k, v, cu_q, cu_k, 6, 7, 0.0, 0.2, True, seqused_k=seqused_k)
    keep = torch.cat([torch.arange(0, 4), torch.arange(7, 12)]).to(device)
    cut_k = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    expected, expected_lse, _, _ = _flash_attn_varlen_forward(q, k[keep], v[keep], cu_q, cut_k, 6, 7, 0.0, 0.2, True)
    if device.type == "cuda":  # the decode kernels serve it: another summation order; counts are read on the device
        torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(lse, expected_lse)
        return
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    with pytest.raises(fap.InvalidArgumentError, match=r"seqused_k\[0\] = 8"):
        _flash_attn_varlen_forward(q, k, v, cu_q, cu_k, 6, 7, 0.0, 0.2, True,
                                   seqused_k=torch.tensor([8, 5], dtype=torch.int32))
    leaf = q.clone().requires_grad_()
    out, _, _, _ = _flash_attn_varlen_forward(leaf, k, v, cu_q, cu_k, 6, 7, 0.0, 0.2, True, seqused_k=seqused_k)
    with pytest.raises(fap.UnsupportedError, match="seqused_k: there is no backward"):
        out.sum().backward()
