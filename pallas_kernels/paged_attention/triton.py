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
present (`plan.decode_items`), so the grid is sized for the worst case and items past the last exit
at once; `combine` merges each row's items.

Page 0 of the pool and pages of other sequences are never read: a program only follows its own
sequence's page-table row. Nothing past a row's span reaches it: "pages" gathers zero such slots in
registers, "rows" gathers never load them.

This file holds the kernels and their two `pallas_call`s; the rows' order, the blocks, the decode items
and the flow around the launches are `plan.py`'s, which `triton_jit.py` (the same kernel written in
Triton itself) shares.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_attention import plan
from pallas_kernels.paged_attention.config import DecodeConfig, PagedAttentionConfig
from pallas_kernels.paged_attention.steps import key_steps


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


def _pool_specs(pools: list[jax.Array], h_axis: int, by_row: bool) -> tuple[list, list]:
    """The pools (and scales) as refs of one KV head, grid axis `h_axis`: [P, Z, K], or [P Z, K] to gather
    slot by slot (a free reshape of the pool)."""
    num_pages, page_size, _, head_dim = pools[0].shape
    if by_row:
        pools = plan.by_slot(pools)
        pool = pl.BlockSpec((num_pages * page_size, None, head_dim), lambda *g: (0, g[h_axis], 0))
        scale = pl.BlockSpec((num_pages * page_size, None), lambda *g: (0, g[h_axis]))
    else:
        pool = pl.BlockSpec((num_pages, page_size, None, head_dim), lambda *g: (0, 0, g[h_axis], 0))
        scale = pl.BlockSpec((num_pages, page_size, None), lambda *g: (0, 0, g[h_axis]))
    return [pool, pool] + [scale] * (len(pools) - 2), pools


def _block_call(meta, qs, q_pos, page_table, pools, config: PagedAttentionConfig, *, heads: int, block_q: int,
                page_size: int, interpret: bool, **kernel_args) -> list[jax.Array]:
    """The block launch, grid (N, Hkv, J) (`plan.Launches.block`)."""
    num_kv_heads, span, head_dim = qs.shape
    splits = config.num_splits
    step = config.pages_per_step
    # Whole steps of pages: the table padded with the null page, whose slots lie past every length.
    block_pages = page_table.astype(jnp.int32)[meta["seq"]]  # [N, M]
    block_pages = jnp.pad(block_pages, ((0, 0), (0, -block_pages.shape[1] % step)))
    num_blocks, pages_per_seq = block_pages.shape
    scalar = pl.BlockSpec((None,), lambda b, h, j: (b,))
    pool_specs, pool_arrays = _pool_specs(pools, 1, config.gather == "rows")
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
    return pl.pallas_call(
        kernel,
        grid=(num_blocks, num_kv_heads, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="jaxfire_paged_attention",
    )(*args)


def _decode_call(items, qs, q_pos, page_table, pools, dc: DecodeConfig, *, num_items: int, tile: int, out_rows: int,
                 heads: int, page_size: int, interpret: bool, **kernel_args) -> tuple[jax.Array, jax.Array]:
    """The decode launch, grid (Hkv, I) (`plan.Launches.decode`)."""
    num_kv_heads, _, head_dim = qs.shape
    scalar = pl.BlockSpec((None,), lambda h, w: (w,))
    pool_specs, pool_arrays = _pool_specs(pools, 0, True)
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


paged_attention = plan.jit(plan.Launches(block=_block_call, decode=_decode_call))
