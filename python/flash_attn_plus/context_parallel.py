"""Context parallelism: one attention over a sequence split across the ranks of a torch.distributed group.

Every rank holds a shard of the sequence (queries, keys and values of the same tokens) and gets the attention
output of its own queries over the whole sequence, with gradients to its own q, k and v.

Two strategies:
- **ring** (`ring_flash_attn_func`, `ring_flash_attn_varlen_func`): each rank keeps its queries; the key/value
  shards travel around the ring (rank r sends to r + 1), one step per shard, the next shard's transfer
  overlapping the current shard's attention (asynchronous point-to-point operations: on NCCL they run on its own
  stream). Partial outputs merge by their log-sum-exp in float32. The backward sends the shards around again with
  their dK/dV accumulators (float32) travelling behind them, and hands every accumulator back to its owner. Steps
  that no rank needs (a sliding window shorter than the sequence) are not taken.
- **Ulysses** (`ulysses_flash_attn_func`): two all-to-alls turn the sequence split into a head split and back, so
  every rank runs the whole sequence for nheads / world_size heads: every FA2 feature works (ALiBi, dropout),
  and the number of heads (and KV heads) must be a multiple of the group size.

Layouts (how the sequence is split; `shard` / `unshard` produce and invert them):
- `"contiguous"`: rank r holds tokens [r * L, (r + 1) * L) of a sequence of world_size * L tokens;
- `"zigzag"`: the sequence is cut into 2 * world_size chunks and rank r holds chunks r and 2 * world_size - 1 - r,
  so that under a causal mask every rank does the same work.

The mask is the one FlashAttention-2 applies to the whole sequence (same-length queries and keys: causal and
window bands are measured between global token positions). The ring splits it into rectangles, each computed by
one FlashAttention call whose own (bottom-right aligned) causal flag and window reproduce the band on it.
"""
from typing import NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from . import _errors
from .interface import _require_tensors, flash_attn_func, window_pair
from .ops import Options, _backward, _forward

LAYOUTS = ("contiguous", "zigzag")

__all__ = ["ring_flash_attn_func", "ring_flash_attn_varlen_func", "ulysses_flash_attn_func", "shard", "unshard",
           "shard_varlen", "unshard_varlen", "LAYOUTS"]


# ---------------------------------------------------------------------------------------------------------------
# Layouts


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise _errors.InvalidArgumentError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def _chunk_count(layout, world_size):
    return world_size if layout == "contiguous" else 2 * world_size


def _chunks_of_rank(layout, rank, world_size):
    """Global chunk indices a rank holds, in its local order."""
    return (rank,) if layout == "contiguous" else (rank, 2 * world_size - 1 - rank)


def shard(x, rank, world_size, layout="contiguous", dim=1):
    """The part of a whole sequence `x` (sequence along `dim`) that `rank` holds in `layout`."""
    _check_layout(layout)
    chunks = _chunk_count(layout, world_size)
    if x.shape[dim] % chunks:
        raise _errors.InvalidArgumentError(
            f"x: sequence length {x.shape[dim]} is not a multiple of {chunks} (the {layout} layout's chunk count "
            f"for {world_size} ranks)")
    pieces = x.chunk(chunks, dim=dim)
    return torch.cat([pieces[c] for c in _chunks_of_rank(layout, rank, world_size)], dim=dim)


def unshard(shards, layout="contiguous", dim=1):
    """The whole sequence from every rank's shard (a list in rank order): the inverse of `shard`."""
    _check_layout(layout)
    world_size = len(shards)
    parts = [None] * _chunk_count(layout, world_size)
    for rank, local in enumerate(shards):
        chunks = _chunks_of_rank(layout, rank, world_size)
        for chunk, piece in zip(chunks, local.chunk(len(chunks), dim=dim)):
            parts[chunk] = piece
    return torch.cat(parts, dim=dim)


