# Hkv key/value heads, K head dim, Z page size, P pages, S sequences (page-table rows), M pages per
# sequence, I work items, R' query heads of one KV head (padded to a power of two), W positions a loop
# step reads (`block_kv`), G = 64 tile rows (one warpgroup's wgmma tile), X output rows an item stores, N
# blocks, T token rows of a step, Q rows a block.
"""The paged attention's launches on Mosaic GPU: one warpgroup per (KV head, work item).

A work item is a 64-row query tile and a share of its span's key steps. The decode launch's tile is
one decode row's R' heads (then whatever rows follow: their results are never stored), its items the
shares `plan.decode_items` cuts the rows into; the block launch's tile is one block's Q x R' rows,
gathered into a tile of their own, each row masked at its own position. The program TMA-loads its
query tile, then walks its key steps: each step's W positions are the pages (or the part of a page)
that hold them, each a [Z, K] box of one KV head copied by TMA from the pool into a
`num_stages`-deep shared-memory ring, so the next steps' pages stream in while one is used. The
logits [G, W] and the output [G, K] are wgmma tiles with float32 accumulators; the online softmax
runs in registers. The output rows and the tile's log-sum-exp go back by TMA, and the items of a
row are merged by their log-sum-exp.

An FP8 (e4m3) pool comes with one float32 scale per token and head, [P Z, Hkv]: each step's [Z, Hkv]
scale boxes ride in the ring beside the pages, and the key and value tiles are dequantized in shared
memory (upcast, times their tokens' scales, into float16 tiles that the wgmma reads), so the step reads
one byte a value from memory. FP8 pools need Hkv a multiple of 8 (a scale box's rows must fill a
register tile) and 128-position steps at most.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.paged_attention.steps import key_steps
from pallas_kernels.splits import combine

# One warpgroup's wgmma tile rows.
TILE_ROWS = 64
# Shared memory a CTA may use on Hopper (of 228 KiB a multiprocessor).
_SMEM_BYTES = 227 * 1024
FP8 = jnp.dtype(jnp.float8_e4m3fn)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), FP8)
# What the query, the probabilities and an FP8 pool's dequantized tiles are multiplied in (as the Triton
# launch's: f16 keeps three more mantissa bits than bf16 for scaled e4m3 values).
FP8_COMPUTE_DTYPE = jnp.dtype(jnp.float16)


def compute_dtype(dtype) -> jnp.dtype:
    """The wgmma operands' dtype for a pool of `dtype`."""
    return FP8_COMPUTE_DTYPE if jnp.dtype(dtype) == FP8 else jnp.dtype(dtype)


