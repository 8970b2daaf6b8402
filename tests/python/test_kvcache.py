"""flash_attn_with_kvcache: in-place append (with rotary), cache_seqlens, cache_batch_idx, cache_leftpad,
paged caches, masks, ALiBi and GQA, against an element-by-element reference."""
import itertools

import pytest
import torch

import flash_attn_plus as fap
from attention_case import check_lse, check_rule
from reference import attention, rotate_reference

pytestmark = pytest.mark.usefixtures("api_backend")  # every case on each backend (conftest.py)

HEAD_DIM = 64


def _cases():
    for new_kv, rotary, paged, leftpad, batch_idx, causal, heads_k in itertools.product(
            (False, True), ("none", "interleaved", "halves"), (False, True), (False, True), (False, True),
            (False, True), (4, 1)):
        if rotary != "none" and not new_kv:
            continue  # rotary needs new keys to append
        if paged and (leftpad or batch_idx):
            continue  # FA2 allows neither with a paged cache
        yield pytest.param(new_kv, rotary, paged, leftpad, batch_idx, causal, heads_k,
                           id=f"new{int(new_kv)}-{rotary}-paged{int(paged)}-left{int(leftpad)}-idx{int(batch_idx)}-"
                              f"causal{int(causal)}-hk{heads_k}")