def _lengths(cu_seqlens):
    return (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()


def _cumulative(lengths, like):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    return cu.to(like.device)


def shard_varlen(x, cu_seqlens, rank, world_size, layout="contiguous"):
    """(local x, local cu_seqlens): every sequence of a packed batch (x: (total, ...), cu_seqlens: batch + 1) split
    over the ranks in `layout`; each sequence's length must be a multiple of the layout's chunk count."""
    _check_layout(layout)
    chunks = _chunk_count(layout, world_size)
    lengths = _lengths(cu_seqlens)
    if any(length % chunks for length in lengths):
        raise _errors.InvalidArgumentError(
            f"cu_seqlens: every sequence length must be a multiple of {chunks} (the {layout} layout for "
            f"{world_size} ranks), got {lengths}")
    starts = cu_seqlens[:-1].tolist()
    local = [shard(x[start:start + length], rank, world_size, layout, dim=0) for start, length in zip(starts, lengths)]
    return torch.cat(local, dim=0), _cumulative([length // world_size for length in lengths], cu_seqlens)


def unshard_varlen(shards, local_cu_seqlens, layout="contiguous"):
    """The packed batch from every rank's local tokens (a list in rank order) and the local cu_seqlens (the same on
    every rank): the inverse of `shard_varlen`."""
    _check_layout(layout)
    bounds = local_cu_seqlens.tolist()
    sequences = [unshard([local[bounds[i]:bounds[i + 1]] for local in shards], layout, dim=0)
                 for i in range(len(bounds) - 1)]
    return torch.cat(sequences, dim=0)


# ---------------------------------------------------------------------------------------------------------------
# The ring's plan: which rectangles of the global mask a rank computes against which key/value shard


class Block(NamedTuple):
    """One FlashAttention call of a ring step: local query rows [q_start, q_end) against rows [k_start, k_end) of
    the key/value shard held at that step, with the causal flag and window that reproduce the global band there."""
    q_start: int
    q_end: int
    k_start: int
    k_end: int
    causal: bool
    window_left: int
    window_right: int


def _band_block(q_start, k_start, length, offset, lower, upper):
    """The call for the queries q_start + i against the keys k_start + j (i, j < length) of two chunks whose global
    positions differ by `offset` (query chunk start - key chunk start). Whole-sequence FA2 keeps key gk for query gq
    when gq - left <= gk <= gq + right, that is lower <= j - i <= upper with lower = offset - left and upper =
    offset + right (None: unbounded). None when no pair is kept. The call is cut to the rows and keys that keep a
    pair, which puts the band's corner where FA2's bottom-right alignment expects it: both window sides of the cut
    rectangle are then non-negative (or unbounded)."""
    first_row = 0 if upper is None else max(0, -upper)
    end_row = length if lower is None else min(length, length - lower)
    if first_row >= end_row or (lower is not None and upper is not None and lower > upper):
        return None
    first_key = 0 if lower is None else max(0, first_row + lower)
    end_key = length if upper is None else min(length, end_row + upper)
    rows, keys = end_row - first_row, end_key - first_key
    corner = keys - rows  # FA2's diagonal offset of the cut rectangle
    shift = first_key - first_row  # local (j - i) = global difference - shift
    left = -1 if lower is None else corner - (lower - shift)
    right = -1 if upper is None else (upper - shift) - corner
    if left >= keys - 1:  # the lower side cuts nothing in this rectangle
        left = -1
    if right >= rows - 1:
        right = -1
    causal = right == 0
    return Block(q_start + first_row, q_start + end_row, k_start + first_key, k_start + end_key, causal,
                 left, right)


def _merge_full_blocks(blocks):
    """Joins unmasked calls over adjacent rows (same keys) or adjacent keys (same rows) into one call."""
    merged = list(blocks)
    joined = True
    while joined:
        joined = False
        for i, a in enumerate(merged):
            for j, b in enumerate(merged):
                if i == j or a.causal or b.causal or (a.window_left, a.window_right, b.window_left,
                                                      b.window_right) != (-1, -1, -1, -1):
                    continue
                if (a.k_start, a.k_end) == (b.k_start, b.k_end) and a.q_end == b.q_start:
                    merged[i] = a._replace(q_end=b.q_end)
                elif (a.q_start, a.q_end) == (b.q_start, b.q_end) and a.k_end == b.k_start:
                    merged[i] = a._replace(k_end=b.k_end)
                else:
                    continue
                del merged[j]
                joined = True
                break
            if joined:
                break
    return merged


def ring_blocks(layout, rank, owner, world_size, local_len, causal, window):
    """The calls rank `rank` makes against the key/value shard of `owner` for a sequence of world_size * local_len
    tokens (FA2's mask over the whole sequence: causal, window (left, right), -1 unbounded)."""
    left, right = window
    if causal:
        right = 0
        if owner == rank and left < 0:
            # Both layouts keep a rank's chunks in increasing global order, so the causal mask among its own tokens
            # is the causal mask of its local order: one call instead of one per chunk pair.
            return [Block(0, local_len, 0, local_len, True, -1, 0)]
    chunks = _chunks_of_rank(layout, rank, world_size)
    key_chunks = _chunks_of_rank(layout, owner, world_size)
    chunk_len = local_len // len(chunks)
    blocks = []
    for qi, q_chunk in enumerate(chunks):
        for ki, k_chunk in enumerate(key_chunks):
            offset = (q_chunk - k_chunk) * chunk_len
            block = _band_block(qi * chunk_len, ki * chunk_len, chunk_len, offset,
                                None if left < 0 else offset - left, None if right < 0 else offset + right)
            if block is not None:
                blocks.append(block)
    return _merge_full_blocks(blocks)


def ring_steps(layout, world_size, local_len, causal, window):
    """How many ring steps the group takes: the largest (rank - owner) mod world_size that any rank needs, + 1."""
    needed = [t for t in range(world_size) for rank in range(world_size)
              if ring_blocks(layout, rank, (rank - t) % world_size, world_size, local_len, causal, window)]
    return max(needed, default=0) + 1


# ---------------------------------------------------------------------------------------------------------------
# Communication


class _Ring:
    """Point-to-point exchanges around a process group (ranks of the group, translated to global ranks)."""

    def __init__(self, group):
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)

    def _global(self, group_rank):
        if self.group is dist.group.WORLD:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def exchange(self, tensors, send_to, receive_from):
        """Starts sending `tensors` to group rank `send_to` and receiving as many from `receive_from`; returns
        (buffers, requests): the buffers are valid after `wait(requests)`."""
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self._global(send_to % self.world_size), self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self._global(receive_from % self.world_size), self.group)
                for t in received]
        return received, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(requests):
        for request in requests:
            request.wait()


