"""Bad arguments raise a Python exception that names the argument (FA2 code catching RuntimeError still
works); nothing crashes and no input is modified."""
import os
import subprocess
import sys

import pytest
import torch

import flash_attn_plus as fap
from flash_attn_plus.interface import _flash_attn_varlen_forward

F16, BF16 = torch.float16, torch.bfloat16


def qkv(b=2, sq=8, sk=8, h=4, hk=4, d=32, dtype=F16):
    return (torch.randn(b, sq, h, d, dtype=dtype), torch.randn(b, sk, hk, d, dtype=dtype),
            torch.randn(b, sk, hk, d, dtype=dtype))


def varlen(total_q=10, total_k=10, h=4, d=32, cu=(0, 4, 10)):
    q, k, v = (torch.randn(t, h, d, dtype=F16) for t in (total_q, total_k, total_k))
    cu_seqlens = torch.tensor(cu, dtype=torch.int32)
    return q, k, v, cu_seqlens


def _dense(**changes):
    q, k, v = qkv()
    args = {"q": q, "k": k, "v": v}
    args.update({name: change(args) for name, change in changes.items() if name in args})
    options = {name: change for name, change in changes.items() if name not in args}
    return lambda: fap.flash_attn_func(args["q"], args["k"], args["v"], **options)


def _varlen(cu_q=None, cu_k=None, max_q=6, max_k=6, **options):
    q, k, v, cu = varlen()
    return lambda: fap.flash_attn_varlen_func(q, k, v, cu if cu_q is None else cu_q, cu if cu_k is None else cu_k,
                                              max_q, max_k, **options)


CASES = {
    "q float64": (_dense(q=lambda a: a["q"].double()), "q: expected a dtype"),
    "q int32": (_dense(q=lambda a: a["q"].int()), "q: expected dtype float16, bfloat16 or float32, got int32"),
    "k other dtype": (_dense(k=lambda a: a["k"].to(BF16)), "k: expected dtype float16"),
    "q rank 3": (_dense(q=lambda a: a["q"][0]), "q: expected a rank-4 tensor"),
    "k head dim": (_dense(k=lambda a: a["k"][..., :16]), "k: "),
    "v seqlen": (_dense(v=lambda a: a["v"][:, :5]), "v: "),
    "head dim 300": (lambda: fap.flash_attn_func(*qkv(d=300)), "head_dim"),
    "heads not a multiple": (lambda: fap.flash_attn_func(*qkv(h=4, hk=3)), "heads"),
    "batch mismatch": (_dense(k=lambda a: a["k"][:1], v=lambda a: a["v"][:1]), "k: "),
    "batch 0": (lambda: fap.flash_attn_func(*qkv(b=0)), "batch"),
    "dropout 1": (_dense(dropout_p=1.0), "dropout_p"),
    "dropout negative": (_dense(dropout_p=-0.1), "dropout_p"),
    "window of three": (_dense(window_size=(1, 2, 3)), "window_size"),
    # Issue-18 regressions: a window past int32 reached nanobind as a TypeError, None as "has no len()", and a
    # float was truncated silently.
    "window past int32": (_dense(window_size=(2**31, 0)), "window_size: expected ints in"),
    "window None": (_dense(window_size=None), "window_size: expected a pair of ints"),
    "window float": (_dense(window_size=(1.5, 0)), "window_size: expected a pair of ints"),
    "alibi float16": (_dense(alibi_slopes=torch.ones(4, dtype=F16)), "alibi_slopes"),
    "alibi shape": (_dense(alibi_slopes=torch.ones(3)), "alibi_slopes"),
    "softcap negative": (_dense(softcap=-1.0), "softcap"),
    "cu_seqlens int64": (_varlen(cu_q=torch.tensor([0, 4, 10])), "cu_seqlens_q"),
    "cu_seqlens decreasing": (_varlen(cu_q=torch.tensor([0, 7, 4], dtype=torch.int32)), "cu_seqlens_q"),
    "cu_seqlens past the rows": (_varlen(cu_k=torch.tensor([0, 4, 12], dtype=torch.int32), max_k=8), "cu_seqlens_k"),
    "cu_seqlens batch mismatch": (_varlen(cu_k=torch.tensor([0, 10], dtype=torch.int32), max_k=10), "cu_seqlens"),
    "max_seqlen too small": (_varlen(max_q=3), "max_seqlen_q"),
    "leftpad_k": (lambda: _flash_attn_varlen_forward(*varlen()[:3], varlen()[3], varlen()[3], 6, 6, 0.0, 0.2, False,
                                                     leftpad_k=torch.zeros(2, dtype=torch.int32)), "leftpad_k"),
    "block_table dtype": (_varlen(block_table=torch.zeros(2, 1, dtype=torch.int64)), "block_table"),
    "k on meta": (_dense(k=lambda a: a["k"].to("meta")), "k: "),
    "alibi on meta": (_dense(alibi_slopes=torch.ones(4, device="meta")), "alibi_slopes: "),
    "cu_seqlens on meta": (_varlen(cu_q=torch.tensor([0, 4, 10], dtype=torch.int32, device="meta")), "cu_seqlens_q: "),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_argument_is_named(name):
    call, message = CASES[name]
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_error_classes_keep_fa2s_base_and_add_precise_ones():
    assert issubclass(fap.InvalidArgumentError, RuntimeError) and issubclass(fap.InvalidArgumentError, ValueError)
    assert issubclass(fap.UnsupportedError, NotImplementedError)
    with pytest.raises(ValueError):
        fap.flash_attn_func(*qkv(d=300))


def test_a_failed_kvcache_call_leaves_the_cache_untouched():
    q = torch.randn(2, 1, 4, 32, dtype=F16)
    k_cache, v_cache = (torch.randn(2, 8, 4, 32, dtype=F16) for _ in range(2))
    before = (k_cache.clone(), v_cache.clone())
    new = torch.randn(2, 1, 4, 32, dtype=F16)
    bad = [
        dict(cache_seqlens=torch.tensor([1, 2])),  # int64
        dict(cache_seqlens=torch.tensor([1, 8], dtype=torch.int32)),  # 8 + 1 > 8
        dict(cache_seqlens=1, cache_batch_idx=torch.tensor([0, 5], dtype=torch.int32)),
        dict(cache_seqlens=1, cache_leftpad=torch.tensor([0, 5], dtype=torch.int32)),
        dict(cache_seqlens=1, block_table=torch.zeros(2, 1, dtype=torch.int32), cache_batch_idx=torch.zeros(2, dtype=torch.int32)),
        dict(cache_seqlens=1, rotary_cos=torch.ones(8, 20, dtype=F16), rotary_sin=torch.ones(8, 20, dtype=F16)),
    ]
    for options in bad:
        with pytest.raises(fap.InvalidArgumentError):
            fap.flash_attn_with_kvcache(q, k_cache, v_cache, new, new, **options)
        assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1]), options


