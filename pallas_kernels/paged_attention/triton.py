# T token rows, S sequences (page-table rows), M pages per sequence, P pages in the pool, Z page size,
# Hq query heads, Hkv key/value heads, R = Hq // Hkv (R' padded to a power of two), K head dim,
# Q = block_q token rows per program, N program blocks, J splits of a block's pages, W positions a loop
# step reads, D decode rows (at most min(S, T)), I decode work items, E = max(16, R') decode tile rows.
"""Ragged paged attention on the Pallas Triton backend.

The rows are ordered by sequence (a stable sort, undone on the way out) and cut into blocks of up
to Q rows of one sequence: a 1000-token prompt chunk is a run of full blocks. The block launch, grid
(N, Hkv, J): each program takes one block's Q x R' query rows of one KV head (every query head of the
group shares the keys it loads), walks the sequence's pages that any of its rows can see, W positions
a step, with the running max and sum in float32, and masks each row to its own causal (and window)
span. With J > 1 splits each program takes a share of the pages and `combine` merges the partials.

With a decode config, rows that are their sequence's only row of the step (decode rows) leave the
block launch for the decode launch, grid (Hkv, I): a program takes one work item, a share of one
decode row's key steps, with the row's R' heads in an E = 16-row tile rather than Q x R' rows of
which R' would be live. How many items each row takes is chosen on the device from the decode rows
present (`decode_items`), so the grid is sized for the worst case and items past the last exit at
once; `combine` merges each row's items.

Page 0 of the pool and pages of other sequences are never read: a program only follows its own
sequence's page-table row. Nothing past a row's span reaches it: "pages" gathers zero such slots in
registers, "rows" gathers never load them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_attention import mosaic
from pallas_kernels.paged_attention.config import DecodeConfig, PagedAttentionConfig, query_heads_padded
from pallas_kernels.paged_attention.steps import key_steps
from pallas_kernels.splits import combine

# What an fp8 pool is widened to: e4m3 -> f16 is exact, and f16 keeps more bits of q and of the
# probabilities than bf16 (as in pallas_kernels.decode_attention).
_FP8_COMPUTE_DTYPE = jnp.float16
# The smallest M of a tensor-core dot: the decode launch's tile rows.
_MIN_ROWS = 16
# A split whose fill of the machine's waves is within this share of the best is as good.
_FILL = 0.95


class Gather(NamedTuple):
    """How a loop step reads its keys and values.

    load(pre, i, kv_pos, kv_ok) -> k, v [W, K] in the compute dtype and, for fp8 pools, the scales [W]
        (None otherwise); zero wherever kv_ok is False.
    prefetch(kv_pos [W], kv_ok [W]) -> pre: what a step's reads need first (its page ids), run one step
        ahead and carried, so the key and value loads do not wait on a load of the same step: Triton's
        pipeliner splits its stages over such a chain (`(num_stages - 1) / (levels + 1)` each), which
        leaves one buffer and no load in flight while the tile is used. None: nothing ahead (pre None).
    """

    load: Callable[..., tuple[jax.Array, jax.Array, Any, Any]]
    prefetch: Callable[[jax.Array, jax.Array], jax.Array] | None = None


def _page_gather(pages_ref, k_ref, v_ref, ks_ref, vs_ref, *, pages_per_step: int, compute_dtype) -> Gather:
    """Pools [P, Z, K]: a step's pages as one [n, Z, K] block, reshaped and zeroed in registers."""
    page_size, head_dim = k_ref.shape[1], k_ref.shape[2]
    span = pages_per_step * page_size

    def load(pre, i, kv_pos, kv_ok):
        pages = pages_ref[pl.ds(i * pages_per_step, pages_per_step)]  # [n]

        def read(ref):  # pages [n] -> the pages' rows one after the other, [W, ...]
            if pages_per_step == 1:
                return ref[pages[0]]
            x = ref[pages]
            return x.reshape(span, *x.shape[2:])

        # A page's slots past the sequence's end (or before the block's window) hold anything, stale or
        # NaN: zeroed, not only masked.
        kv_tile = jnp.broadcast_to(kv_ok[:, None], (span, head_dim))  # [W, K]
        k = jnp.where(kv_tile, read(k_ref).astype(compute_dtype), 0.0).astype(compute_dtype)
        v = jnp.where(kv_tile, read(v_ref).astype(compute_dtype), 0.0).astype(compute_dtype)
        if ks_ref is None:
            return k, v, None, None
        return k, v, jnp.where(kv_ok, read(ks_ref), 0.0), jnp.where(kv_ok, read(vs_ref), 0.0)

    return Gather(load)