# ---------------------------------------------------------------------------------------------------------------
# Ring attention: the calls of a step, and the loop that runs them while the shards travel


class _Rows(NamedTuple):
    """Which local rows (tokens) a call reads and writes: a slice of the sequence dimension (dense layout,
    (batch, seqlen, heads, d), lse (batch, heads, seqlen)), or an index of tokens (varlen layout, (total, heads,
    d), lse (heads, total)), None for all of them."""
    dense: bool
    rows: object

    def take(self, x):
        if self.rows is None:
            return x
        return x[:, self.rows] if self.dense else x.index_select(0, self.rows)

    def take_lse(self, lse):
        if self.rows is None:
            return lse
        return lse[:, :, self.rows] if self.dense else lse.index_select(1, self.rows)

    def add(self, target, value):
        """target[rows] += value (target float32)."""
        if self.rows is None:
            target += value
        elif self.dense:
            target[:, self.rows] += value
        else:
            target.index_add_(0, self.rows, value.float())

    def merge(self, out, lse, block_out, block_lse):
        """Merges a call's result into the partial one by log-sum-exp. The partial out is float32 and rows not
        reached yet hold lse = -inf and out = 0; a call's rows are never empty, so the merged lse is finite."""
        if self.rows is not None and not self.dense:  # merged on a gathered copy, written back
            part_out, part_lse = self.take(out), self.take_lse(lse)
            _Rows(False, None).merge(part_out, part_lse, block_out, block_lse)
            out.index_copy_(0, self.rows, part_out)
            lse.index_copy_(1, self.rows, part_lse)
            return
        out, lse = self.take(out), self.take_lse(lse)  # views
        merged = torch.logaddexp(lse, block_lse)
        old_weight, new_weight = (torch.exp(x - merged).transpose(-1, -2).unsqueeze(-1) for x in (lse, block_lse))
        out.mul_(old_weight).add_(block_out.float() * new_weight)
        lse.copy_(merged)