@pytest.mark.parametrize("new_kv,rotary,paged,leftpad,batch_idx,causal,heads_k", list(_cases()))
def test_kvcache(device, new_kv, rotary, paged, leftpad, batch_idx, causal, heads_k):
    dtype, batch, heads, seqlen_q, seqlen_new, cache_len, page = torch.float16, 3, 4, 3, 3, 40, 8
    q = torch.randn(batch, seqlen_q, heads, HEAD_DIM, dtype=dtype, device=device)
    batch_cache = batch + 2 if batch_idx else batch
    dense_k = torch.randn(batch_cache, cache_len, heads_k, HEAD_DIM, dtype=dtype, device=device)
    dense_v = torch.randn_like(dense_k)
    seqlens = torch.tensor([5, 20, 37 - (seqlen_new if new_kv else 0)], dtype=torch.int32, device=device)
    rows = torch.tensor([3, 0, 4], dtype=torch.int32, device=device) if batch_idx else None
    left = torch.tensor([0, 7, 2], dtype=torch.int32, device=device) if leftpad else None
    k_new = torch.randn(batch, seqlen_new, heads_k, HEAD_DIM, dtype=dtype, device=device) if new_kv else None
    v_new = torch.randn_like(k_new) if new_kv else None
    cos = sin = None
    if rotary != "none":
        angles = torch.rand(cache_len, 16, device=device, dtype=torch.float64) * 6
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)  # rotary_dim 32 of head_dim 64
    alibi = torch.rand(heads, device=device) * 0.3

    block_table = None
    k_cache, v_cache = dense_k.clone(), dense_v.clone()
    if paged:
        blocks = cache_len // page
        block_table = torch.randperm(batch * blocks + 3)[:batch * blocks].view(batch, blocks).int().to(device)
        k_cache = torch.randn(batch * blocks + 3, page, heads_k, HEAD_DIM, dtype=dtype, device=device)
        v_cache = torch.randn_like(k_cache)
        for b in range(batch):
            for t in range(cache_len):
                k_cache[block_table[b, t // page], t % page] = dense_k[b, t]
                v_cache[block_table[b, t // page], t % page] = dense_v[b, t]

    out, lse = fap.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
                                           cache_seqlens=seqlens, cache_batch_idx=rows, cache_leftpad=left,
                                           block_table=block_table, causal=causal, alibi_slopes=alibi,
                                           rotary_interleaved=rotary == "interleaved", return_softmax_lse=True)
    assert out.shape == q.shape and lse.shape == (batch, heads, seqlen_q)

    def cache_row(b):
        """The reference's view of sequence b's cache after the append, in float64 (k) and exact (v)."""
        row = int(rows[b]) if rows is not None else b
        if paged:
            gather = torch.stack([k_cache[block_table[b, t // page], t % page] for t in range(cache_len)])
            gather_v = torch.stack([v_cache[block_table[b, t // page], t % page] for t in range(cache_len)])
            return gather, gather_v, dense_k[b].clone(), dense_v[b].clone()
        return k_cache[row], v_cache[row], dense_k[row].clone(), dense_v[row].clone()

    for b in range(batch):
        got_k, got_v, want_k, want_v = cache_row(b)
        length = int(seqlens[b]) + (seqlen_new if new_kv else 0)
        positions = torch.arange(int(seqlens[b]), length, device=device)
        q_b = q[b].double()
        if new_kv:
            rotated = rotate_reference(k_new[b], cos, sin, positions, rotary == "interleaved") if cos is not None \
                else k_new[b].double()
            want_k[positions] = rotated.to(dtype)
            want_v[positions] = v_new[b]
            assert (got_k[positions].double() - rotated).abs().max().item() <= 2e-3, "k_cache: appended keys"
            assert torch.equal(got_v[positions], v_new[b]), "v_cache: appended values"
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v), "the rest of the cache is untouched"
        if cos is not None:
            q_positions = positions[:seqlen_q] if causal else torch.full((seqlen_q,), int(seqlens[b]), device=device)
            q_b = rotate_reference(q[b], cos, sin, q_positions, rotary == "interleaved").to(dtype).double()
        start = int(left[b]) if left is not None else 0
        keys, values = want_k[start:length].unsqueeze(0), want_v[start:length].unsqueeze(0)
        out_ref, lse_ref = attention(q_b.unsqueeze(0), keys.double(), values.double(), causal=causal,
                                     alibi_slopes=alibi)
        out_pt, _ = attention(q_b.to(dtype).unsqueeze(0), keys, values, causal=causal, alibi_slopes=alibi, dtype=dtype)
        check_rule(f"out[{b}]", out[b:b + 1], out_ref, out_pt, 3)
        check_lse(lse[b:b + 1], lse_ref)


def test_kvcache_defaults_use_the_whole_cache(device):
    q = torch.randn(2, 1, 4, 32, dtype=torch.bfloat16, device=device)
    k_cache, v_cache = (torch.randn(2, 17, 4, 32, dtype=torch.bfloat16, device=device) for _ in range(2))
    out = fap.flash_attn_with_kvcache(q, k_cache, v_cache)
    expected = fap.flash_attn_func(q, k_cache, v_cache)
    if device.type == "cpu":
        assert torch.equal(out, expected)
    else:  # the decode kernels against the prefill kernels: another summation order
        torch.testing.assert_close(out, expected)
    with pytest.raises(fap.InvalidArgumentError, match="cache_seqlens"):
        new = torch.randn(2, 2, 4, 32, dtype=torch.bfloat16, device=device)
        fap.flash_attn_with_kvcache(q, k_cache, v_cache, new, new, cache_seqlens=16)  # 16 + 2 > 17
    with pytest.raises(fap.InvalidArgumentError, match="rotary_cos"):
        fap.flash_attn_with_kvcache(q, k_cache, v_cache, rotary_cos=torch.ones(17, 8, dtype=torch.bfloat16),
                                    rotary_sin=torch.zeros(17, 8, dtype=torch.bfloat16), cache_seqlens=3)


@pytest.mark.parametrize("index", [-2, -3, 3])
def test_kvcache_refuses_cache_entries_outside_the_cache(index):
    """A negative cache_batch_idx is not a Python index: [0, -2] must not write sequence 1's keys into the cache row
    of sequence 0 (nor [0, 3] past the cache); the cache is left untouched. Host-resident indices (the CPU backend)
    are checked; device-resident ones are clamped by the kernels."""
    q, k, v = (torch.randn(2, 1, 4, 32) for _ in range(3))
    k_cache, v_cache = (torch.randn(3, 16, 4, 32) for _ in range(2))
    before = k_cache.clone()
    with pytest.raises(fap.InvalidArgumentError, match=rf"cache_batch_idx\[1\] = {index}: expected an entry"):
        fap.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=torch.tensor([3, 4], dtype=torch.int32),
                                    cache_batch_idx=torch.tensor([0, index], dtype=torch.int32))
    assert torch.equal(k_cache, before)


@pytest.mark.parametrize("page", [1, 16, 256])
@pytest.mark.parametrize("num_splits", [0, 1, 3])
@pytest.mark.parametrize("seqlen_q", [1, 4])
def test_kvcache_pages_and_splits(device, page, num_splits, seqlen_q):
    """Paged caches of any page size with GQA 8/2 at d 128 (bf16), the keys split into num_splits parts, appended
    keys (rotated, interleaved) and a causal mask, against the reference over the dense cache."""
    dtype, batch, heads, heads_k, dim, capacity = torch.bfloat16, 3, 8, 2, 128, 512
    blocks = capacity // page
    q = torch.randn(batch, seqlen_q, heads, dim, dtype=dtype, device=device)
    dense_k = torch.randn(batch, capacity, heads_k, dim, dtype=dtype, device=device)
    dense_v = torch.randn_like(dense_k)
    table = torch.randperm(batch * blocks + 5)[:batch * blocks].view(batch, blocks).int().to(device)
    k_cache = torch.full((batch * blocks + 5, page, heads_k, dim), float("nan"), dtype=dtype, device=device)
    v_cache = k_cache.clone()
    k_cache[table.long().flatten()] = dense_k.view(batch * blocks, page, heads_k, dim)
    v_cache[table.long().flatten()] = dense_v.view(batch * blocks, page, heads_k, dim)
    seqlens = torch.tensor([0, 300, 511 - seqlen_q], dtype=torch.int32, device=device)
    k_new = torch.randn(batch, seqlen_q, heads_k, dim, dtype=dtype, device=device)
    v_new = torch.randn_like(k_new)
    angles = torch.rand(capacity, 32, device=device, dtype=torch.float64) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    out, lse = fap.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
                                           cache_seqlens=seqlens, block_table=table, causal=True,
                                           num_splits=num_splits, return_softmax_lse=True)
    for b in range(batch):
        length = int(seqlens[b]) + seqlen_q
        positions = torch.arange(int(seqlens[b]), length, device=device)
        keys = dense_k[b, :length].clone()
        keys[positions] = rotate_reference(k_new[b], cos, sin, positions, True).to(dtype)
        values = dense_v[b, :length].clone()
        values[positions] = v_new[b]
        q_b = rotate_reference(q[b], cos, sin, positions, True).to(dtype)
        out_ref, lse_ref = attention(q_b.double().unsqueeze(0), keys.double().unsqueeze(0),
                                     values.double().unsqueeze(0), causal=True)
        out_pt, _ = attention(q_b.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), causal=True, dtype=dtype)
        check_rule(f"out[{b}]", out[b:b + 1], out_ref, out_pt, 3)
        check_lse(lse[b:b + 1], lse_ref)


@pytest.mark.parametrize("dim", [36, 72, 128])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_kvcache_head_dims_and_alignment(device, dim, aligned, paged, num_splits):
    """Caches whose rows the kernels copy in 16-byte pieces or whole (head_dim a multiple of 8, rows 16-byte
    aligned: a tensor 8 elements wider) and caches they copy element by element (d = 36, or rows shifted by one
    element in a tensor 1 wider), dense or in pages of 16, with the elements past each row and the slots past each
    sequence's keys holding NaN, sequences ending inside a key tile, against the reference."""
    dtype, batch, heads, heads_k, page, capacity = torch.float16, 3, 8, 2, 16, 96
    blocks = capacity // page
    q = torch.randn(batch, 1, heads, dim, dtype=dtype, device=device)
    dense_k = torch.randn(batch, capacity, heads_k, dim, dtype=dtype, device=device)
    dense_v = torch.randn_like(dense_k)
    seqlens = torch.tensor([5, 37, 90], dtype=torch.int32, device=device)

    def cache(dense):
        rows = (batch * blocks, page) if paged else (batch, capacity)
        storage = torch.full((*rows, heads_k, dim + (8 if aligned else 1)), float("nan"), dtype=dtype, device=device)
        view = storage[..., :dim] if aligned else storage[..., 1:]
        if paged:
            view[table.long().flatten()] = dense.view(batch * blocks, page, heads_k, dim)
        else:
            view.copy_(dense)
        for b in range(batch):  # slots past each sequence's keys hold NaN
            if paged:
                for position in range(int(seqlens[b]), capacity):
                    view[table[b, position // page].long(), position % page] = float("nan")
            else:
                view[b, int(seqlens[b]):] = float("nan")
        return view

    table = torch.randperm(batch * blocks, device=device).view(batch, blocks).int()
    k_cache, v_cache = cache(dense_k), cache(dense_v)
    out, lse = fap.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens,
                                           block_table=table if paged else None, num_splits=num_splits,
                                           return_softmax_lse=True)
    for b in range(batch):
        length = int(seqlens[b])
        keys, values = dense_k[b:b + 1, :length], dense_v[b:b + 1, :length]
        out_ref, lse_ref = attention(q[b:b + 1].double(), keys.double(), values.double())
        out_pt, _ = attention(q[b:b + 1], keys, values, dtype=dtype)
        check_rule(f"out[{b}]", out[b:b + 1], out_ref, out_pt, 2)
        check_lse(lse[b:b + 1], lse_ref)


def test_kvcache_decode_step_replays_in_a_cuda_graph(device):
    """A decode step (paged cache, append with rotary, split keys) captured with torch.cuda.graph replays to the
    eager call's output, bit for bit: nothing in a call depends on device values read by the host."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs")
    dtype, batch, heads, heads_k, dim, page, blocks = torch.bfloat16, 4, 16, 4, 128, 16, 64
    q = torch.randn(batch, 1, heads, dim, dtype=dtype, device=device)
    k_cache = torch.randn(batch * blocks, page, heads_k, dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(batch * blocks, device=device).view(batch, blocks).int()
    seqlens = torch.tensor([7, 300, 900, 1000], dtype=torch.int32, device=device)
    k_new, v_new = (torch.randn(batch, 1, heads_k, dim, dtype=dtype, device=device) for _ in range(2))
    angles = torch.rand(blocks * page, 64, device=device) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    caches = (k_cache.clone(), v_cache.clone())

    def step():
        return fap.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
                                           cache_seqlens=seqlens, block_table=table, causal=True)

    eager = step()
    k_cache.copy_(caches[0]), v_cache.copy_(caches[1])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up (kernels compiled and loaded) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    k_cache.copy_(caches[0]), v_cache.copy_(caches[1])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    k_cache.copy_(caches[0]), v_cache.copy_(caches[1])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    seqlens.add_(1)  # the next step: device values change, the graph reads them
    graph.replay()
    assert torch.equal(captured, step())


@pytest.mark.parametrize("window", [(40, 0), (17, 5), (-1, 3)])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("seqlen_q", [5, 20])
def test_kvcache_window_softcap_alibi(device, window, paged, seqlen_q):
    """Sliding windows (normalised with the cache's capacity, as FA2), softcap and per-batch ALiBi slopes at
    d = 96 with GQA 8/2 and split keys, dense or paged, against the reference over each sequence's keys. 20 query
    rows (80 packed rows per kv head) make a prefill chunk: on CUDA the forward kernel's indexed-keys
    configuration runs it, 5 rows the decode kernel."""
    dtype, batch, heads, heads_k, dim, capacity, page = torch.float16, 2, 8, 2, 96, 320, 16
    q = torch.randn(batch, seqlen_q, heads, dim, dtype=dtype, device=device)
    dense_k = torch.randn(batch, capacity, heads_k, dim, dtype=dtype, device=device)
    dense_v = torch.randn_like(dense_k)
    seqlens = torch.tensor([300, 123], dtype=torch.int32, device=device)
    alibi = torch.rand(batch, heads, device=device) * 0.3
    k_cache, v_cache, table = dense_k, dense_v, None
    if paged:
        blocks = capacity // page
        table = torch.randperm(batch * blocks)[:batch * blocks].view(batch, blocks).int().to(device)
        k_cache = torch.empty(batch * blocks, page, heads_k, dim, dtype=dtype, device=device)
        v_cache = torch.empty_like(k_cache)
        k_cache[table.long().flatten()] = dense_k.view(batch * blocks, page, heads_k, dim)
        v_cache[table.long().flatten()] = dense_v.view(batch * blocks, page, heads_k, dim)
    out, lse = fap.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table,
                                           window_size=window, softcap=12.0, alibi_slopes=alibi, num_splits=3,
                                           return_softmax_lse=True)
    for b in range(batch):
        length = int(seqlens[b])
        keys, values = dense_k[b:b + 1, :length], dense_v[b:b + 1, :length]
        common = dict(window=window, softcap=12.0, alibi_slopes=alibi[b], window_seqlen_k=capacity)
        out_ref, lse_ref = attention(q[b:b + 1].double(), keys.double(), values.double(), **common)
        out_pt, _ = attention(q[b:b + 1], keys, values, dtype=dtype, **common)
        check_rule(f"out[{b}]", out[b:b + 1], out_ref, out_pt, 3)
        check_lse(lse[b:b + 1], lse_ref)