def _row_gather(page_ids: Callable[[jax.Array, jax.Array], jax.Array], k_ref, v_ref, ks_ref, vs_ref, *,
                page_size: int, span: int, compute_dtype) -> Gather:
    """Pools [P Z, K]: each position's slot, page x Z + offset, gathered by a masked load.

    The mask keeps the load itself from reading past the span (no select in registers between the load
    and the dot); `page_ids(index [W], ok [W]) -> pages [W]` reads the page table where ok.
    """
    head_dim = k_ref.shape[1]
    cols = lax.broadcasted_iota(jnp.int32, (span, head_dim), 1)  # [W, K]

    def load(pages, i, kv_pos, kv_ok):
        slot = pages * page_size + kv_pos % page_size  # [W]
        kv_tile = jnp.broadcast_to(kv_ok[:, None], (span, head_dim))  # [W, K]
        k = plgpu.load(k_ref.at[slot[:, None], cols], mask=kv_tile, other=0.0).astype(compute_dtype)
        v = plgpu.load(v_ref.at[slot[:, None], cols], mask=kv_tile, other=0.0).astype(compute_dtype)
        if ks_ref is None:
            return k, v, None, None
        return (k, v, plgpu.load(ks_ref.at[slot], mask=kv_ok, other=0.0),
                plgpu.load(vs_ref.at[slot], mask=kv_ok, other=0.0))

    return Gather(load, lambda kv_pos, kv_ok: page_ids(kv_pos // page_size, kv_ok))


def _attend(q, q_pos, lo, hi, start, stop, gather: Gather, *, span: int, sm_scale: float, window: int | None,
            compute_dtype, precision):
    """Online softmax of the query tile over key steps [start, stop); positions outside [lo, hi) and past
    each row's own position (or before its window) are masked. Returns o [rows, K] (unnormalised) and the
    running max and sum [rows] in float32."""
    rows, head_dim = q.shape
    offs = lax.broadcasted_iota(jnp.int32, (span,), 0)  # [W]

    def span_of(i):
        kv_pos = i * span + offs  # [W]
        return kv_pos, (kv_pos >= lo) & (kv_pos < hi)

    def body(i, carry):
        (o, m, l), pre = carry[:3], carry[3:]  # [rows, K], [rows], [rows]; this step's prefetch, if any
        kv_pos, kv_ok = span_of(i)
        k, v, ks, vs = gather.load(*pre or (None,), i, kv_pos, kv_ok)  # [W, K], [W, K], [W], [W]
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * sm_scale  # [rows, W] f32
        if ks is not None:
            s = s * ks[None, :]
        see = (kv_pos[None, :] <= q_pos[:, None]) & kv_ok[None, :]  # [rows, W]
        if window is not None:
            see &= kv_pos[None, :] > q_pos[:, None] - window
        s = jnp.where(see, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))  # [rows]: -inf while a row has seen nothing
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m - m_safe)  # [rows]
        p = jnp.exp(s - m_safe[:, None])  # [rows, W]
        l = l * alpha + jnp.sum(p, axis=1)
        if vs is not None:
            p = p * vs[None, :]
        pv = plgpu.dot(p.astype(compute_dtype), v, precision=precision)  # [rows, K] f32
        if gather.prefetch is not None:
            pre = (gather.prefetch(*span_of(i + 1)),)
        return (o * alpha[:, None] + pv, m_new, l) + pre

    o = jnp.zeros((rows, head_dim), jnp.float32)
    m = jnp.full((rows,), -jnp.inf, jnp.float32)
    l = jnp.zeros((rows,), jnp.float32)
    pre = () if gather.prefetch is None else (gather.prefetch(*span_of(start)),)
    return lax.fori_loop(start, stop, body, (o, m, l) + pre)[:3]