class _Call(NamedTuple):
    """One FlashAttention call of a ring step: query rows against key rows of the shard held at that step."""
    rows: _Rows
    keys: _Rows
    varlen: tuple  # (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k), or Nones and zeros
    options: Options


class _RingPlan(NamedTuple):
    layout: str
    causal: bool
    window: Tuple[int, int]
    softmax_scale: float
    softcap: float
    deterministic: bool

    def options(self, causal, window_left=-1, window_right=-1):
        return Options(self.softmax_scale, causal, window_left, window_right, self.softcap, 0.0, self.deterministic)


class _DenseSchedule(NamedTuple):
    """The calls of each step for shards (batch, local_seqlen, heads, d) in the plan's layout."""
    plan: _RingPlan
    world_size: int
    local_len: int

    def steps(self):
        return ring_steps(self.plan.layout, self.world_size, self.local_len, self.plan.causal, self.plan.window)

    def calls(self, rank, owner):
        plan = self.plan
        return [_Call(_Rows(True, slice(b.q_start, b.q_end)), _Rows(True, slice(b.k_start, b.k_end)),
                      (None, None, 0, 0), plan.options(b.causal, b.window_left, b.window_right))
                for b in ring_blocks(plan.layout, rank, owner, self.world_size, self.local_len, plan.causal,
                                     plan.window)]