def test_a_broadcast_cache_is_refused_for_the_append():
    """Issue 18: a cache made by expand() has stride-0 dimensions; appending k_new into it would write every
    sequence's keys over the same memory."""
    q = torch.randn(2, 1, 4, 32, dtype=F16)
    k_cache = torch.zeros(1, 8, 4, 32, dtype=F16).expand(2, 8, 4, 32)
    v_cache = torch.zeros(2, 8, 4, 32, dtype=F16)
    new = torch.randn(2, 1, 4, 32, dtype=F16)
    with pytest.raises(fap.InvalidArgumentError, match="k: an output must not overlap itself, got stride 0 for dimension 0"):
        fap.flash_attn_with_kvcache(q, k_cache, v_cache, new, new, cache_seqlens=1)
    out = fap.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=1)  # read only: a broadcast cache is fine
    assert out.isfinite().all()


def test_arguments_that_are_not_tensors_are_named():
    q, k, v, cu = varlen()
    with pytest.raises(TypeError, match="cu_seqlens_k: expected a torch.Tensor, got list"):
        fap.flash_attn_varlen_func(q, k, v, cu, [0, 4, 10], 6, 6)
    with pytest.raises(TypeError, match="alibi_slopes: expected a torch.Tensor or None, got tuple"):
        fap.flash_attn_func(*qkv(), alibi_slopes=(1.0, 1.0, 1.0, 1.0))


def test_missing_tensors_are_type_errors():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="k: expected a torch.Tensor, got NoneType"):
        fap.flash_attn_func(q, None, v)
    with pytest.raises(TypeError, match="qkv"):
        fap.flash_attn_qkvpacked_func([q, k, v])


CORRUPT_CU_SEQLENS = {
    "decreasing": ((0, 5, 3, 9), "cu_seqlens_q: expected non-decreasing offsets"),
    "past the end": ((0, 4, 8, 14), r"cu_seqlens_q\[3\] = 14 exceeds the 10 rows"),
}


@pytest.mark.parametrize("name", CORRUPT_CU_SEQLENS)
def test_device_cu_seqlens_are_checked_only_in_the_checked_mode(device, name):
    """On the CPU the offsets are host memory and always checked; on CUDA the kernels clamp them unless the index
    checks copy them to the host."""
    offsets, message = CORRUPT_CU_SEQLENS[name]
    q, k, v = (torch.randn(10, 4, 32, dtype=F16, device=device) for _ in range(3))
    cu = torch.tensor(offsets, dtype=torch.int32, device=device)
    good = torch.tensor((0, 4, 6, 10), dtype=torch.int32, device=device)

    def call():
        return fap.flash_attn_varlen_func(q, k, v, cu, good, 6, 6, causal=True)

    if device.type == "cuda":
        call()  # clamped by the kernels (bench/varlen_memcheck.py runs this under compute-sanitizer)
        torch.cuda.synchronize()
    else:
        with pytest.raises(fap.InvalidArgumentError, match=message):
            call()
    with fap.checked_indices():
        assert fap.index_checks()
        with pytest.raises(fap.InvalidArgumentError, match=message):
            call()
    assert not fap.index_checks()


def test_index_checks_switch():
    with pytest.raises(fap.InvalidArgumentError, match="enabled: expected a bool"):
        fap.set_index_checks(1)
    code = "import flash_attn_plus as f; print(f.index_checks())"
    for value, expected in (("1", "True"), ("0", "False")):
        env = dict(os.environ, FLASH_ATTENTION_PLUS_CHECK_INDICES=value)
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert result.stdout.strip() == expected
