"""Run under compute-sanitizer (memcheck): decode and KV-cache calls whose device-resident indices point outside
the cache (block_table entries negative or past the blocks, cache_seqlens past the capacity, cache_batch_idx past
the entries, leftpad past the keys) must read and write nothing out of bounds. Prints the outputs' finiteness.

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/decode_memcheck.py
"""
import torch

import flash_attn_plus as fap

torch.manual_seed(0)
dtype, batch, heads, heads_k, dim, page, blocks = torch.bfloat16, 3, 8, 2, 128, 16, 4
q = torch.randn(batch, 2, heads, dim, dtype=dtype, device="cuda")
k_new = torch.randn(batch, 2, heads_k, dim, dtype=dtype, device="cuda")
v_new = torch.randn_like(k_new)
cos = torch.ones(blocks * page, 32, dtype=dtype, device="cuda")
sin = torch.zeros_like(cos)

# Paged: every kind of bad block index, and counts past the table's capacity.
k_cache = torch.randn(batch * blocks, page, heads_k, dim, dtype=dtype, device="cuda")
v_cache = torch.randn_like(k_cache)
table = torch.tensor([[0, -5, 1 << 30, 3], [4, 5, 6, 7], [-1, -1, -1, -1]], dtype=torch.int32, device="cuda")
seqlens = torch.tensor([60, 1 << 20, -7], dtype=torch.int32, device="cuda")
for splits in (1, 4):
    out = fap.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
                                      cache_seqlens=seqlens, block_table=table, causal=True, num_splits=splits)
    print("paged, splits", splits, "finite:", bool(torch.isfinite(out).all()))

# Dense: entries and left padding past the cache.
k_dense = torch.randn(2, blocks * page, heads_k, dim, dtype=dtype, device="cuda")
v_dense = torch.randn_like(k_dense)
entries = torch.tensor([0, 9, -3], dtype=torch.int32, device="cuda")
leftpad = torch.tensor([1 << 20, 3, -2], dtype=torch.int32, device="cuda")
out = fap.flash_attn_with_kvcache(q, k_dense, v_dense, k_new, v_new, cache_seqlens=seqlens, cache_batch_idx=entries,
                                  cache_leftpad=leftpad, causal=True)
print("dense finite:", bool(torch.isfinite(out).all()))

# The varlen paged call with used counts past the table.
q_varlen = torch.randn(5, heads, dim, dtype=dtype, device="cuda")
cu_q = torch.tensor([0, 2, 3, 5], dtype=torch.int32, device="cuda")
cu_k = torch.tensor([0, 64, 128, 192], dtype=torch.int32, device="cuda")
out = fap.flash_attn_varlen_func(q_varlen, k_cache, v_cache, cu_q, cu_k, 2, 64, block_table=table, causal=True)
print("varlen paged finite:", bool(torch.isfinite(out).all()))
torch.cuda.synchronize()
