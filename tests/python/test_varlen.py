"""The varlen functions (flash_attn_varlen_func, _kvpacked_func, _qkvpacked_func) on batches packed with
bert_padding.unpad_input from random padding masks, against per-sequence float64 references; and the paged
KV cache (block_table)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import flash_attn_plus as fap
from attention_case import MASKS, check_gradients, check_lse, check_rule, feature_options
from flash_attn_plus.bert_padding import pad_input, unpad_input
from reference import attention

pytestmark = pytest.mark.usefixtures("api_backend")  # every case on each backend (conftest.py)

DTYPES = [torch.float16, torch.bfloat16]
FEATURES = ["plain", "softcap", "alibi", "alibi_batch"]
HEADS = [(4, 4), (4, 2), (4, 1)]
SEQLENS = [(40, 40), (33, 70), (70, 33), (1, 50), (128, 96)]
HEAD_DIMS = [32, 64, 40, 128, 256]


def padding_mask(batch, seqlen, device, allow_empty):
    lengths = torch.randint(1 if not allow_empty else 0, seqlen + 1, (batch,))
    lengths[0] = seqlen  # one full sequence, so max_seqlen is the padded length
    return (torch.arange(seqlen).view(1, -1) < lengths.view(-1, 1)).to(device)


def _cases(packing):
    heads = HEADS[:1] if packing.endswith("qkvpacked") else HEADS
    for index, (dtype, mask, feature, (h, hk)) in enumerate(itertools.product(DTYPES, MASKS, FEATURES, heads)):
        seqlen_q, seqlen_k = SEQLENS[index % len(SEQLENS)]
        if packing.endswith("qkvpacked"):
            seqlen_k = seqlen_q
        head_dim = HEAD_DIMS[(index // len(SEQLENS) + index) % len(HEAD_DIMS)]
        yield pytest.param(packing, dtype, mask, feature, h, hk, seqlen_q, seqlen_k, head_dim,
                           id=f"{packing}-{str(dtype)[6:]}-{mask}-{feature}-h{h}k{hk}-q{seqlen_q}k{seqlen_k}-d{head_dim}")


CASES = [case for packing in ("varlen", "varlen_kvpacked", "varlen_qkvpacked") for case in _cases(packing)]


def _call(packing, q, k, v, cu_q, cu_k, max_q, max_k, **options):
    if packing == "varlen":
        return fap.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **options)
    if packing == "varlen_kvpacked":
        return fap.flash_attn_varlen_kvpacked_func(q, torch.stack((k, v), dim=1), cu_q, cu_k, max_q, max_k, **options)
    return fap.flash_attn_varlen_qkvpacked_func(torch.stack((q, k, v), dim=1), cu_q, max_q, **options)


@pytest.mark.parametrize("packing,dtype,mask,feature,heads,heads_k,seqlen_q,seqlen_k,head_dim", CASES)
def test_varlen_output_lse_and_gradients(device, packing, dtype, mask, feature, heads, heads_k, seqlen_q, seqlen_k,
                                         head_dim):
    batch = 3
    causal, window = MASKS[mask]
    options = dict(causal=causal, window_size=window, **feature_options(feature, batch, heads, device))
    q_mask = padding_mask(batch, seqlen_q, device, allow_empty=packing != "varlen_qkvpacked")
    k_mask = q_mask if packing == "varlen_qkvpacked" else padding_mask(batch, seqlen_k, device, allow_empty=True)
    padded = [torch.randn(batch, seqlen_q, heads, head_dim, dtype=dtype, device=device, requires_grad=True),
              torch.randn(batch, seqlen_k, heads_k, head_dim, dtype=dtype, device=device, requires_grad=True),
              torch.randn(batch, seqlen_k, heads_k, head_dim, dtype=dtype, device=device, requires_grad=True)]

    q, indices_q, cu_q, max_q, _ = unpad_input(padded[0], q_mask)
    k, _, cu_k, max_k, _ = unpad_input(padded[1], k_mask)
    v, _, _, _, _ = unpad_input(padded[2], k_mask)
    out, lse, _ = _call(packing, q, k, v, cu_q, cu_k, max_q, max_k, return_attn_probs=True, **options)
    assert out.shape == q.shape and lse.shape == (heads, q.shape[0])
    out_padded = pad_input(out, indices_q, batch, seqlen_q)

    exact = [t.detach().double().requires_grad_() for t in padded]
    plain = [t.detach().clone().requires_grad_() for t in padded]
    out_ref, lse_ref = _per_sequence(exact, q_mask, k_mask, max_k, options, torch.float64)
    out_pt, _ = _per_sequence(plain, q_mask, k_mask, max_k, options, dtype)
    check_rule("out", out_padded, out_ref, out_pt, 2)
    check_lse(lse, lse_ref)

    dout = torch.randn_like(out_padded) * q_mask.view(batch, seqlen_q, 1, 1)
    check_gradients(dout, (out_padded, out_ref, out_pt), "qkv", padded, exact, plain)


@pytest.mark.parametrize("causal,head_dim", [(False, 64), (True, 64), (True, 128), (False, 256)])
def test_more_row_blocks_than_multiprocessors(device, causal, head_dim):
    """More (128-row block, sequence, head) work items than an H200 has SMs (132): the sm_90 forward's CTAs then
    take several items each, of unequal lengths (varlen), with rows past short sequences and a sequence of no
    query rows among them. Output and LSE per sequence against float64 with FA2's rule."""
    heads, dtype = 16, torch.bfloat16
    lengths_q, lengths_k = [700, 0, 1300, 129, 333], [700, 90, 1400, 129, 40]
    cu_q, cu_k = (torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
                  for lengths in (lengths_q, lengths_k))
    q = torch.randn(sum(lengths_q), heads, head_dim, dtype=dtype, device=device)
    k, v = (torch.randn(sum(lengths_k), heads, head_dim, dtype=dtype, device=device) for _ in range(2))
    out, lse, _ = fap.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=causal,
                                             return_attn_probs=True)
    for i in range(len(lengths_q)):
        rows, keys = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        if lengths_q[i] == 0:
            continue
        args = (q[rows][None], k[keys][None], v[keys][None])
        reference, reference_lse = attention(*args, causal=causal)
        plain, _ = attention(*args, causal=causal, dtype=dtype)
        check_rule(f"out[{i}]", out[rows][None], reference, plain, 2)
        check_lse(lse[:, rows], reference_lse[0])


