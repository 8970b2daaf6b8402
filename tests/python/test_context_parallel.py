"""Context parallelism (flash_attn_plus.context_parallel): the ring's plan against FA2's mask, the layouts, and
ring / Ulysses attention in several processes (gloo on the CPU, NCCL with one GPU per rank under --device cuda)
against one float64 attention over the whole sequence, under FA2's error rule."""
import importlib
import importlib.util
import itertools
import sys
import types

import pytest
import torch
import torch.distributed as dist

import flash_attn_plus as fap
from flash_attn_plus import context_parallel as cp

from attention_case import check_lse, check_rule
from reference import allowed_keys, attention

WINDOWS = [(-1, -1), (0, 0), (3, -1), (5, 2), (-1, 3), (1, 0), (9, 9), (2, 7), (30, -1)]


def _global_positions(layout, rank, world_size, local_len):
    chunks = cp._chunks_of_rank(layout, rank, world_size)
    chunk_len = local_len // len(chunks)
    return torch.cat([torch.arange(c * chunk_len, (c + 1) * chunk_len) for c in chunks])


@pytest.mark.parametrize("layout", cp.LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ring_blocks_cover_the_whole_sequence_mask_once(layout, world_size):
    """Every (query, key) pair FA2's mask keeps over the whole sequence is computed by exactly one call of one ring
    step, no other pair is, and no rank needs a step beyond ring_steps."""
    for local_len, causal, window in itertools.product((4, 6, 8), (False, True), WINDOWS):
        seqlen = world_size * local_len
        covered = torch.zeros(seqlen, seqlen, dtype=torch.int32)
        steps = cp.ring_steps(layout, world_size, local_len, causal, window)
        for rank, step in itertools.product(range(world_size), range(world_size)):
            owner = (rank - step) % world_size
            queries = _global_positions(layout, rank, world_size, local_len)
            keys = _global_positions(layout, owner, world_size, local_len)
            blocks = cp.ring_blocks(layout, rank, owner, world_size, local_len, causal, window)
            assert step < steps or not blocks, (local_len, causal, window, rank, step)
            for block in blocks:
                kept = allowed_keys(block.q_end - block.q_start, block.k_end - block.k_start, block.causal,
                                    (block.window_left, block.window_right))
                rows = queries[block.q_start:block.q_end].view(-1, 1).expand_as(kept)
                cols = keys[block.k_start:block.k_end].view(1, -1).expand_as(kept)
                covered.index_put_((rows[kept], cols[kept]), torch.tensor(1, dtype=torch.int32), accumulate=True)
        expected = allowed_keys(seqlen, seqlen, causal, window).int()
        assert torch.equal(covered, expected), (local_len, causal, window)


def test_sliding_window_skips_the_ranks_it_cannot_reach():
    assert cp.ring_steps("contiguous", 8, 64, True, (-1, -1)) == 8
    assert cp.ring_steps("contiguous", 8, 64, True, (100, 0)) == 3
    assert cp.ring_steps("contiguous", 8, 64, True, (64, 0)) == 2
    assert cp.ring_steps("contiguous", 8, 64, False, (0, 0)) == 1


@pytest.mark.parametrize("layout", cp.LAYOUTS)
def test_shard_and_unshard_are_inverse(layout):
    x = torch.arange(2 * 24 * 3).view(2, 24, 3)
    shards = [cp.shard(x, rank, 3, layout) for rank in range(3)]
    assert all(s.shape == (2, 8, 3) for s in shards)
    assert torch.equal(cp.unshard(shards, layout), x)
    if layout == "zigzag":
        assert shards[0][0, :, 0].tolist() == [0, 3, 6, 9, 60, 63, 66, 69]
    cu = torch.tensor([0, 12, 36], dtype=torch.int32)
    packed = torch.arange(36 * 2).view(36, 2)
    local = [cp.shard_varlen(packed, cu, rank, 3, layout) for rank in range(3)]
    assert local[1][1].tolist() == [0, 4, 12]
    assert torch.equal(cp.unshard_varlen([x for x, _ in local], local[0][1], layout), packed)


def test_layout_errors_name_the_argument():
    with pytest.raises(fap.InvalidArgumentError, match="layout"):
        cp.shard(torch.zeros(1, 8), 0, 2, "striped")
    with pytest.raises(fap.InvalidArgumentError, match="multiple of 4"):
        cp.shard(torch.zeros(1, 6), 0, 2, "zigzag")
    with pytest.raises(fap.InvalidArgumentError, match="cu_seqlens"):
        cp.shard_varlen(torch.zeros(9, 1), torch.tensor([0, 3, 9], dtype=torch.int32), 0, 2)


# ---------------------------------------------------------------------------------------------------------------
# Several processes


def _spawn(world_size, device, tmp_path, cases):
    """Runs every case on world_size ranks (one process each); a failed check fails the test with its traceback."""
    if device.type == "cuda" and torch.cuda.device_count() < world_size:
        pytest.skip(f"{world_size} ranks need {world_size} GPUs (one per NCCL rank), {torch.cuda.device_count()} seen")
    torch.multiprocessing.spawn(_rank_main, args=(world_size, device.type, str(tmp_path / "store"), cases),
                                nprocs=world_size, join=True)


def _rank_main(rank, world_size, device_type, store, cases):
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size)
    try:
        device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
        for case in cases:
            _CHECKS[case["check"]](rank, world_size, device, **{k: v for k, v in case.items() if k != "check"})
    finally:
        dist.destroy_process_group()