def _store(o, m, l, o_ref, lse_ref, row: jax.Array, row_ok: jax.Array) -> None:
    """Writes the normalised output rows (and their log-sum-exp) at `row`; a row that saw nothing (an
    empty split) has l == 0 and yields zeros (lse -inf)."""
    rows, head_dim = o.shape
    o = o / jnp.where(l > 0, l, 1.0)[:, None]
    tile_ok = jnp.broadcast_to(row_ok[:, None], (rows, head_dim))  # [rows, K]
    plgpu.store(o_ref.at[pl.ds(row, rows), :], o.astype(o_ref.dtype), mask=tile_ok)
    if lse_ref is not None:
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)  # [rows]
        plgpu.store(lse_ref.at[pl.ds(row, rows)], lse, mask=row_ok)


def _block_kernel(
    row0_ref,  # [] int32: the block's first row (in the sorted order)
    nrows_ref,  # [] int32: its rows, 0..Q
    lo_ref,  # [] int32: the first position any of its rows sees
    hi_ref,  # [] int32: one past the last
    pages_ref,  # [M] int32: its sequence's page-table row
    q_ref,  # [(T+Q) R', K]
    pos_ref,  # [(T+Q) R'] int32: each query row's position
    k_ref,  # [P, Z, K] ("pages") or [P Z, K] ("rows")
    v_ref,  # like k_ref
    *refs: Any,  # k_scale, v_scale [P, Z] or [P Z] if fp8; then o [(T+Q) R', K] (and lse [(T+Q) R'] with splits)
    sm_scale: float,
    window: int | None,
    rows: int,
    group: int,
    page_size: int,
    num_splits: int,
    pages_per_step: int,
    gather: str,
    fp8: bool,
    compute_dtype: jnp.dtype,
    precision: lax.Precision | None,
):
    ks_ref, vs_ref, o_ref, lse_ref = _unpack(refs, fp8, num_splits > 1)
    nrows = nrows_ref[...]
    split = pl.program_id(2)  # outside the `when`: the interpreter takes program ids at the top level only

    @pl.when(nrows > 0)  # blocks past the last exit at once
    def _():
        head_dim = q_ref.shape[1]
        r0 = row0_ref[...] * group  # the block's first query row
        row_ok = lax.broadcasted_iota(jnp.int32, (rows,), 0) < nrows * group  # [Q R']
        tile_ok = jnp.broadcast_to(row_ok[:, None], (rows, head_dim))  # [Q R', K]
        q = plgpu.load(q_ref.at[pl.ds(r0, rows), :], mask=tile_ok, other=0.0).astype(compute_dtype)  # [Q R', K]
        q_pos = plgpu.load(pos_ref.at[pl.ds(r0, rows)], mask=row_ok, other=-1)  # [Q R']
        lo, hi = lo_ref[...], hi_ref[...]
        span = pages_per_step * page_size
        start, stop = key_steps(lo, hi, span, split, num_splits)
        if gather == "pages":
            reads = _page_gather(pages_ref, k_ref, v_ref, ks_ref, vs_ref, pages_per_step=pages_per_step,
                                 compute_dtype=compute_dtype)
        else:
            reads = _row_gather(lambda index, ok: plgpu.load(pages_ref.at[index], mask=ok, other=0), k_ref, v_ref,
                                ks_ref, vs_ref, page_size=page_size, span=span, compute_dtype=compute_dtype)
        o, m, l = _attend(q, q_pos, lo, hi, start, stop, reads, span=span, sm_scale=sm_scale, window=window,
                          compute_dtype=compute_dtype, precision=precision)
        _store(o, m, l, o_ref, lse_ref, r0, row_ok)


