# T token rows, S sequences (page-table rows), M pages per sequence, P pages in the pool, Z page size,
# Hq query heads, Hkv key/value heads, R = Hq // Hkv (R' padded to a power of two), K head dim,
# Q = block_q token rows per program, N program blocks, J splits, D decode rows (at most min(S, T)),
# I decode work items, E = max(16, R') decode tile rows.
"""The host side of ragged paged attention, shared by its kernels: the rows' order by sequence and the
program blocks over it (`blocks`), the decode rows' work items (`decode_items`), and the flow around
the two launches (`jit`): the queries sorted and grouped by KV head, the block launch, the decode
launch, the merge of splits and items, and the rows put back in the caller's order.

A backend brings the two kernel calls (`Launches`): the Pallas Triton kernel (`triton.py`) and the
kernel written in Triton itself (`triton_jit.py`) share everything else, and both take the Mosaic GPU
launches (`mosaic.py`) where a config asks for them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.paged_attention import mosaic
from pallas_kernels.paged_attention.config import DecodeConfig, PagedAttentionConfig, query_heads_padded
from pallas_kernels.splits import combine

# What an fp8 pool is widened to: e4m3 -> f16 is exact, and f16 keeps more bits of q and of the
# probabilities than bf16 (as in pallas_kernels.decode_attention).
_FP8_COMPUTE_DTYPE = jnp.float16
# The smallest M of a tensor-core dot: the decode launch's tile rows.
_MIN_ROWS = 16
# A split whose fill of the machine's waves is within this share of the best is as good.
_FILL = 0.95


class Launches(NamedTuple):
    """A backend's two kernel calls. Both take the sorted queries qs [Hkv, (T+Q) R', K], their positions
    q_pos [(T+Q) R'], the page table [S, M] int32 and the pools [k, v] [P, Z, Hkv, K] (and an fp8 pool's
    float32 scales [k, v] [P, Z, Hkv]), and the keywords sm_scale, window, fp8, compute_dtype, precision,
    heads (R'), page_size and interpret.

    block(meta, qs, q_pos, page_table, pools, config, *, block_q, ...) -> [o [Hkv, (T+Q) R', K]] in q's
        dtype, or with J splits [o [J, Hkv, (T+Q) R', K], lse [J, Hkv, (T+Q) R']] float32: the rows of
        `blocks`' blocks, grid (N, Hkv, J) (other rows hold anything).
    decode(items, qs, q_pos, page_table, pools, decode_config, *, num_items, tile, out_rows, ...) -> (o [Hkv,
        X, K], lse [Hkv, X]) float32, X = out_rows: item w's R' rows from row w R' (rows of items past the
        last hold anything), grid (Hkv, I).
    """

    block: Callable[..., list[jax.Array]]
    decode: Callable[..., tuple[jax.Array, jax.Array]]


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


def jit(launches: Launches) -> Callable[..., jax.Array]:
    """`paged_attention(q, k_pages, v_pages, page_table, seq_ids, positions, context_lens, *, k_scale,
    v_scale, sm_scale, window, config, interpret)` jitted over a backend's launches."""
    return jax.jit(functools.partial(_paged_attention, launches=launches),
                   static_argnames=("sm_scale", "window", "config", "interpret"))


def _paged_attention(
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
    launches: Launches,
) -> jax.Array:  # [T, Hq, K]
    """Expects inputs already checked by the public wrapper."""
    num_rows, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_pages.shape[1:3]
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

    pools = [k_pages, v_pages] + ([k_scale, v_scale] if fp8 else [])
    launch_args = dict(kernel_args, heads=heads, page_size=page_size, interpret=interpret)

    out = jnp.zeros((num_rows, num_q_heads, head_dim), q.dtype)  # sorted rows
    if meta["nrows"].shape[0] and config.kernel == "mosaic":
        rows = mosaic.block_launch(meta, qs, q_pos, page_table, by_slot(pools), heads=heads, block_q=block_q,
                                   num_splits=config.num_splits, page_size=page_size,
                                   block_kv=config.pages_per_step * page_size, stages=config.num_stages,
                                   sm_scale=sm_scale, window=window, interpret=interpret)
        out = _unsort_heads(rows, group, num_rows).astype(out.dtype)
    elif meta["nrows"].shape[0]:
        outs = launches.block(meta, qs, q_pos, page_table, pools, config, block_q=block_q, **launch_args)
        out = outs[0] if config.num_splits == 1 else combine(*outs)  # [Hkv, (T+Q) R', K]
        out = _unsort_heads(out, group, num_rows)
    out = out[meta["inverse"]]  # back in the caller's order
    if config.decode is not None:
        dec = _decode_launch(meta["decode"], qs, q_pos, page_table, pools, config.decode, launches.decode,
                             group=group, **launch_args)
        index = meta["decode"]["index"]  # [T]
        out = jnp.where(index[:, None, None] >= 0, dec[jnp.maximum(index, 0)].astype(out.dtype), out)
    # Padding rows belong to no block: their output is whatever the buffer held.
    return jnp.where(seq_ids[:, None, None] >= 0, out, 0).astype(q.dtype)


def _unsort_heads(out: jax.Array, group: int, num_rows: int) -> jax.Array:
    """[Hkv, (T+Q) R', K] query rows by KV head -> [T, Hq, K] (the R' - R padding heads and the Q slack
    rows dropped)."""
    num_kv_heads, span, head_dim = out.shape
    heads = query_heads_padded(group)
    out = out.reshape(num_kv_heads, span // heads, heads, head_dim)[:, :num_rows, :group]
    return out.transpose(1, 0, 2, 3).reshape(num_rows, num_kv_heads * group, head_dim)


def _decode_launch(decode, qs, q_pos, page_table, pools, dc: DecodeConfig, launch: Callable, *, group: int,
                   heads: int, page_size: int, interpret: bool, **kernel_args) -> jax.Array:
    """The decode launch, grid (Hkv, I), `launch` or Mosaic GPU's: the decode rows' outputs [D, Hq, K] f32
    (rows past the last hold anything)."""
    num_kv_heads, _, head_dim = qs.shape
    num_decode = decode["hi"].shape[0]
    tile = max(_MIN_ROWS, heads)  # E query rows: one row's R' heads, padded
    span = dc.block_kv
    num_items = min(num_decode * dc.num_splits, num_decode + -(-dc.wave // num_kv_heads))
    items = decode_items(decode, num_items=num_items, num_splits=dc.num_splits, wave=dc.wave,
                         kv_heads=num_kv_heads, span=span)
    if dc.kernel == "mosaic":
        o, lse = mosaic.decode_launch(items, qs, page_table, by_slot(pools), heads=heads, page_size=page_size,
                                      block_kv=span, stages=dc.num_stages, sm_scale=kernel_args["sm_scale"],
                                      interpret=interpret)
    else:
        out_rows = (num_items + tile // heads) * heads  # the items' query rows, a tile's worth of slack
        o, lse = launch(items, qs, q_pos, page_table, pools, dc, num_items=num_items, tile=tile, out_rows=out_rows,
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


def by_slot(pools: list[jax.Array]) -> list[jax.Array]:
    """[P, Z, Hkv, ...] pools (and scales) -> [P Z, Hkv, ...], a row per slot (a free reshape)."""
    return [a.reshape(a.shape[0] * a.shape[1], *a.shape[2:]) for a in pools]