def _inputs(shape_q, shape_kv, device, seed):
    """Random q, k, v and dout of the whole sequence, the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(shape_q, generator=generator) for _ in range(2))
    k, v = (torch.randn(shape_kv, generator=generator) for _ in range(2))
    return [x.to(device=device, dtype=torch.bfloat16) for x in (q, k, v, dout)]


def _reference(q, k, v, dout, dtype, **options):
    """out, lse and (dq, dk, dv) of one attention over the whole sequence in `dtype`."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out, lse = attention(*leaves, dtype=dtype, **options)
    out.backward(dout.to(dtype))
    return out.detach(), lse, [x.grad for x in leaves]


def _compare(name, ours, reference, plain, lse=None, reference_lse=None):
    out, grads = ours
    check_rule(f"{name} out", out, reference[0], plain[0], 2)
    if lse is not None:
        check_lse(lse, reference_lse)
    for label, grad, ref, low in zip(("dq", "dk", "dv"), grads, reference[1], plain[1]):
        check_rule(f"{name} {label}", grad, ref, low, 3)


def _check_dense(rank, world_size, device, strategy, layout, causal, window=(-1, -1), softcap=0.0, heads=(4, 2),
                 seqlen=96, alibi=False, seed=0):
    q, k, v, dout = _inputs((2, seqlen, heads[0], 32), (2, seqlen, heads[1], 32), device, seed)
    slopes = torch.rand(heads[0], generator=torch.Generator().manual_seed(seed)).to(device) if alibi else None
    options = dict(causal=causal, window=window, softcap=softcap, alibi_slopes=slopes)
    reference, plain = (_reference(q, k, v, dout, dtype, **options) for dtype in (torch.float64, torch.bfloat16))
    local = [cp.shard(x, rank, world_size, layout).detach().requires_grad_() for x in (q, k, v)]
    function = {"ring": cp.ring_flash_attn_func, "ulysses": cp.ulysses_flash_attn_func}[strategy]
    out, lse, _ = function(*local, causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes,
                           return_attn_probs=True, layout=layout)
    out.backward(cp.shard(dout, rank, world_size, layout))

    def mine(x, dim=1):
        return cp.shard(x, rank, world_size, layout, dim=dim)

    name = f"{strategy} {layout} rank {rank}/{world_size} causal={causal} window={window} softcap={softcap}"
    _compare(name, (out, [x.grad for x in local]), (mine(reference[0]), [mine(g) for g in reference[2]]),
             (mine(plain[0]), [mine(g) for g in plain[2]]), lse, mine(reference[1], dim=2))


