"""torch.compile(fullgraph=True) traces every entry point without graph breaks (the ops have fake
implementations), forward and backward, and gives the eager results."""
import pytest
import torch

import flash_attn_plus as fap


def _backend(device):
    # aot_eager traces forward and backward through the fake implementations like inductor does, without
    # spending minutes generating C++ on the 2-core CI machine; on the GPU the real compiler runs.
    return "inductor" if device.type == "cuda" else "aot_eager"


@pytest.mark.parametrize("dynamic", [False, True])
def test_func_forward_and_backward(device, dynamic):
    torch._dynamo.reset()

    def layer(q, k, v):
        return fap.flash_attn_func(q, k, v, causal=True, window_size=(32, 0), softcap=5.0).float().square().sum()

    compiled = torch.compile(layer, fullgraph=True, dynamic=dynamic, backend=_backend(device))
    q, k, v = (torch.randn(2, 64, 4, 32, dtype=torch.bfloat16, device=device, requires_grad=True) for _ in range(3))
    loss = compiled(q, k, v)
    assert torch.equal(loss, layer(q, k, v))
    grads = torch.autograd.grad(loss, (q, k, v))
    expected = torch.autograd.grad(layer(q, k, v), (q, k, v))
    for a, b in zip(grads, expected):
        assert torch.equal(a, b)


def test_varlen_and_lse(device):
    torch._dynamo.reset()

    def layer(q, k, v, cu_seqlens):
        out, lse, _ = fap.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, 40, 40, causal=True,
                                                 return_attn_probs=True)
        return out, lse

    q, k, v = (torch.randn(70, 4, 64, dtype=torch.float16, device=device) for _ in range(3))
    cu_seqlens = torch.tensor([0, 30, 70], dtype=torch.int32, device=device)
    out, lse = torch.compile(layer, fullgraph=True, backend=_backend(device))(q, k, v, cu_seqlens)
    expected_out, expected_lse = layer(q, k, v, cu_seqlens)
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)


def test_kvcache_mutation_is_traced(device):
    torch._dynamo.reset()

    def step(q, k_cache, v_cache, k, v, seqlens):
        return fap.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=True)

    q = torch.randn(2, 1, 4, 32, dtype=torch.bfloat16, device=device)
    k_cache, v_cache = (torch.randn(2, 16, 2, 32, dtype=torch.bfloat16, device=device) for _ in range(2))
    k, v = (torch.randn(2, 1, 2, 32, dtype=torch.bfloat16, device=device) for _ in range(2))
    seqlens = torch.tensor([3, 9], dtype=torch.int32, device=device)
    eager_k, eager_v = k_cache.clone(), v_cache.clone()
    expected = step(q, eager_k, eager_v, k, v, seqlens)
    out = torch.compile(step, fullgraph=True, backend=_backend(device))(q, k_cache, v_cache, k, v, seqlens)
    assert torch.equal(out, expected)
    assert torch.equal(k_cache, eager_k) and torch.equal(v_cache, eager_v)


def test_dropout_inside_a_compiled_graph_draws_from_torch(device):
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 32, 2, 32, dtype=torch.float16, device=device) for _ in range(3))
    compiled = torch.compile(lambda q, k, v: fap.flash_attn_func(q, k, v, dropout_p=0.3), fullgraph=True,
                             backend=_backend(device))
    torch.manual_seed(5)
    first = compiled(q, k, v)
    torch.manual_seed(5)
    assert torch.equal(first, compiled(q, k, v))
    assert not torch.equal(first, compiled(q, k, v))


def _cuda_only(device):
    if device.type != "cuda":
        pytest.skip("CUDA graphs (mode='reduce-overhead') need --device cuda")


def test_reduce_overhead_training_step_gives_the_eager_results(device):
    """mode="reduce-overhead" records the compiled forward and backward as CUDA graphs (cudagraph trees): the op's
    outputs must all live on the GPU and its launches must be capturable."""
    _cuda_only(device)
    torch._dynamo.reset()

    def layer(q, k, v):
        return fap.flash_attn_func(q, k, v, causal=True, softcap=30.0).float().square().sum()

    compiled = torch.compile(layer, mode="reduce-overhead")
    q = torch.randn(2, 333, 8, 128, dtype=torch.bfloat16, device=device, requires_grad=True)
    k, v = (torch.randn(2, 333, 2, 128, dtype=torch.bfloat16, device=device, requires_grad=True) for _ in range(2))
    loss = layer(q, k, v)
    expected = [loss] + list(torch.autograd.grad(loss, (q, k, v)))
    for _ in range(3):  # warm-up, recording, replays
        torch.compiler.cudagraph_mark_step_begin()
        loss = compiled(q, k, v)
        results = [loss.clone()] + [g.clone() for g in torch.autograd.grad(loss, (q, k, v))]
    for got, want in zip(results, expected):
        assert torch.equal(got, want)


def test_reduce_overhead_decode_step_gives_the_eager_results(device):
    _cuda_only(device)
    torch._dynamo.reset()

    def step(q, k_cache, v_cache, k, v, seqlens):
        return fap.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=True)

    q = torch.randn(4, 1, 8, 128, dtype=torch.bfloat16, device=device)
    caches = [torch.randn(4, 256, 2, 128, dtype=torch.bfloat16, device=device) for _ in range(2)]
    k, v = (torch.randn(4, 1, 2, 128, dtype=torch.bfloat16, device=device) for _ in range(2))
    seqlens = torch.tensor([3, 90, 17, 200], dtype=torch.int32, device=device)
    eager_caches = [c.clone() for c in caches]
    expected = step(q, *eager_caches, k, v, seqlens)
    compiled = torch.compile(step, mode="reduce-overhead")
    for _ in range(3):
        torch.compiler.cudagraph_mark_step_begin()
        got = compiled(q, *[c.clone() for c in caches], k, v, seqlens).clone()
    assert torch.equal(got, expected)
