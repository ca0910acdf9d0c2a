# T token rows, S sequences (page-table rows), M pages per sequence, P pages in the pool, Z page size,
# Hq query heads, Hkv key/value heads, R = Hq // Hkv (R' padded to a power of two), K head dim,
# Q = block_q token rows per program, N program blocks, J splits of a block's pages.
"""Ragged paged attention on the Pallas Triton backend.

The rows are ordered by sequence (a stable sort, undone on the way out) and cut into blocks of up
to Q rows of one sequence: a decode row is a block of one, a 1000-token prompt chunk a run of full
blocks, and a step mixing both has both. Grid (N, Hkv, J): each program takes one block's Q x R'
query rows of one KV head (every query head of the group shares the keys it loads), walks the
sequence's pages that any of its rows can see, one page per step, with the running max and sum in
float32, and masks each row to its own causal (and window) span. Page 0 of the pool and pages of
other sequences are never read: a program only follows its own sequence's page-table row. With
J > 1 splits each program takes a share of the pages and `combine` merges the partials.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_attention.config import PagedAttentionConfig, query_heads_padded

# What an fp8 pool is widened to: e4m3 -> f16 is exact, and f16 keeps more bits of q and of the
# probabilities than bf16 (as in pallas_kernels.decode_attention).
_FP8_COMPUTE_DTYPE = jnp.float16


def _kernel(
    row0_ref,  # [] int32: the block's first row (in the sorted order)
    nrows_ref,  # [] int32: its rows, 0..Q
    lo_ref,  # [] int32: the first position any of its rows sees
    hi_ref,  # [] int32: one past the last
    pages_ref,  # [M] int32: its sequence's page-table row
    q_ref,  # [(T+Q) R', K]
    pos_ref,  # [(T+Q) R'] int32: each query row's position
    k_ref,  # [P, Z, K]
    v_ref,  # [P, Z, K]
    *refs: Any,  # k_scale, v_scale [P, Z] if fp8; then o [(T+Q) R', K] (and lse [(T+Q) R'] with splits)
    sm_scale: float,
    window: int | None,
    rows: int,
    group: int,
    num_splits: int,
    pages_per_step: int,
    fp8: bool,
    compute_dtype: jnp.dtype,
    precision: lax.Precision | None,
):
    if fp8:
        ks_ref, vs_ref, *out_refs = refs
    else:
        ks_ref = vs_ref = None
        out_refs = refs
    o_ref = out_refs[0]
    lse_ref = out_refs[1] if num_splits > 1 else None
    page_size, head_dim = k_ref.shape[1], k_ref.shape[2]
    r0 = row0_ref[...] * group  # the block's first query row
    live = nrows_ref[...] * group  # its query rows
    row_ok = lax.broadcasted_iota(jnp.int32, (rows,), 0) < live  # [Q R']
    tile_ok = jnp.broadcast_to(row_ok[:, None], (rows, head_dim))  # [Q R', K]
    q = plgpu.load(q_ref.at[pl.ds(r0, rows), :], mask=tile_ok, other=0.0).astype(compute_dtype)  # [Q R', K]
    q_pos = plgpu.load(pos_ref.at[pl.ds(r0, rows)], mask=row_ok, other=-1)  # [Q R']
    lo, hi = lo_ref[...], hi_ref[...]
    span = pages_per_step * page_size  # positions per step: W
    first = lo // span
    num_steps = jnp.maximum(pl.cdiv(hi, span) - first, 0)
    per_split = pl.cdiv(num_steps, num_splits)
    start = first + pl.program_id(2) * per_split
    stop = jnp.minimum(start + per_split, first + num_steps)
    offs = lax.broadcasted_iota(jnp.int32, (span,), 0)  # [W]

    def load(ref, pages):
        # pages [n] -> the pages' rows one after the other, [W, ...]
        if pages_per_step == 1:
            return ref[pages[0]]
        x = ref[pages]
        return x.reshape(span, *x.shape[2:])

    def body(i, carry):
        o, m, l = carry  # [Q R', K], [Q R'], [Q R']
        pages = pages_ref[pl.ds(i * pages_per_step, pages_per_step)]  # [n]
        kv_pos = i * span + offs  # [W]
        # A page's slots past the sequence's end (or before the block's window) hold anything, stale or
        # NaN: zeroed, not only masked.
        kv_ok = (kv_pos >= lo) & (kv_pos < hi)  # [W]
        kv_tile = jnp.broadcast_to(kv_ok[:, None], (span, head_dim))  # [W, K]
        k = jnp.where(kv_tile, load(k_ref, pages).astype(compute_dtype), 0.0).astype(compute_dtype)  # [W, K]
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * sm_scale  # [Q R', W] f32
        if fp8:
            s = s * jnp.where(kv_ok, load(ks_ref, pages), 0.0)[None, :]
        see = (kv_pos[None, :] <= q_pos[:, None]) & kv_ok[None, :]  # [Q R', W]
        if window is not None:
            see &= kv_pos[None, :] > q_pos[:, None] - window
        s = jnp.where(see, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))  # [Q R']: -inf while a row has seen nothing
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m - m_safe)  # [Q R']
        p = jnp.exp(s - m_safe[:, None])  # [Q R', W]
        l = l * alpha + jnp.sum(p, axis=1)
        if fp8:
            p = p * jnp.where(kv_ok, load(vs_ref, pages), 0.0)[None, :]
        v = jnp.where(kv_tile, load(v_ref, pages).astype(compute_dtype), 0.0).astype(compute_dtype)  # [W, K]
        pv = plgpu.dot(p.astype(compute_dtype), v, precision=precision)  # [Q R', K] f32
        return o * alpha[:, None] + pv, m_new, l

    o = jnp.zeros((rows, head_dim), jnp.float32)
    m = jnp.full((rows,), -jnp.inf, jnp.float32)
    l = jnp.zeros((rows,), jnp.float32)
    o, m, l = lax.fori_loop(start, stop, body, (o, m, l))
    # A row that sees nothing (an empty split) has l == 0 and yields zeros.
    o = o / jnp.where(l > 0, l, 1.0)[:, None]
    plgpu.store(o_ref.at[pl.ds(r0, rows), :], o.astype(o_ref.dtype), mask=tile_ok)
    if lse_ref is not None:
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)  # [Q R']
        plgpu.store(lse_ref.at[pl.ds(r0, rows)], lse, mask=row_ok)


def combine(
    o: jax.Array,  # [J, ...rows, K] f32, each split normalised on its own
    lse: jax.Array,  # [J, ...rows] f32, -inf for an empty split
) -> jax.Array:  # [...rows, K] f32
    top = jnp.max(lse, axis=0, keepdims=True)
    w = jnp.exp(lse - jnp.where(jnp.isfinite(top), top, 0.0))  # [J, ...rows]
    total = jnp.sum(w, axis=0)
    out = jnp.sum(w[..., None] * o, axis=0)
    return out / jnp.where(total > 0, total, 1.0)[..., None]


def blocks(seq_ids: jax.Array, positions: jax.Array, context_lens: jax.Array, block_q: int,
           window: int | None) -> dict[str, jax.Array]:
    """The rows' order by sequence and the program blocks over it: per block its sequence, first row,
    row count and the span of positions its rows see. N = ceil(T / Q) + min(S, T) bounds the blocks
    of any mix (each sequence's last block may be partial); blocks past the last are empty."""
    # seq_ids/positions: [T], context_lens: [S]
    num_rows, num_seqs = seq_ids.shape[0], context_lens.shape[0]
    key = jnp.where(seq_ids >= 0, seq_ids, num_seqs).astype(jnp.int32)  # padding rows last
    order = jnp.argsort(key, stable=True)  # [T]
    seq, pos = key[order], positions.astype(jnp.int32)[order]  # [T]
    counts = jnp.zeros((num_seqs + 1,), jnp.int32).at[seq].add(1)[:num_seqs]  # [S]
    starts = jnp.cumsum(counts) - counts  # [S]: first sorted row of each sequence
    per_seq = -(-counts // block_q)  # [S]
    ends = jnp.cumsum(per_seq)  # [S]
    num_blocks = -(-num_rows // block_q) + min(num_seqs, num_rows)
    b = jnp.arange(num_blocks, dtype=jnp.int32)
    s = jnp.minimum(jnp.searchsorted(ends, b, side="right"), num_seqs - 1).astype(jnp.int32)  # [N]
    j = b - (ends[s] - per_seq[s])  # [N]: the block's index within its sequence
    nrows = jnp.where(b < ends[-1], jnp.clip(counts[s] - j * block_q, 0, block_q), 0)
    row0 = starts[s] + j * block_q
    # Each live row's block, for the span of positions its block must read.
    live = seq < num_seqs
    s_row = jnp.minimum(seq, num_seqs - 1)
    row_block = jnp.where(live, ends[s_row] - per_seq[s_row] + (jnp.arange(num_rows) - starts[s_row]) // block_q,
                          num_blocks)
    hi = jnp.zeros((num_blocks,), jnp.int32).at[row_block].max(pos + 1, mode="drop")
    hi = jnp.where(nrows > 0, jnp.minimum(hi, context_lens[s]), 0)
    lo = jnp.zeros((num_blocks,), jnp.int32)
    if window is not None:
        low = jnp.full((num_blocks,), jnp.iinfo(jnp.int32).max, jnp.int32).at[row_block].min(pos, mode="drop")
        lo = jnp.where(nrows > 0, jnp.maximum(low - window + 1, 0), 0)
    return dict(order=order, positions=pos, seq=s, row0=row0, nrows=nrows, lo=lo, hi=hi)


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
    block_q = max(config.block_q, -(-16 // heads))  # a tile of at least 16 query rows
    rows = block_q * heads
    splits = config.num_splits
    fp8 = k_pages.dtype == jnp.float8_e4m3fn
    if fp8:
        compute_dtype = jnp.float32 if q.dtype == jnp.float32 else _FP8_COMPUTE_DTYPE
    else:
        compute_dtype = jnp.promote_types(q.dtype, k_pages.dtype)
    # Triton's default f32 dot rounds inputs to tf32; f32 callers asked for f32.
    precision = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None

    meta = blocks(seq_ids, positions, context_lens, block_q, window)
    span = (num_rows + block_q) * heads  # query rows, a block's worth of slack past the last
    qs = q[meta["order"]].reshape(num_rows, num_kv_heads, group, head_dim)  # [T, Hkv, R, K]
    qs = jnp.pad(qs, ((0, block_q), (0, 0), (0, heads - group), (0, 0)))  # [T+Q, Hkv, R', K]
    qs = qs.transpose(1, 0, 2, 3).reshape(num_kv_heads, span, head_dim)  # [Hkv, (T+Q) R', K]
    q_pos = jnp.repeat(jnp.pad(meta["positions"], (0, block_q), constant_values=-1), heads)  # [(T+Q) R']
    step = config.pages_per_step
    # Whole steps of pages: the table padded with the null page, whose slots lie past every length.
    block_pages = page_table.astype(jnp.int32)[meta["seq"]]  # [N, M]
    block_pages = jnp.pad(block_pages, ((0, 0), (0, -block_pages.shape[1] % step)))
    num_blocks, pages_per_seq = block_pages.shape

    scalar = pl.BlockSpec((None,), lambda b, h, j: (b,))
    pool = pl.BlockSpec((num_pages, page_size, None, head_dim), lambda b, h, j: (0, 0, h, 0))
    in_specs = [scalar] * 4 + [
        pl.BlockSpec((None, pages_per_seq), lambda b, h, j: (b, 0)),
        pl.BlockSpec((None, span, head_dim), lambda b, h, j: (h, 0, 0)),
        pl.BlockSpec((span,), lambda b, h, j: (0,)),
        pool,
        pool,
    ]
    args = [meta["row0"], meta["nrows"], meta["lo"], meta["hi"], block_pages, qs, q_pos, k_pages, v_pages]
    if fp8:
        in_specs += [pl.BlockSpec((num_pages, page_size, None), lambda b, h, j: (0, 0, h))] * 2
        args += [k_scale.astype(jnp.float32), v_scale.astype(jnp.float32)]
    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct((num_kv_heads, span, head_dim), q.dtype)]
        out_specs = [pl.BlockSpec((None, span, head_dim), lambda b, h, j: (h, 0, 0))]
    else:
        out_shape = [jax.ShapeDtypeStruct((splits, num_kv_heads, span, head_dim), jnp.float32),
                     jax.ShapeDtypeStruct((splits, num_kv_heads, span), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, span, head_dim), lambda b, h, j: (j, h, 0, 0)),
                     pl.BlockSpec((None, None, span), lambda b, h, j: (j, h, 0))]
    kernel = functools.partial(_kernel, sm_scale=sm_scale, window=window, rows=rows, group=heads,
                               num_splits=splits, pages_per_step=step, fp8=fp8, compute_dtype=compute_dtype, precision=precision)
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
    out = out.reshape(num_kv_heads, num_rows + block_q, heads, head_dim)[:, :num_rows, :group]
    out = out.transpose(1, 0, 2, 3).reshape(num_rows, num_q_heads, head_dim)  # sorted rows
    out = jnp.zeros_like(out).at[meta["order"]].set(out)  # back in the caller's order
    # Padding rows belong to no block: their output is whatever the buffer held.
    return jnp.where(seq_ids[:, None, None] >= 0, out, 0).astype(q.dtype)