def _per_sequence(padded, q_mask, k_mask, max_seqlen_k, options, dtype):
    """Each sequence alone through the reference, padded back to (batch, seqlen_q, heads, head_dim); lse
    packed as FA2's varlen (heads, total_q)."""
    q, k, v = padded
    outs, lses = [], []
    alibi = options.get("alibi_slopes")
    for b in range(q.shape[0]):
        lq, lk = int(q_mask[b].sum()), int(k_mask[b].sum())
        slopes = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi)
        out, lse = attention(q[b:b + 1, :lq], k[b:b + 1, :lk], v[b:b + 1, :lk], causal=options["causal"],
                             window=options["window_size"], softcap=options.get("softcap", 0.0), alibi_slopes=slopes,
                             dtype=dtype, window_seqlen_k=max_seqlen_k)
        outs.append(F.pad(out, (0, 0, 0, 0, 0, q.shape[1] - lq)))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=-1)


@pytest.mark.parametrize("page_block_size", [16, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads_k", [4, 1])
def test_paged_kv_cache_matches_the_packed_keys(device, page_block_size, causal, heads_k):
    batch, heads, head_dim = 3, 4, 64
    lengths_k = torch.tensor([50, 17, 33])
    lengths_q = torch.tensor([9, 17, 1])
    cu_k = F.pad(lengths_k.cumsum(0), (1, 0)).int().to(device)
    cu_q = F.pad(lengths_q.cumsum(0), (1, 0)).int().to(device)
    q = torch.randn(int(lengths_q.sum()), heads, head_dim, dtype=torch.bfloat16, device=device)
    k, v = (torch.randn(int(lengths_k.sum()), heads_k, head_dim, dtype=torch.bfloat16, device=device) for _ in range(2))
    blocks_per_sequence = -(-int(lengths_k.max()) // page_block_size)
    num_blocks = batch * blocks_per_sequence + 2
    block_table = torch.randperm(num_blocks)[:batch * blocks_per_sequence].view(batch, -1).int().to(device)
    k_cache = torch.randn(num_blocks, page_block_size, heads_k, head_dim, dtype=torch.bfloat16, device=device)
    v_cache = torch.randn_like(k_cache)
    for b in range(batch):
        for t in range(int(lengths_k[b])):
            block, row = block_table[b, t // page_block_size], t % page_block_size
            k_cache[block, row] = k[int(cu_k[b]) + t]
            v_cache[block, row] = v[int(cu_k[b]) + t]
    max_q, max_k = int(lengths_q.max()), int(lengths_k.max())
    expected = fap.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal)
    paged = fap.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, max_q, max_k, causal=causal,
                                       block_table=block_table)
    if device.type == "cpu":  # the same kernel reads the keys packed or through the table
        assert torch.equal(paged, expected)
        with pytest.raises(fap.InvalidArgumentError, match="block_table"):
            fap.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, max_q, max_k,
                                       block_table=block_table + num_blocks)
    else:  # the decode kernels serve paged calls (another summation order); device-resident tables are clamped
        torch.testing.assert_close(paged, expected, atol=1e-2, rtol=1e-2)