def _check_varlen(rank, world_size, device, layout, causal, lengths, softcap=0.0, heads=(4, 2), seed=0):
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
    q, k, v, dout = _inputs((cu[-1].item(), heads[0], 32), (cu[-1].item(), heads[1], 32), device, seed)
    reference, plain = ([], []), ([], [])
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        sequence = [x[None, start:end] for x in (q, k, v, dout)]
        for result, dtype in ((reference, torch.float64), (plain, torch.bfloat16)):
            out, lse, grads = _reference(*sequence, dtype, causal=causal, softcap=softcap)
            result[0].append((out[0], lse[0], [g[0] for g in grads]))
    whole = [(torch.cat([r[0] for r in result[0]]), torch.cat([r[1] for r in result[0]], dim=1),
              [torch.cat([r[2][i] for r in result[0]]) for i in range(3)]) for result in (reference, plain)]

    def mine(x):
        return cp.shard_varlen(x, cu, rank, world_size, layout)[0]

    local_cu = cp.shard_varlen(q, cu, rank, world_size, layout)[1].to(device)
    local = [mine(x).detach().requires_grad_() for x in (q, k, v)]
    out, lse, _ = cp.ring_flash_attn_varlen_func(*local, local_cu, max(lengths) // world_size, causal=causal,
                                                 softcap=softcap, return_attn_probs=True, layout=layout)
    out.backward(mine(dout))
    name = f"varlen {layout} rank {rank}/{world_size} causal={causal}"
    _compare(name, (out, [x.grad for x in local]), (mine(whole[0][0]), [mine(g) for g in whole[0][2]]),
             (mine(whole[1][0]), [mine(g) for g in whole[1][2]]), lse, mine(whole[0][1].T).T)