def smem_bytes(block_kv: int, stages: int, head_dim: int, itemsize: int, kv_heads: int) -> int:
    """Shared memory of one program (each buffer rounded up to the 1 KiB Mosaic GPU aligns it to): the
    query tile, the log-sum-exp and the rows' positions throughout; then the larger of the key loop's
    buffers (the key and value ring and the probabilities; an FP8 pool's scale ring and dequantized
    tiles) and the float32 output tile that reuses their bytes after the loop; and the barriers."""
    def kib(nbytes: int) -> int:
        return -(-nbytes // 1024) * 1024

    operand = FP8_COMPUTE_DTYPE.itemsize if itemsize == 1 else itemsize
    loop = 2 * kib(stages * block_kv * head_dim * itemsize) + kib(TILE_ROWS * block_kv * operand)
    if itemsize == 1:
        loop += 2 * kib(stages * block_kv * kv_heads * 4) + 2 * kib(block_kv * head_dim * operand)
    whole = kib(TILE_ROWS * head_dim * operand) + 2 * kib(TILE_ROWS * 4)
    return whole + max(loop, kib(TILE_ROWS * head_dim * 4)) + 1024


def resident_programs(block_kv: int, stages: int, head_dim: int, itemsize: int, kv_heads: int) -> int:
    """Programs one multiprocessor holds at once, by shared memory (a `DecodeConfig.wave` is this times
    the multiprocessors)."""
    return max(1, _SMEM_BYTES // smem_bytes(block_kv, stages, head_dim, itemsize, kv_heads))


def unsupported_reason(dtype, heads: int, head_dim: int, block_kv: int, stages: int, kv_heads: int) -> str | None:
    """Why the Mosaic launches cannot run a pool (None when it can)."""
    dtype = jnp.dtype(dtype)
    if heads > TILE_ROWS:
        return f"a KV head's {heads} query heads exceed the {TILE_ROWS}-row tile"
    if dtype not in DTYPES:
        return f"it reads bf16, f16 or float8_e4m3fn pools, not {dtype.name}"
    if head_dim * dtype.itemsize % 128:
        return f"head_dim={head_dim} rows of {dtype.name} are not a whole number of 128-byte swizzle rows"
    if dtype == FP8 and kv_heads % 8:
        return (f"an FP8 pool's scale rows of {kv_heads} KV heads do not fill a register tile (a multiple of 8 "
                "heads; other FP8 pools take the Triton decode launch: DecodeConfig(kernel='triton'))")
    if block_kv % TILE_ROWS:
        return (f"steps of {block_kv} positions are not whole {TILE_ROWS}-row register tiles (the value tile's "
                "span mask and an FP8 pool's dequantization load [W, K] tiles in the wgmma layout)")
    if dtype == FP8 and block_kv > 128:
        return f"FP8 steps of {block_kv} positions exceed 128 (the dequantized tiles' registers)"
    if smem_bytes(block_kv, stages, head_dim, dtype.itemsize, kv_heads) > _SMEM_BYTES:
        return f"{stages} stages of {block_kv} positions do not fit in shared memory"
    return None


def _transforms(cols: int, bits: int) -> tuple:
    """Shared-memory layout of a wgmma operand tile of `cols` columns: 8-row tiles, swizzled."""
    swizzle = plgpu.find_swizzle(cols * bits)
    return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


def _kernel(
    qrow_gmem,  # [I] int32: the item's first query row in q (a multiple of 8)
    seq_gmem,  # [I] int32: its sequence
    lo_gmem,  # [I] int32: the first position any of its rows sees
    hi_gmem,  # [I] int32: one past the last
    part_gmem,  # [I] int32: which share of the span's key steps the item takes
    parts_gmem,  # [I] int32: the span's items; 0 for an item past the last
    table_gmem,  # [S, M] int32
    q_gmem,  # [Hkv, rows + G, K]: the items' query tiles
    *refs,  # (causal: pos [rows + G] int32, each query row's position); k, v [P Z, Hkv, K]; an FP8 pool's
    # k_scale, v_scale [P Z, Hkv] f32; then o [Hkv, I X, K] f32 and lse [Hkv, I, G] f32
    out_rows: int,
    causal: bool,
    window: int | None,
    page_size: int,
    block_kv: int,
    stages: int,
    sm_scale: float,
):
    pos_gmem, refs = (refs[0], refs[1:]) if causal else (None, refs)
    k_gmem, v_gmem, *scales_gmem, o_gmem, lse_gmem = refs
    quantized = k_gmem.dtype == FP8
    num_kv_heads, head_dim = k_gmem.shape[1], k_gmem.shape[2]
    dtype = compute_dtype(k_gmem.dtype)  # of q, p and the tiles the wgmma reads
    pages_per_seq = table_gmem.shape[1]
    last_page = k_gmem.shape[0] // page_size - 1
    # A step's pieces: whole pages when a step spans several, else the step's part of one page.
    piece = min(page_size, block_kv)
    pieces = block_kv // piece
    h, w = lax.axis_index("h"), lax.axis_index("w")

    # Shared memory in three scopes, so the output tile reuses the ring's bytes: the query tile, the
    # log-sum-exp, the rows' positions and the barriers for the whole program; the ring (with an FP8
    # pool's scales and dequantized tiles) and the probabilities for the key loop; the output after it.
    def body(q_smem, lse_smem, pos_smem, q_barrier, kv_barriers):
        parts = parts_gmem[w]

        @pl.when(parts > 0)  # items past the last exit at once
        def _():
            seq, lo, hi = seq_gmem[w], lo_gmem[w], hi_gmem[w]
            start, stop = key_steps(lo, hi, block_kv, part_gmem[w], parts)
            count = jnp.maximum(stop - start, 0)  # this item's steps

            q_row = pl.multiple_of(qrow_gmem[w], 8)  # tiled copies start on 8-row tiles
            plgpu.copy_gmem_to_smem(q_gmem.at[h, pl.ds(q_row, TILE_ROWS)], q_smem, q_barrier)
            if causal:
                plgpu.copy_gmem_to_smem(pos_gmem.at[pl.ds(q_row, TILE_ROWS)], pos_smem, q_barrier)

            def walk(k_smem, v_smem, p_smem, *fp8_smem):
                """The key loop: (o [G, K], m [G], l [G]) f32, o unnormalised."""

                def fetch(step, slot):
                    """Issues the TMA copies of key step `step` into ring slot `slot`."""
                    for j in range(pieces):
                        pos = step * block_kv + j * piece
                        # (pages past the row's span are masked; a stale id still reads inside the pool)
                        page = jnp.clip(table_gmem[seq, jnp.minimum(pos // page_size, pages_per_seq - 1)], 0, last_page)
                        row = pl.multiple_of(page * page_size + pos % page_size, piece)
                        for src, dst in ((k_gmem, k_smem), (v_gmem, v_smem)):
                            plgpu.copy_gmem_to_smem(src.at[pl.ds(row, piece), h], dst.at[slot, pl.ds(j * piece, piece)],
                                                    kv_barriers.at[slot])
                        for src, dst in zip(scales_gmem, fp8_smem[:2]):  # every head's scales: TMA reads rows
                            plgpu.copy_gmem_to_smem(src.at[pl.ds(row, piece)], dst.at[slot, pl.ds(j * piece, piece)],
                                                    kv_barriers.at[slot])

                for s in range(stages):
                    pl.when(s < count)(functools.partial(fetch, start + s, s))
                plgpu.barrier_wait(q_barrier)
                # Each tile row's own position (rows past the block's hold -1 and see nothing).
                q_pos = plgpu.load(pos_smem, layout=plgpu.Layout.WGMMA.reduce(1)) if causal else None  # [G]

                def step_body(i, carry):
                    o, m, l = carry  # [G, K], [G], [G] f32
                    slot = lax.rem(i, stages)
                    step0 = (start + i) * block_kv
                    plgpu.barrier_wait(kv_barriers.at[slot])
                    if quantized:
                        k_tile, v_tile = _dequantize(k_smem.at[slot], v_smem.at[slot], *fp8_smem, slot=slot, head=h,
                                                     step0=step0, lo=lo, hi=hi, kv_heads=num_kv_heads)
                        # The slot's bytes are in the dequantized tiles now: refill it at once.
                        pl.when(i + stages < count)(functools.partial(fetch, start + i + stages, slot))
                    else:
                        k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]

                    def logits(acc_ref):
                        plgpu.wgmma(acc_ref, q_smem, k_tile.transpose((1, 0)))
                        return acc_ref[...]

                    s = pl.run_scoped(logits, plgpu.ACC((TILE_ROWS, block_kv), jnp.float32)) * sm_scale  # [G, W]
                    kv_pos = step0 + plgpu.broadcasted_iota(jnp.int32, (TILE_ROWS, block_kv), 1,
                                                            layout=plgpu.Layout.WGMMA)
                    see = (kv_pos >= lo) & (kv_pos < hi)
                    if causal:
                        row_pos = lax.broadcast_in_dim(q_pos, s.shape, [0])
                        see &= kv_pos <= row_pos
                        if window is not None:
                            see &= kv_pos > row_pos - window
                    s = jnp.where(see, s, -jnp.inf)
                    m_new = jnp.maximum(m, s.max(axis=1))  # -inf while the tile has seen nothing
                    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                    alpha = jnp.exp(m - m_safe)
                    p = jnp.exp(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))
                    l = l * alpha + p.sum(axis=1)
                    o = o * lax.broadcast_in_dim(alpha, o.shape, [0])

                    if not quantized:
                        # A zero probability does not cancel a NaN or an infinity: value rows outside the span
                        # (a page's tail, slots before a window, whatever they hold) are zeroed in shared memory.
                        @pl.when((step0 < lo) | (step0 + block_kv > hi))
                        def _():
                            v = plgpu.load(v_smem.at[slot], layout=plgpu.Layout.WGMMA)  # [W, K]
                            v_smem[slot] = jnp.where(_in_span(v.shape, step0, lo, hi), v, jnp.zeros_like(v))
                            plgpu.commit_smem()

                    # (wgmma could take p from registers; through shared memory the interpreter runs it too)
                    p_smem[...] = p.astype(dtype)
                    plgpu.commit_smem()

                    def values(acc_ref):
                        plgpu.wgmma(acc_ref, p_smem, v_tile)
                        return acc_ref[...]

                    o = o + pl.run_scoped(values, plgpu.ACC((TILE_ROWS, head_dim), jnp.float32))  # [G, K]
                    if not quantized:  # the slot's tiles are consumed: refill it with the step `stages` ahead
                        pl.when(i + stages < count)(functools.partial(fetch, start + i + stages, slot))
                    return o, m_new, l

                o = plgpu.layout_cast(jnp.zeros((TILE_ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA)
                m = plgpu.layout_cast(jnp.full((TILE_ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                l = plgpu.layout_cast(jnp.zeros((TILE_ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                return lax.fori_loop(0, count, step_body, (o, m, l))

            o, m, l = pl.run_scoped(walk, *loop_scratch)

            def epilogue(o_smem):
                plgpu.commit_smem()  # every warp is past the loop before the ring's bytes are reused
                seen = l > 0  # an empty share yields zeros and a log-sum-exp of -inf
                o_smem[...] = o / lax.broadcast_in_dim(jnp.where(seen, l, 1.0), o.shape, [0])
                lse_smem[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, out_rows)], o_gmem.at[h, pl.ds(w * out_rows, out_rows)])
                plgpu.copy_smem_to_gmem(lse_smem, lse_gmem.at[h, w])
                plgpu.wait_smem_to_gmem(0)

            pl.run_scoped(epilogue, plgpu.SMEM((TILE_ROWS, head_dim), jnp.float32))

    operand = _transforms(head_dim, dtype.itemsize * 8)
    ring = _transforms(head_dim, k_gmem.dtype.itemsize * 8)
    loop_scratch = [
        plgpu.SMEM((stages, block_kv, head_dim), k_gmem.dtype, transforms=ring),
        plgpu.SMEM((stages, block_kv, head_dim), k_gmem.dtype, transforms=ring),
        plgpu.SMEM((TILE_ROWS, block_kv), dtype, transforms=_transforms(block_kv, dtype.itemsize * 8)),
    ]
    if quantized:
        loop_scratch += [
            plgpu.SMEM((stages, block_kv, num_kv_heads), jnp.float32),  # k_scale ring
            plgpu.SMEM((stages, block_kv, num_kv_heads), jnp.float32),  # v_scale ring
            plgpu.SMEM((block_kv, head_dim), dtype, transforms=operand),  # dequantized keys
            plgpu.SMEM((block_kv, head_dim), dtype, transforms=operand),  # dequantized values
        ]
    pl.run_scoped(
        body,
        plgpu.SMEM((TILE_ROWS, head_dim), dtype, transforms=operand),
        plgpu.SMEM((TILE_ROWS,), jnp.float32),
        plgpu.SMEM((TILE_ROWS,), jnp.int32),  # the rows' positions (causal tiles)
        plgpu.Barrier(num_arrivals=2 if causal else 1),
        plgpu.Barrier(num_arrivals=(4 if quantized else 2) * pieces, num_barriers=stages),
    )


def _in_span(shape: tuple[int, int], step0, lo, hi) -> jax.Array:
    """[W, X] bool: whether each row's position (step0 + row) lies in [lo, hi)."""
    pos = step0 + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
    return (pos >= lo) & (pos < hi)


def _dequantize(k_slot, v_slot, ks_smem, vs_smem, kd_smem, vd_smem, *, slot, head, step0, lo, hi, kv_heads: int):
    """An FP8 step's key and value tiles, upcast and times their tokens' scales (head `head`'s column of
    the [W, Hkv] scale boxes), into the compute-dtype tiles the wgmma reads; value rows outside the span
    [lo, hi) become zeros (a zero probability does not cancel a NaN or an infinity)."""
    block_kv = k_slot.shape[0]
    column = plgpu.broadcasted_iota(jnp.int32, (block_kv, kv_heads), 1, layout=plgpu.Layout.WGMMA) == head
    for src, scales, dst in ((k_slot, ks_smem, kd_smem), (v_slot, vs_smem, vd_smem)):
        scale = jnp.where(column, plgpu.load(scales.at[slot], layout=plgpu.Layout.WGMMA), 0.0).sum(axis=1)  # [W]
        x = plgpu.load(src, layout=plgpu.Layout.WGMMA).astype(jnp.float32)  # [W, K]
        x = x * lax.broadcast_in_dim(scale, x.shape, [0])
        if dst is vd_smem:
            x = jnp.where(_in_span(x.shape, step0, lo, hi), x, 0.0)
        dst[...] = x.astype(dst.dtype)
    plgpu.commit_smem()
    return kd_smem, vd_smem


def _launch(items: dict[str, jax.Array], q: jax.Array, q_pos: jax.Array | None, page_table: jax.Array,
            pools: list[jax.Array], *, out_rows: int, window: int | None, page_size: int, block_kv: int,
            stages: int, sm_scale: float, interpret: bool) -> tuple[jax.Array, jax.Array]:
    """The kernel over work items (qrow, seq, lo, hi, part, parts [I]) and query tiles q [Hkv, rows + G, K]
    (q_pos [rows + G]: causal tiles, each row masked at its own position): (o [Hkv, I X, K], lse
    [Hkv, I, G]) f32, X = `out_rows` rows of each item."""
    num_kv_heads, _, head_dim = q.shape
    num_items = items["parts"].shape[0]
    causal = q_pos is not None
    kernel = plgpu.kernel(
        functools.partial(_kernel, out_rows=out_rows, causal=causal, window=window, page_size=page_size,
                          block_kv=block_kv, stages=stages, sm_scale=sm_scale),
        out_type=(jax.ShapeDtypeStruct((num_kv_heads, num_items * out_rows, head_dim), jnp.float32),
                  jax.ShapeDtypeStruct((num_kv_heads, num_items, TILE_ROWS), jnp.float32)),
        grid=(num_kv_heads, num_items),
        grid_names=("h", "w"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name=f"jaxfire_paged_attention_{'block' if causal else 'decode'}_mosaic",
    )
    return kernel(*(items[name].astype(jnp.int32) for name in ("qrow", "seq", "lo", "hi", "part", "parts")),
                  page_table.astype(jnp.int32), q, *([q_pos.astype(jnp.int32)] if causal else []), *pools)


def _pools(pools: Sequence[jax.Array], *, heads: int, block_kv: int, stages: int, q_dtype) -> list[jax.Array]:
    """The pool arrays the kernel reads, after the checks that name what it cannot run."""
    k_rows, v_rows, *scales = pools
    num_kv_heads, head_dim = k_rows.shape[1], k_rows.shape[2]
    reason = unsupported_reason(k_rows.dtype, heads, head_dim, block_kv, stages, num_kv_heads)
    if reason is None and q_dtype == jnp.float32:
        reason = ("float32 queries ask for float32 products, where wgmma multiplies 16-bit operands "
                  "(the Triton kernel keeps float32: kernel='triton')")
    if reason is not None:
        raise ValueError(f"The Mosaic GPU paged attention cannot run this pool: {reason}.")
    scales = [scale.astype(jnp.float32) for scale in scales]
    if (k_rows.dtype == FP8) != (len(scales) == 2):
        raise ValueError("an FP8 pool needs its k and v scales, and only an FP8 pool takes them.")
    return [k_rows, v_rows, *scales]


def decode_launch(
    items: dict[str, jax.Array],  # plan.decode_items: per item row0, seq, lo, hi, part, parts [I]
    qs: jax.Array,  # [Hkv, (T+Q) R', K], the rows sorted
    page_table: jax.Array,  # [S, M]
    pools: Sequence[jax.Array],  # k, v [P Z, Hkv, K] (a row per slot); an FP8 pool's k, v scales [P Z, Hkv]
    *,
    heads: int,
    page_size: int,
    block_kv: int,
    stages: int,
    sm_scale: float,
    interpret: bool,
) -> tuple[jax.Array, jax.Array]:
    """(o [Hkv, I R', K], lse [Hkv, I R']) float32: each item's R' rows, normalised on their own, and
    their log-sum-exp (-inf for an empty share); rows of items past the last hold anything."""
    num_kv_heads, _, head_dim = qs.shape
    num_items = items["parts"].shape[0]
    pools = _pools(pools, heads=heads, block_kv=block_kv, stages=stages, q_dtype=qs.dtype)
    # Each row's heads from a multiple of 8 rows, and a full tile of rows past the last, so the query
    # copy starts on a tile and stays in bounds.
    q_stride = -(-heads // 8) * 8
    qs = qs.astype(compute_dtype(pools[0].dtype)).reshape(num_kv_heads, -1, heads, head_dim)
    qs = jnp.pad(qs, ((0, 0), (0, 0), (0, q_stride - heads), (0, 0))).reshape(num_kv_heads, -1, head_dim)
    qs = jnp.pad(qs, ((0, 0), (0, TILE_ROWS), (0, 0)))
    items = dict(items, qrow=items["row0"] * q_stride)
    o, lse = _launch(items, qs, None, page_table, pools, out_rows=heads, window=None, page_size=page_size,
                     block_kv=block_kv, stages=stages, sm_scale=sm_scale, interpret=interpret)
    return o, lse[:, :, :heads].reshape(num_kv_heads, num_items * heads)


def block_launch(
    meta: dict[str, jax.Array],  # plan.blocks: per block seq, row0, nrows, lo, hi [N]
    qs: jax.Array,  # [Hkv, (T+Q) R', K], the rows sorted
    q_pos: jax.Array,  # [(T+Q) R'] int32: each query row's position
    page_table: jax.Array,  # [S, M]
    pools: Sequence[jax.Array],  # k, v [P Z, Hkv, K] (a row per slot); an FP8 pool's k, v scales [P Z, Hkv]
    *,
    heads: int,
    block_q: int,
    num_splits: int,
    page_size: int,
    block_kv: int,
    stages: int,
    sm_scale: float,
    window: int | None,
    interpret: bool,
) -> jax.Array:
    """The rows in blocks, [Hkv, (T+Q) R', K] f32 in the sorted order (other rows zeros): each block's
    Q R' query rows as one 64-row tile (gathered, so every tile starts on a tile row), each row masked
    at its own position, `num_splits` items a block merged by their log-sum-exp."""
    num_kv_heads, span, head_dim = qs.shape
    if block_q * heads > TILE_ROWS:
        raise ValueError(f"The Mosaic GPU block launch takes {TILE_ROWS}-row tiles: block_q={block_q} rows of "
                         f"{heads} query heads do not fit (block_q <= {TILE_ROWS // heads}).")
    pools = _pools(pools, heads=heads, block_kv=block_kv, stages=stages, q_dtype=qs.dtype)
    num_blocks = meta["nrows"].shape[0]
    # Tile rows: block b's row i is sorted query row row0[b] R' + i, live below nrows[b] R'.
    i = jnp.arange(TILE_ROWS, dtype=jnp.int32)
    rows = meta["row0"][:, None] * heads + i[None, :]  # [N, G]
    live = i[None, :] < meta["nrows"][:, None] * heads  # [N, G]
    rows = jnp.where(live, rows, span)  # [N, G]: dead rows point past the last (dropped below)
    tiles = jnp.pad(qs.astype(compute_dtype(pools[0].dtype)), ((0, 0), (0, 1), (0, 0)))[:, rows]  # [Hkv, N, G, K]
    tiles = jnp.pad(tiles.reshape(num_kv_heads, num_blocks * TILE_ROWS, head_dim), ((0, 0), (0, TILE_ROWS), (0, 0)))
    tile_pos = jnp.where(live, jnp.pad(q_pos, (0, 1), constant_values=-1)[rows], -1).reshape(-1)
    tile_pos = jnp.pad(tile_pos, (0, TILE_ROWS), constant_values=-1)  # [N G + G]
    # Items: each block's splits in turn.
    b = jnp.repeat(jnp.arange(num_blocks, dtype=jnp.int32), num_splits)
    items = dict(qrow=b * TILE_ROWS, seq=meta["seq"][b], lo=meta["lo"][b], hi=meta["hi"][b],
                 part=jnp.tile(jnp.arange(num_splits, dtype=jnp.int32), num_blocks),
                 parts=jnp.where(meta["nrows"][b] > 0, num_splits, 0))
    o, lse = _launch(items, tiles, tile_pos, page_table, pools, out_rows=TILE_ROWS, window=window,
                     page_size=page_size, block_kv=block_kv, stages=stages, sm_scale=sm_scale, interpret=interpret)
    o = o.reshape(num_kv_heads, num_blocks, num_splits, TILE_ROWS, head_dim)
    lse = lse.reshape(num_kv_heads, num_blocks, num_splits, TILE_ROWS)
    o = combine(o, lse, axis=2)  # [Hkv, N, G, K]
    out = jnp.zeros((num_kv_heads, span, head_dim), jnp.float32)
    return out.at[:, rows.reshape(-1)].set(o.reshape(num_kv_heads, -1, head_dim), mode="drop")