class _VarlenSchedule(NamedTuple):
    """The calls of each step for packed local tokens: cu_seqlens and the longest local sequence, and for the
    zigzag layout the tokens and cu_seqlens of the first and the second half of every local sequence. Without a
    window the chunk pairs of every sequence fall the same way, so one varlen call covers the batch."""
    plan: _RingPlan
    world_size: int
    cu_seqlens: torch.Tensor
    max_seqlen: int
    halves: Optional[tuple]

    @staticmethod
    def build(plan, world_size, cu_seqlens, max_seqlen):
        if plan.layout == "contiguous":
            return _VarlenSchedule(plan, world_size, cu_seqlens, max_seqlen, None)
        lengths = _lengths(cu_seqlens)
        if any(length % 2 for length in lengths):
            raise _errors.InvalidArgumentError(
                f"cu_seqlens: the zigzag layout holds two equal chunks of every sequence, so every local length must "
                f"be even, got {lengths}")
        starts = cu_seqlens[:-1].tolist()
        halves = []
        for half in range(2):
            tokens = [torch.arange(start + half * length // 2, start + (half + 1) * length // 2)
                      for start, length in zip(starts, lengths)]
            halves.append((torch.cat(tokens).to(cu_seqlens.device),
                           _cumulative([length // 2 for length in lengths], cu_seqlens)))
        return _VarlenSchedule(plan, world_size, cu_seqlens, max_seqlen, tuple(halves))

    def steps(self):
        return self.world_size

    def _part(self, half):
        """(rows, cu_seqlens, max_seqlen) of every local token (half None) or of one half of every sequence."""
        if half is None:
            return _Rows(False, None), self.cu_seqlens, self.max_seqlen
        tokens, cu = self.halves[half]
        return _Rows(False, tokens), cu, self.max_seqlen // 2

    def calls(self, rank, owner):
        if not self.plan.causal:
            parts = [(None, None, False)]
        elif owner == rank:  # both layouts: causal over the rank's own tokens in local order (see ring_blocks)
            parts = [(None, None, True)]
        elif self.plan.layout == "contiguous":
            parts = [(None, None, False)] if owner < rank else []
        else:  # zigzag: earlier owners' first halves are before all of ours; our second halves follow all of theirs
            parts = [(None, 0, False)] if owner < rank else [(1, None, False)]
        calls = []
        for q_half, k_half, causal in parts:
            rows, cu_q, max_q = self._part(q_half)
            keys, cu_k, max_k = self._part(k_half)
            calls.append(_Call(rows, keys, (cu_q, cu_k, max_q, max_k), self.plan.options(causal)))
        return calls


def _finish(out, lse, dtype):
    """FA2's outputs from the merged ones: rows no key reached have out = 0 and lse = +inf."""
    lse.masked_fill_(lse == float("-inf"), float("inf"))
    return out.to(dtype), lse


def _ring_forward(ring, schedule, q, k, v, lse_shape):
    steps = schedule.steps()
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=q.device)
    shard_kv = (k, v)
    for step in range(steps):
        incoming = ring.exchange(shard_kv, ring.rank + 1, ring.rank - 1) if step + 1 < steps else None
        for call in schedule.calls(ring.rank, (ring.rank - step) % ring.world_size):
            cu_q, cu_k, max_q, max_k = call.varlen
            block_out, block_lse, _, _ = _forward(call.rows.take(q), call.keys.take(shard_kv[0]),
                                                  call.keys.take(shard_kv[1]), cu_q, cu_k, None, None, None, max_q,
                                                  max_k, False, call.options)
            call.rows.merge(out, lse, block_out, block_lse)
        if incoming is not None:
            ring.wait(incoming[1])
            shard_kv = tuple(incoming[0])
    return _finish(out, lse, q.dtype)


def _ring_backward(ring, schedule, dout, q, k, v, out, lse):
    """dq of the rank's queries and the dK/dV of its shard. A shard's dK/dV accumulators (float32) travel one
    step behind the shard: each rank adds its calls' gradients into the accumulator it receives and passes it on,
    so only one accumulator per shard exists, and the transfer overlaps the next step's calls."""
    steps = schedule.steps()
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    shard_kv = (k, v)
    gradients, travelling = None, None
    for step in range(steps):
        incoming = ring.exchange(shard_kv, ring.rank + 1, ring.rank - 1) if step + 1 < steps else None
        results = []
        for call in schedule.calls(ring.rank, (ring.rank - step) % ring.world_size):
            cu_q, cu_k, max_q, max_k = call.varlen
            block_dq, block_dk, block_dv = _backward(
                call.rows.take(dout), call.rows.take(q), call.keys.take(shard_kv[0]), call.keys.take(shard_kv[1]),
                call.rows.take(out), call.rows.take_lse(lse).contiguous(), cu_q, cu_k, None, max_q, max_k, (0, 0),
                call.options)
            call.rows.add(dq, block_dq)
            results.append((call.keys, block_dk, block_dv))
        if travelling is None:
            gradients = tuple(torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in shard_kv)
        else:
            ring.wait(travelling[1])
            gradients = tuple(travelling[0])
        for keys, block_dk, block_dv in results:
            keys.add(gradients[0], block_dk)
            keys.add(gradients[1], block_dv)
        travelling = ring.exchange(gradients, ring.rank + 1, ring.rank - 1) if step + 1 < steps else None
        if incoming is not None:
            ring.wait(incoming[1])
            shard_kv = tuple(incoming[0])
    dk, dv = _return_to_owners(ring, steps, *gradients)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _return_to_owners(ring, steps, dk, dv):
    """The dK/dV accumulators held after the last step belong to rank - (steps - 1): one exchange hands every
    accumulator to its owner."""
    if steps == 1:
        return dk, dv
    (dk, dv), requests = ring.exchange((dk, dv), ring.rank - (steps - 1), ring.rank + (steps - 1))
    ring.wait(requests)
    return dk, dv


# ---------------------------------------------------------------------------------------------------------------
# Autograd and the public functions


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring, schedule):
        q, k, v = (x.contiguous() for x in (q, k, v))
        dense = isinstance(schedule, _DenseSchedule)
        lse_shape = (q.shape[0], q.shape[2], q.shape[1]) if dense else (q.shape[1], q.shape[0])
        out, lse = _ring_forward(ring, schedule, q, k, v, lse_shape)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.schedule = ring, schedule
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        grads = _ring_backward(ctx.ring, ctx.schedule, dout.contiguous(), q, k, v, out, lse)
        return grads + (None, None)


def _ring_plan(q, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, layout):
    _check_layout(layout)
    if dropout_p:
        raise _errors.UnsupportedError(
            "dropout_p: ring attention has no dropout (the mask would depend on the split); use "
            "ulysses_flash_attn_func, which runs the whole sequence per head")
    if alibi_slopes is not None:
        raise _errors.UnsupportedError(
            "alibi_slopes: ring attention has no ALiBi (its bias needs global positions inside each call); use "
            "ulysses_flash_attn_func")
    return _RingPlan(layout, bool(causal), window_pair(window_size),
                     q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale),
                     0.0 if softcap is None else float(softcap), bool(deterministic))


def _outputs(out, lse, return_attn_probs):
    return (out, lse, None) if return_attn_probs else out


def ring_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                         alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None,
                         layout="contiguous"):
    """Ring attention over the sequence split across `group` (default: the whole world) in `layout`.

    q: (batch, local_seqlen, nheads, headdim), k, v: (batch, local_seqlen, nheads_k, headdim): this rank's shard
    (see `shard`); every rank passes the same shapes. Same arguments and semantics as `flash_attn_func` over the
    whole sequence (causal, window_size, softcap, GQA, deterministic); dropout and ALiBi are refused (use
    `ulysses_flash_attn_func`). Returns out (the rank's rows), or (out, softmax_lse (batch, nheads, local_seqlen),
    None) with return_attn_probs=True. Every rank of the group must call it (it communicates)."""
    _require_tensors(q=q, k=k, v=v)
    ring = _Ring(group)
    plan = _ring_plan(q, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, layout)
    chunks_per_rank = len(_chunks_of_rank(layout, 0, 1))
    if q.dim() != 4 or k.shape[1] != q.shape[1] or q.shape[1] % chunks_per_rank:
        raise _errors.InvalidArgumentError(
            f"q, k: expected shards (batch, local_seqlen, heads, headdim) of the same length (even for the zigzag "
            f"layout), got q {tuple(q.shape)} and k {tuple(k.shape)}")
    out, lse = _RingAttention.apply(q, k, v, ring, _DenseSchedule(plan, ring.world_size, q.shape[1]))
    return _outputs(out, lse, return_attn_probs)


def ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                return_attn_probs=False, group=None, layout="contiguous"):
    """Ring attention over a packed batch whose every sequence is split across `group` in `layout`.

    q: (local_total, nheads, headdim), k, v: (local_total, nheads_k, headdim); cu_seqlens (batch + 1, int32) and
    max_seqlen describe this rank's part of every sequence (the same on every rank; see `shard_varlen`). Causal and
    not, softcap, GQA; a sliding window needs the dense layout (ring_flash_attn_func). Returns out, or (out,
    softmax_lse (nheads, local_total), None) with return_attn_probs=True."""
    _require_tensors(q=q, k=k, v=v, cu_seqlens=cu_seqlens)
    ring = _Ring(group)
    plan = _ring_plan(q, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, layout)
    if plan.window != (-1, -1):
        raise _errors.UnsupportedError("window_size: ring_flash_attn_varlen_func has no sliding window yet "
                                       "(ring_flash_attn_func has)")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise _errors.InvalidArgumentError("cu_seqlens: expected a 1-D int32 tensor of batch + 1 offsets")
    if k.shape[0] != q.shape[0]:
        raise _errors.InvalidArgumentError(
            f"q, k: expected the same local tokens, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    schedule = _VarlenSchedule.build(plan, ring.world_size, cu_seqlens, int(max_seqlen))
    out, lse = _RingAttention.apply(q, k, v, ring, schedule)
    return _outputs(out, lse, return_attn_probs)


# ---------------------------------------------------------------------------------------------------------------
# Ulysses: all-to-all from a sequence split to a head split


def _sequence_to_heads(x, group, layout):
    """(batch, local_seqlen, heads, d) per rank -> (batch, seqlen, heads / world_size, d): rank r gets head group r
    of the whole sequence, in global token order."""
    world_size = dist.get_world_size(group)
    batch, local_len, heads, head_dim = x.shape
    send = x.reshape(batch, local_len, world_size, heads // world_size, head_dim).permute(2, 0, 1, 3, 4).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    # received[r]: rank r's tokens of this rank's head group
    return unshard(list(received.unbind(0)), layout, dim=1)


def _heads_to_sequence(x, group, layout):
    """The inverse of _sequence_to_heads."""
    world_size = dist.get_world_size(group)
    send = torch.stack([shard(x, r, world_size, layout, dim=1) for r in range(world_size)]).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    # received[r]: this rank's tokens of head group r
    batch, local_len, head_dim = send.shape[1], send.shape[2], send.shape[4]
    return received.permute(1, 2, 0, 3, 4).reshape(batch, local_len, -1, head_dim)


class _AllToAll(torch.autograd.Function):
    """_sequence_to_heads (to_heads=True) or _heads_to_sequence, each the other's gradient."""

    @staticmethod
    def forward(ctx, x, group, layout, to_heads):
        ctx.group, ctx.layout, ctx.to_heads = group, layout, to_heads
        return (_sequence_to_heads if to_heads else _heads_to_sequence)(x, group, layout)

    @staticmethod
    def backward(ctx, grad):
        inverse = _heads_to_sequence if ctx.to_heads else _sequence_to_heads
        return inverse(grad.contiguous(), ctx.group, ctx.layout), None, None, None


def ulysses_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                            softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None,
                            layout="contiguous"):
    """Ulysses (all-to-all) context parallelism: the same contract as ring_flash_attn_func, with every FA2 feature
    (dropout, ALiBi included): nheads and nheads_k must be multiples of the group size. alibi_slopes (nheads,) or
    (batch, nheads) are the whole model's. Returns out, or (out, softmax_lse (batch, nheads, local_seqlen), None)
    with return_attn_probs=True."""
    _require_tensors(q=q, k=k, v=v)
    _check_layout(layout)
    group = group if group is not None else dist.group.WORLD
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4 or x.shape[2] % world_size:
            raise _errors.InvalidArgumentError(
                f"{name}: expected (batch, local_seqlen, heads, headdim) with heads a multiple of the group size "
                f"{world_size}, got {tuple(x.shape)}")
    if alibi_slopes is not None:
        heads = q.shape[2] // world_size
        alibi_slopes = alibi_slopes[..., rank * heads:(rank + 1) * heads].contiguous()
    q_heads, k_heads, v_heads = (_AllToAll.apply(x, group, layout, True) for x in (q, k, v))
    result = flash_attn_func(q_heads, k_heads, v_heads, dropout_p, softmax_scale, causal, window_size, softcap,
                             alibi_slopes, deterministic, return_attn_probs)
    out = _AllToAll.apply(result[0] if return_attn_probs else result, group, layout, False)
    if not return_attn_probs:
        return out
    lse = _heads_to_sequence(result[1].transpose(1, 2).unsqueeze(-1).contiguous(), group, layout)
    return out, lse.squeeze(-1).transpose(1, 2).contiguous(), None