def _decode_kernel(
    row0_ref,  # [] int32: the item's decode row (in the sorted order)
    seq_ref,  # [] int32: its sequence
    lo_ref,  # [] int32: the first position the row sees
    hi_ref,  # [] int32: one past the last
    part_ref,  # [] int32: which share of the row's key steps the item takes
    parts_ref,  # [] int32: the row's items; 0 for an item past the last
    table_ref,  # [S, M] int32: the page table
    q_ref,  # [(T+Q) R', K]
    pos_ref,  # [(T+Q) R'] int32
    k_ref,  # [P Z, K]
    v_ref,  # [P Z, K]
    *refs: Any,  # k_scale, v_scale [P Z] if fp8; then o [(I+E/R') R', K] f32, lse [(I+E/R') R'] f32
    sm_scale: float,
    window: int | None,
    rows: int,
    group: int,
    page_size: int,
    block_kv: int,
    fp8: bool,
    compute_dtype: jnp.dtype,
    precision: lax.Precision | None,
):
    ks_ref, vs_ref, o_ref, lse_ref = _unpack(refs, fp8, True)
    parts = parts_ref[...]
    out_row = pl.program_id(1) * group  # the item's rows in the outputs

    @pl.when(parts > 0)  # items past the last exit at once
    def _():
        head_dim = q_ref.shape[1]
        r0 = row0_ref[...] * group
        row_ok = lax.broadcasted_iota(jnp.int32, (rows,), 0) < group  # [E]: the row's R' heads
        tile_ok = jnp.broadcast_to(row_ok[:, None], (rows, head_dim))  # [E, K]
        q = plgpu.load(q_ref.at[pl.ds(r0, rows), :], mask=tile_ok, other=0.0).astype(compute_dtype)  # [E, K]
        q_pos = plgpu.load(pos_ref.at[pl.ds(r0, rows)], mask=row_ok, other=-1)  # [E]
        lo, hi = lo_ref[...], hi_ref[...]
        start, stop = key_steps(lo, hi, block_kv, part_ref[...], parts)
        seq = seq_ref[...]
        reads = _row_gather(lambda index, ok: plgpu.load(table_ref.at[seq, index], mask=ok, other=0), k_ref, v_ref,
                            ks_ref, vs_ref, page_size=page_size, span=block_kv, compute_dtype=compute_dtype)
        o, m, l = _attend(q, q_pos, lo, hi, start, stop, reads, span=block_kv, sm_scale=sm_scale, window=window,
                          compute_dtype=compute_dtype, precision=precision)
        _store(o, m, l, o_ref, lse_ref, out_row, row_ok)


def _unpack(refs, fp8: bool, with_lse: bool):
    """(k_scale, v_scale, o, lse) from a kernel's trailing refs; None where absent."""
    ks_ref, vs_ref, *out_refs = refs if fp8 else (None, None, *refs)
    return ks_ref, vs_ref, out_refs[0], out_refs[1] if with_lse else None


def _searchsorted(sorted_: jax.Array, x: jax.Array) -> jax.Array:
    # One comparison per pair: the arrays are small, and a scan would be a loop on the device.
    return jnp.searchsorted(sorted_, x, side="right", method="compare_all").astype(jnp.int32)