def _import_without_package_init(package, module):
    """ring-flash-attn's package __init__ imports transformers (for its Hugging Face adapter); its attention
    functions do not need it, so the package is registered without running __init__."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        return None
    if package not in sys.modules:
        stub = types.ModuleType(package)
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules[package] = stub
    return importlib.import_module(f"{package}.{module}")


def _check_ring_flash_attn_zigzag(rank, world_size, device, seed=0):
    """ring-flash-attention's own zigzag ring function, running on the flash_attn drop-in's private functions,
    against the whole-sequence reference and against ours."""
    zigzag = _import_without_package_init("ring_flash_attn", "zigzag_ring_flash_attn")
    q, k, v, dout = _inputs((2, 96, 4, 32), (2, 96, 2, 32), device, seed)
    reference, plain = (_reference(q, k, v, dout, dtype, causal=True) for dtype in (torch.float64, torch.bfloat16))
    local = [cp.shard(x, rank, world_size, "zigzag").detach().requires_grad_() for x in (q, k, v)]
    out = zigzag.zigzag_ring_flash_attn_func(*local, causal=True)
    out.backward(cp.shard(dout, rank, world_size, "zigzag"))

    def mine(x):
        return cp.shard(x, rank, world_size, "zigzag")

    _compare(f"ring-flash-attn zigzag rank {rank}", (out, [x.grad for x in local]),
             (mine(reference[0]), [mine(g) for g in reference[2]]), (mine(plain[0]), [mine(g) for g in plain[2]]))


def _check_yunchang(rank, world_size, device, seed=0):
    """yunchang's LongContextAttention (its ring over FA2's private functions; the whole group as the ring) on
    the drop-in, in its two layouts, against the whole-sequence reference."""
    import yunchang
    from yunchang.kernels import AttnType
    yunchang.set_seq_parallel_pg(1, world_size, rank, world_size)
    q, k, v, dout = _inputs((2, 96, 4, 32), (2, 96, 4, 32), device, seed)
    reference, plain = (_reference(q, k, v, dout, dtype, causal=True) for dtype in (torch.float64, torch.bfloat16))
    for ring_impl, layout in (("basic", "contiguous"), ("zigzag", "zigzag")):
        local = [cp.shard(x, rank, world_size, layout).detach().requires_grad_() for x in (q, k, v)]
        out = yunchang.LongContextAttention(ring_impl_type=ring_impl, attn_type=AttnType.FA)(*local, causal=True)
        out.backward(cp.shard(dout, rank, world_size, layout))

        def mine(x):
            return cp.shard(x, rank, world_size, layout)

        _compare(f"yunchang {ring_impl} rank {rank}", (out, [x.grad for x in local]),
                 (mine(reference[0]), [mine(g) for g in reference[2]]),
                 (mine(plain[0]), [mine(g) for g in plain[2]]))


_CHECKS = {"dense": _check_dense, "varlen": _check_varlen, "ring_flash_attn_zigzag": _check_ring_flash_attn_zigzag,
           "yunchang": _check_yunchang}


def _dense_cases(strategy, layouts=cp.LAYOUTS):
    cases = []
    for layout in layouts:
        cases += [dict(check="dense", strategy=strategy, layout=layout, causal=False),
                  dict(check="dense", strategy=strategy, layout=layout, causal=True, heads=(4, 4)),
                  dict(check="dense", strategy=strategy, layout=layout, causal=True, softcap=5.0, heads=(8, 2))]
    return cases


@pytest.mark.parametrize("world_size", [2, 4])
def test_ring_attention_equals_whole_sequence_attention(world_size, device, tmp_path):
    windows = [dict(check="dense", strategy="ring", layout="contiguous", causal=True, window=(30, 0)),
               dict(check="dense", strategy="ring", layout="zigzag", causal=False, window=(17, 5))]
    _spawn(world_size, device, tmp_path, _dense_cases("ring") + windows)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ring_varlen_attention_equals_whole_sequence_attention(world_size, device, tmp_path):
    lengths = [12 * world_size, 4 * world_size, 20 * world_size]
    _spawn(world_size, device, tmp_path, [dict(check="varlen", layout=layout, causal=causal, lengths=lengths)
                                          for layout in cp.LAYOUTS for causal in (False, True)])


def test_ulysses_attention_equals_whole_sequence_attention(device, tmp_path):
    extra = [dict(check="dense", strategy="ulysses", layout="zigzag", causal=True, window=(20, 0), alibi=True)]
    _spawn(2, device, tmp_path, _dense_cases("ulysses") + extra)


def test_ring_flash_attention_library_runs_on_the_drop_in(device, tmp_path):
    if importlib.util.find_spec("ring_flash_attn") is None or importlib.util.find_spec("flash_attn") is None:
        pytest.skip("ring-flash-attn or the flash_attn drop-in (./compat) is not installed")
    _spawn(2, device, tmp_path, [dict(check="ring_flash_attn_zigzag")])


def test_yunchang_runs_on_the_drop_in(device, tmp_path):
    if importlib.util.find_spec("yunchang") is None or importlib.util.find_spec("flash_attn") is None:
        pytest.skip("yunchang or the flash_attn drop-in (./compat) is not installed")
    _spawn(2, device, tmp_path, [dict(check="yunchang")])


def test_ring_refuses_what_it_cannot_compute():
    q = torch.zeros(1, 8, 2, 32, dtype=torch.bfloat16)
    with pytest.raises(fap.UnsupportedError, match="dropout_p"):
        cp._ring_plan(q, 0.1, None, False, (-1, -1), 0.0, None, False, "contiguous")
    with pytest.raises(fap.UnsupportedError, match="alibi_slopes"):
        cp._ring_plan(q, 0.0, None, False, (-1, -1), 0.0, torch.ones(2), False, "contiguous")
    with pytest.raises(fap.InvalidArgumentError, match="window_size"):
        cp._ring_plan(q, 0.0, None, False, (1,), 0.0, None, False, "contiguous")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"] + sys.argv[1:]))
