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
    assert torch.equal(out, fap.flash_attn_func(q, k_cache, v_cache))
    with pytest.raises(fap.InvalidArgumentError, match="cache_seqlens"):
        new = torch.randn(2, 2, 4, 32, dtype=torch.bfloat16, device=device)
        fap.flash_attn_with_kvcache(q, k_cache, v_cache, new, new, cache_seqlens=16)  # 16 + 2 > 17
    with pytest.raises(fap.InvalidArgumentError, match="rotary_cos"):
        fap.flash_attn_with_kvcache(q, k_cache, v_cache, rotary_cos=torch.ones(17, 8, dtype=torch.bfloat16),
                                    rotary_sin=torch.zeros(17, 8, dtype=torch.bfloat16), cache_seqlens=3)