def blocks(seq_ids: jax.Array, positions: jax.Array, context_lens: jax.Array, block_q: int,
           window: int | None, limit: int | None = None, decode: bool = False) -> dict[str, Any]:
    """The rows' order by sequence and the program blocks over it: per block its sequence, first row,
    row count and the span of positions its rows see (at most `limit`, the positions a page-table row
    holds). N = ceil(T / Q) + min(S, T) bounds the blocks of any mix (each sequence's last block may be
    partial); blocks past the last are empty.

    With `decode`, sequences with one row of the step take no block; "decode" holds those rows, D =
    min(S, T) of them at most (their sequence, sorted row, span, "live", how many there are, and
    "index", each caller row's decode row or -1), and the blocks are then bounded by
    ceil(T / Q) + min(S, T // 2), none when T < 2. "inverse" is each caller row's place in the order."""
    # seq_ids/positions: [T], context_lens: [S]
    num_rows, num_seqs = seq_ids.shape[0], context_lens.shape[0]
    key = jnp.where(seq_ids >= 0, seq_ids, num_seqs).astype(jnp.int32)  # padding rows last
    order = jnp.argsort(key, stable=True)  # [T]
    seq, pos = key[order], positions.astype(jnp.int32)[order]  # [T]
    counts = jnp.zeros((num_seqs + 1,), jnp.int32).at[seq].add(1)[:num_seqs]  # [S]
    starts = jnp.cumsum(counts) - counts  # [S]: first sorted row of each sequence
    lens = context_lens.astype(jnp.int32) if limit is None else jnp.minimum(context_lens, limit).astype(jnp.int32)
    alone = (counts == 1) if decode else jnp.zeros((num_seqs,), bool)  # [S]
    per_seq = jnp.where(alone, 0, -(-counts // block_q))  # [S]
    ends = jnp.cumsum(per_seq)  # [S]
    num_blocks = -(-num_rows // block_q) + min(num_seqs, num_rows // 2 if decode else num_rows)
    if decode and num_rows < 2:
        num_blocks = 0
    b = jnp.arange(num_blocks, dtype=jnp.int32)
    s = jnp.minimum(_searchsorted(ends, b), num_seqs - 1)  # [N]
    j = b - (ends[s] - per_seq[s])  # [N]: the block's index within its sequence
    nrows = jnp.where(b < ends[-1], jnp.clip(counts[s] - j * block_q, 0, block_q), 0)
    row0 = starts[s] + j * block_q
    # Each live row's block, for the span of positions its block must read.
    s_row = jnp.minimum(seq, num_seqs - 1)
    live = (seq < num_seqs) & ~alone[s_row]
    row_block = jnp.where(live, ends[s_row] - per_seq[s_row] + (jnp.arange(num_rows) - starts[s_row]) // block_q,
                          num_blocks)
    hi = jnp.zeros((num_blocks,), jnp.int32).at[row_block].max(pos + 1, mode="drop")
    hi = jnp.where(nrows > 0, jnp.minimum(hi, lens[s]), 0)
    lo = jnp.zeros((num_blocks,), jnp.int32)
    if window is not None:
        low = jnp.full((num_blocks,), jnp.iinfo(jnp.int32).max, jnp.int32).at[row_block].min(pos, mode="drop")
        lo = jnp.where(nrows > 0, jnp.maximum(low - window + 1, 0), 0)
    inverse = jnp.zeros((num_rows,), jnp.int32).at[order].set(jnp.arange(num_rows, dtype=jnp.int32))  # [T]
    out = dict(order=order, inverse=inverse, positions=pos, seq=s, row0=row0, nrows=nrows, lo=lo, hi=hi)
    if decode:
        alone_ends = jnp.cumsum(alone.astype(jnp.int32))  # [S]
        d = jnp.arange(min(num_seqs, num_rows), dtype=jnp.int32)
        ds = jnp.minimum(_searchsorted(alone_ends, d), num_seqs - 1)  # [D]: the d-th such sequence
        d_live = d < alone_ends[-1]
        d_row = jnp.where(d_live, starts[ds], num_rows)  # [D]; past the rows when there is none
        d_pos = pos[jnp.minimum(d_row, num_rows - 1)]
        d_hi = jnp.where(d_live, jnp.minimum(d_pos + 1, lens[ds]), 0)
        d_lo = jnp.zeros_like(d_hi) if window is None else jnp.where(d_live, jnp.maximum(d_pos - window + 1, 0), 0)
        caller = jnp.minimum(seq_ids, num_seqs - 1)  # [T]
        index = jnp.where((seq_ids >= 0) & alone[caller], alone_ends[caller] - 1, -1)  # [T]
        out["decode"] = dict(seq=ds, row0=d_row, lo=d_lo, hi=d_hi, live=alone_ends[-1], index=index)
    return out


def decode_items(decode: dict[str, Any], *, num_items: int, num_splits: int, wave: int, kv_heads: int,
                 span: int) -> dict[str, jax.Array]:
    """Cuts the live decode rows into at most `num_items` work items, the same number of splits for every
    row (fewer for a row of few key steps): the fewest splits whose programs (items x `kv_heads`) come
    within _FILL of the best fill of whole waves of `wave` programs, as
    `pallas_kernels.decode_attention.default_config` picks them for a whole batch, here from the rows
    actually present. Per item: its row's fields, `part` and `parts` (0 past the last item); per row:
    `row_first`, its first item, and `row_parts`."""
    num_rows = decode["hi"].shape[0]
    steps = jnp.maximum(-(-decode["hi"] // span) - decode["lo"] // span, 0)  # [D]
    live = jnp.maximum(decode["live"], 1)
    n = jnp.arange(1, num_splits + 1, dtype=jnp.int32)  # [J]
    programs = live * kv_heads * n
    fill = programs / (-(-programs // wave) * wave)  # [J]
    fill = jnp.where((n <= jnp.maximum(jnp.max(steps) // 2, 1)) & (live * n <= num_items), fill, 0.0)
    splits = jnp.min(jnp.where(fill >= _FILL * jnp.max(fill), n, num_splits))
    # A split shorter than two steps costs more in partials than it saves.
    parts = jnp.where(jnp.arange(num_rows) < decode["live"], jnp.clip(jnp.minimum(splits, steps // 2), 1, None), 0)
    ends = jnp.cumsum(parts)  # [D]
    w = jnp.arange(num_items, dtype=jnp.int32)
    row = jnp.minimum(_searchsorted(ends, w), num_rows - 1)  # [I]
    first = ends - parts  # [D]
    item = {name: decode[name][row] for name in ("seq", "row0", "lo", "hi")}
    return dict(item, part=w - first[row], parts=jnp.where(w < ends[-1], parts[row], 0), row_first=first,
                row_parts=parts)


@functools.partial(jax.jit, static_argnames=("sm_scale", "window", "config", "interpret"))
def paged_attention(
    q: jax.Array,  # [T, Hq, K]
    k_pages: jax.Array,  # [P, Z, Hkv, K]
    v_pages: jax.Array,  # [P, Z, Hkv, K]
    page_table: jax.Array,  # [S, M]
    seq_ids: jax.Array,  # [T]
    positions: jax.Array,  # [T]
    context_lens: jax.Array,  # [S]
    *,
    k_scale: jax.Array | None = None,  # [P, Z, Hkv]
    v_scale: jax.Array | None = None,  # [P, Z, Hkv]
    sm_scale: float,
    window: int | None,
    config: PagedAttentionConfig,
    interpret: bool = False,
) -> jax.Array:  # [T, Hq, K]
    """Expects inputs already checked by the public wrapper."""
    num_rows, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    heads = query_heads_padded(group)
    block_q = max(config.block_q, -(-_MIN_ROWS // heads))  # a tile of at least 16 query rows
    fp8 = k_pages.dtype == jnp.float8_e4m3fn
    if fp8:
        compute_dtype = jnp.float32 if q.dtype == jnp.float32 else _FP8_COMPUTE_DTYPE
    else:
        compute_dtype = jnp.promote_types(q.dtype, k_pages.dtype)
    # Triton's default f32 dot rounds inputs to tf32; f32 callers asked for f32.
    precision = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None
    if fp8:
        k_scale, v_scale = k_scale.astype(jnp.float32), v_scale.astype(jnp.float32)

    meta = blocks(seq_ids, positions, context_lens, block_q, window, limit=page_table.shape[1] * page_size,
                  decode=config.decode is not None)
    span = (num_rows + block_q) * heads  # query rows, a block's worth of slack past the last
    qs = q[meta["order"]].reshape(num_rows, num_kv_heads, group, head_dim)  # [T, Hkv, R, K]
    qs = jnp.pad(qs, ((0, block_q), (0, 0), (0, heads - group), (0, 0)))  # [T+Q, Hkv, R', K]
    qs = qs.transpose(1, 0, 2, 3).reshape(num_kv_heads, span, head_dim)  # [Hkv, (T+Q) R', K]
    q_pos = jnp.repeat(jnp.pad(meta["positions"], (0, block_q), constant_values=-1), heads)  # [(T+Q) R']
    kernel_args = dict(sm_scale=sm_scale, window=window, fp8=fp8, compute_dtype=compute_dtype, precision=precision)

    def pool_args(h_axis: int, by_row: bool) -> tuple[list, list]:
        """The pools (and scales) as refs of one KV head, grid axis `h_axis`: [P, Z, K], or [P Z, K] to
        gather slot by slot (a free reshape of the pool)."""
        arrays = [k_pages, v_pages] + ([k_scale, v_scale] if fp8 else [])
        if by_row:
            arrays = [a.reshape(num_pages * page_size, *a.shape[2:]) for a in arrays]
            pool = pl.BlockSpec((num_pages * page_size, None, head_dim), lambda *g: (0, g[h_axis], 0))
            scale = pl.BlockSpec((num_pages * page_size, None), lambda *g: (0, g[h_axis]))
        else:
            pool = pl.BlockSpec((num_pages, page_size, None, head_dim), lambda *g: (0, 0, g[h_axis], 0))
            scale = pl.BlockSpec((num_pages, page_size, None), lambda *g: (0, 0, g[h_axis]))
        return [pool, pool] + [scale] * (len(arrays) - 2), arrays

    out = jnp.zeros((num_rows, num_q_heads, head_dim), q.dtype)  # sorted rows
    if meta["nrows"].shape[0] and config.kernel == "mosaic":
        rows = mosaic.block_launch(meta, qs, q_pos, page_table, pool_args(1, True)[1], heads=heads, block_q=block_q,
                                   num_splits=config.num_splits, page_size=page_size,
                                   block_kv=config.pages_per_step * page_size, stages=config.num_stages,
                                   sm_scale=sm_scale, window=window, interpret=interpret)
        out = _unsort_heads(rows, group, num_rows).astype(out.dtype)
    elif meta["nrows"].shape[0]:
        out = _block_launch(meta, qs, q_pos, page_table, pool_args(1, config.gather == "rows"), config, group=group,
                            heads=heads, block_q=block_q, page_size=page_size, interpret=interpret, **kernel_args)
    out = out[meta["inverse"]]  # back in the caller's order
    if config.decode is not None:
        dec = _decode_launch(meta["decode"], qs, q_pos, page_table, pool_args(0, True), config.decode, group=group,
                             heads=heads, page_size=page_size, interpret=interpret, **kernel_args)
        index = meta["decode"]["index"]  # [T]
        out = jnp.where(index[:, None, None] >= 0, dec[jnp.maximum(index, 0)].astype(out.dtype), out)
    # Padding rows belong to no block: their output is whatever the buffer held.
    return jnp.where(seq_ids[:, None, None] >= 0, out, 0).astype(q.dtype)


def _block_launch(meta, qs, q_pos, page_table, pools, config: PagedAttentionConfig, *, group: int, heads: int,
                  block_q: int, page_size: int, interpret: bool, **kernel_args) -> jax.Array:
    """The block launch, grid (N, Hkv, J): the outputs of the rows in blocks, [T, Hq, K] in the sorted order
    (other rows hold anything)."""
    num_kv_heads, span, head_dim = qs.shape
    num_rows = span // heads - block_q
    splits = config.num_splits
    step = config.pages_per_step
    # Whole steps of pages: the table padded with the null page, whose slots lie past every length.
    block_pages = page_table.astype(jnp.int32)[meta["seq"]]  # [N, M]
    block_pages = jnp.pad(block_pages, ((0, 0), (0, -block_pages.shape[1] % step)))
    num_blocks, pages_per_seq = block_pages.shape
    scalar = pl.BlockSpec((None,), lambda b, h, j: (b,))
    pool_specs, pool_arrays = pools
    in_specs = [scalar] * 4 + [
        pl.BlockSpec((None, pages_per_seq), lambda b, h, j: (b, 0)),
        pl.BlockSpec((None, span, head_dim), lambda b, h, j: (h, 0, 0)),
        pl.BlockSpec((span,), lambda b, h, j: (0,)),
    ] + pool_specs
    args = [meta["row0"], meta["nrows"], meta["lo"], meta["hi"], block_pages, qs, q_pos] + pool_arrays
    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct((num_kv_heads, span, head_dim), qs.dtype)]
        out_specs = [pl.BlockSpec((None, span, head_dim), lambda b, h, j: (h, 0, 0))]
    else:
        out_shape = [jax.ShapeDtypeStruct((splits, num_kv_heads, span, head_dim), jnp.float32),
                     jax.ShapeDtypeStruct((splits, num_kv_heads, span), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, span, head_dim), lambda b, h, j: (j, h, 0, 0)),
                     pl.BlockSpec((None, None, span), lambda b, h, j: (j, h, 0))]
    kernel = functools.partial(_block_kernel, rows=block_q * heads, group=heads, page_size=page_size,
                               num_splits=splits, pages_per_step=step, gather=config.gather, **kernel_args)
    outs = pl.pallas_call(
        kernel,
        grid=(num_blocks, num_kv_heads, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="jaxfire_paged_attention",
    )(*args)
    out = outs[0] if splits == 1 else combine(*outs)  # [Hkv, (T+Q) R', K]
    return _unsort_heads(out, group, num_rows)


def _unsort_heads(out: jax.Array, group: int, num_rows: int) -> jax.Array:
    """[Hkv, (T+Q) R', K] query rows by KV head -> [T, Hq, K] (the R' - R padding heads and the Q slack
    rows dropped)."""
    num_kv_heads, span, head_dim = out.shape
    heads = query_heads_padded(group)
    out = out.reshape(num_kv_heads, span // heads, heads, head_dim)[:, :num_rows, :group]
    return out.transpose(1, 0, 2, 3).reshape(num_rows, num_kv_heads * group, head_dim)


def _decode_launch(decode, qs, q_pos, page_table, pools, dc: DecodeConfig, *, group: int, heads: int,
                   page_size: int, interpret: bool, **kernel_args) -> jax.Array:
    """The decode launch, grid (Hkv, I): the decode rows' outputs [D, Hq, K] f32 (rows past the last hold
    anything)."""
    num_kv_heads, _, head_dim = qs.shape
    num_decode = decode["hi"].shape[0]
    tile = max(_MIN_ROWS, heads)  # E query rows: one row's R' heads, padded
    span = dc.block_kv
    num_items = min(num_decode * dc.num_splits, num_decode + -(-dc.wave // num_kv_heads))
    items = decode_items(decode, num_items=num_items, num_splits=dc.num_splits, wave=dc.wave,
                         kv_heads=num_kv_heads, span=span)
    if dc.kernel == "mosaic":
        o, lse = mosaic.decode_launch(items, qs, page_table, pools[1], heads=heads, page_size=page_size,
                                      block_kv=span, stages=dc.num_stages, sm_scale=kernel_args["sm_scale"],
                                      interpret=interpret)
    else:
        o, lse = _decode_pallas_call(items, qs, q_pos, page_table, pools, dc, num_items=num_items, tile=tile,
                                     heads=heads, page_size=page_size, interpret=interpret, **kernel_args)
    # Each row's items, [D, J]: past a row's own items the index repeats its last (never one that was
    # not written) and the split is masked out.
    k = jnp.arange(dc.num_splits)
    parts = items["row_parts"][:, None]
    index = items["row_first"][:, None] + jnp.minimum(k[None, :], jnp.maximum(parts - 1, 0))  # [D, J]
    valid = k[None, :] < parts  # [D, J]
    o = o[:, :num_items * heads].reshape(num_kv_heads, num_items, heads, head_dim)[:, index]  # [Hkv, D, J, R', K]
    lse = lse[:, :num_items * heads].reshape(num_kv_heads, num_items, heads)[:, index]  # [Hkv, D, J, R']
    lse = jnp.where(valid[None, :, :, None], lse, -jnp.inf)
    o = jnp.where(valid[None, :, :, None, None], o, 0.0)
    out = combine(o, lse, axis=2)[:, :, :group]  # [Hkv, D, R, K]
    return out.transpose(1, 0, 2, 3).reshape(num_decode, num_kv_heads * group, head_dim)  # [D, Hq, K]


def _decode_pallas_call(items, qs, q_pos, page_table, pools, dc: DecodeConfig, *, num_items: int, tile: int,
                        heads: int, page_size: int, interpret: bool, **kernel_args) -> tuple[jax.Array, jax.Array]:
    """The Triton decode launch: (o [Hkv, rows, K], lse [Hkv, rows]) f32, item w's R' rows from w R'."""
    num_kv_heads, _, head_dim = qs.shape
    out_rows = (num_items + tile // heads) * heads  # the items' query rows, a tile's worth of slack
    scalar = pl.BlockSpec((None,), lambda h, w: (w,))
    pool_specs, pool_arrays = pools
    in_specs = [scalar] * 6 + [
        pl.BlockSpec(page_table.shape, lambda h, w: (0, 0)),
        pl.BlockSpec((None,) + qs.shape[1:], lambda h, w: (h, 0, 0)),
        pl.BlockSpec(q_pos.shape, lambda h, w: (0,)),
    ] + pool_specs
    args = [items["row0"], items["seq"], items["lo"], items["hi"], items["part"], items["parts"],
            page_table.astype(jnp.int32), qs, q_pos] + pool_arrays
    kernel = functools.partial(_decode_kernel, rows=tile, group=heads, page_size=page_size, block_kv=dc.block_kv,
                               **kernel_args)
    return pl.pallas_call(
        kernel,
        grid=(num_kv_heads, num_items),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, out_rows, head_dim), lambda h, w: (h, 0, 0)),
                   pl.BlockSpec((None, out_rows), lambda h, w: (h, 0))],
        out_shape=[jax.ShapeDtypeStruct((num_kv_heads, out_rows, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct((num_kv_heads, out_rows), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=dc.num_warps, num_stages=dc.num_stages),
        interpret=interpret,
        name="jaxfire_paged_attention_decode",
    )(*args)
