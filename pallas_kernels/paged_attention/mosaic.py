# Hkv key/value heads, K head dim, Z page size, P pages, S sequences (page-table rows), M pages per
# sequence, I work items, R' query heads of one KV head (padded to a power of two), W positions a loop
# step reads (`block_kv`), G = 64 tile rows (one warpgroup's wgmma tile).
"""The paged attention's decode launch on Mosaic GPU: one warpgroup per (KV head, work item).

A work item is a share of one decode row's key steps (`triton.decode_items` cuts the rows). The
program TMA-loads 64 query rows from the row's first (its R' heads, then whatever rows follow: their
results are never stored), then walks its key steps: each step's W positions are the pages (or the
part of a page) that hold them, each a [Z, K] box of one KV head copied by TMA from the pool into a
`num_stages`-deep shared-memory ring, so the next steps' pages stream in while one is used. The
logits [G, W] and the output [G, K] are wgmma tiles with float32 accumulators; the online softmax
runs in registers. The row's R' output rows and the tile's log-sum-exp go back by TMA, and the items
of a row are merged as the Triton launch's are.

bf16 and f16 pools: an FP8 pool's per-token scales are strided by the KV heads, which TMA cannot
read as a vector, and FP8 wgmma would need the queries in FP8 too; FP8 pools keep the Triton launch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.paged_attention.steps import key_steps

# One warpgroup's wgmma tile rows.
TILE_ROWS = 64
# Shared memory a CTA may use on Hopper (of 228 KiB a multiprocessor).
_SMEM_BYTES = 227 * 1024
DTYPES = (jnp.bfloat16, jnp.float16)


def smem_bytes(block_kv: int, stages: int, head_dim: int, itemsize: int) -> int:
    """Shared memory of one program: the key and value ring, the query tile, the float32 output tile,
    the probabilities, the log-sum-exp and the barriers."""
    ring = 2 * stages * block_kv * head_dim * itemsize
    return ring + TILE_ROWS * (head_dim * (itemsize + 4) + block_kv * itemsize + 4) + 1024


def resident_programs(block_kv: int, stages: int, head_dim: int, itemsize: int) -> int:
    """Programs one multiprocessor holds at once, by shared memory (a `DecodeConfig.wave` is this times
    the multiprocessors)."""
    return max(1, _SMEM_BYTES // smem_bytes(block_kv, stages, head_dim, itemsize))


def unsupported_reason(dtype, heads: int, head_dim: int, block_kv: int, stages: int) -> str | None:
    """Why the Mosaic decode launch cannot run a pool (None when it can)."""
    if heads > TILE_ROWS:
        return f"a KV head's {heads} query heads exceed the {TILE_ROWS}-row tile"
    if jnp.dtype(dtype) not in map(jnp.dtype, DTYPES):
        return (f"it reads bf16 or f16 pools, not {jnp.dtype(dtype).name} (FP8 pools take the Triton decode "
                "launch: DecodeConfig(kernel='triton'))")
    if head_dim * jnp.dtype(dtype).itemsize % 128:
        return f"head_dim={head_dim} rows are not a whole number of 128-byte swizzle rows"
    if smem_bytes(block_kv, stages, head_dim, jnp.dtype(dtype).itemsize) > _SMEM_BYTES:
        return f"{stages} stages of {block_kv} positions do not fit in shared memory"
    return None


def _transforms(cols: int, bits: int) -> tuple:
    """Shared-memory layout of a wgmma operand tile of `cols` columns: 8-row tiles, swizzled."""
    swizzle = plgpu.find_swizzle(cols * bits)
    return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


def _kernel(
    row0_gmem,  # [I] int32: the item's decode row (in the sorted order)
    seq_gmem,  # [I] int32: its sequence
    lo_gmem,  # [I] int32: the first position the row sees
    hi_gmem,  # [I] int32: one past the last
    part_gmem,  # [I] int32: which share of the row's key steps the item takes
    parts_gmem,  # [I] int32: the row's items; 0 for an item past the last
    table_gmem,  # [S, M] int32
    q_gmem,  # [Hkv, (T+Q) R8 + G, K]: each row's R' heads from a multiple of 8 (R8 = q_stride)
    k_gmem,  # [P Z, Hkv, K]
    v_gmem,  # [P Z, Hkv, K]
    o_gmem,  # [Hkv, I R', K] f32
    lse_gmem,  # [Hkv, I, G] f32
    *,
    heads: int,
    q_stride: int,
    page_size: int,
    block_kv: int,
    stages: int,
    sm_scale: float,
):
    head_dim = q_gmem.shape[-1]
    dtype = k_gmem.dtype
    pages_per_seq = table_gmem.shape[1]
    last_page = k_gmem.shape[0] // page_size - 1
    # A step's pieces: whole pages when a step spans several, else the step's part of one page.
    piece = min(page_size, block_kv)
    pieces = block_kv // piece
    bits = jnp.dtype(dtype).itemsize * 8
    transforms = _transforms(head_dim, bits)
    h, w = lax.axis_index("h"), lax.axis_index("w")

    def body(q_smem, k_smem, v_smem, p_smem, o_smem, lse_smem, q_barrier, kv_barriers):
        parts = parts_gmem[w]

        @pl.when(parts > 0)  # items past the last exit at once
        def _():
            seq, lo, hi = seq_gmem[w], lo_gmem[w], hi_gmem[w]
            start, stop = key_steps(lo, hi, block_kv, part_gmem[w], parts)
            count = jnp.maximum(stop - start, 0)  # this item's steps

            q_row = pl.multiple_of(row0_gmem[w] * q_stride, 8)  # tiled copies start on 8-row tiles
            plgpu.copy_gmem_to_smem(q_gmem.at[h, pl.ds(q_row, TILE_ROWS)], q_smem, q_barrier)

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

            for s in range(stages):
                pl.when(s < count)(functools.partial(fetch, start + s, s))
            plgpu.barrier_wait(q_barrier)

            def step_body(i, carry):
                o, m, l = carry  # [G, K], [G], [G] f32
                slot = lax.rem(i, stages)
                plgpu.barrier_wait(kv_barriers.at[slot])

                def logits(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                    return acc_ref[...]

                s = pl.run_scoped(logits, plgpu.ACC((TILE_ROWS, block_kv), jnp.float32)) * sm_scale  # [G, W]
                kv_pos = (start + i) * block_kv + plgpu.broadcasted_iota(
                    jnp.int32, (TILE_ROWS, block_kv), 1, layout=plgpu.Layout.WGMMA)
                s = jnp.where((kv_pos >= lo) & (kv_pos < hi), s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1))  # -inf while the tile has seen nothing
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                alpha = jnp.exp(m - m_safe)
                p = jnp.exp(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))
                l = l * alpha + p.sum(axis=1)
                o = o * lax.broadcast_in_dim(alpha, o.shape, [0])
                step0 = (start + i) * block_kv

                # A zero probability does not cancel a NaN or an infinity: value rows outside the span
                # (a page's tail, slots before a window, whatever they hold) are zeroed in shared memory.
                @pl.when((step0 < lo) | (step0 + block_kv > hi))
                def _():
                    v = plgpu.load(v_smem.at[slot], layout=plgpu.Layout.WGMMA)  # [W, K]
                    pos = step0 + plgpu.broadcasted_iota(jnp.int32, v.shape, 0, layout=plgpu.Layout.WGMMA)
                    v_smem[slot] = jnp.where((pos >= lo) & (pos < hi), v, jnp.zeros_like(v))
                    plgpu.commit_smem()

                # (wgmma could take p from registers; through shared memory the interpreter runs it too)
                p_smem[...] = p.astype(dtype)
                plgpu.commit_smem()

                def values(acc_ref):
                    plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
                    return acc_ref[...]

                o = o + pl.run_scoped(values, plgpu.ACC((TILE_ROWS, head_dim), jnp.float32))  # [G, K]
                # The slot's tiles are consumed: refill it with the step `stages` ahead.
                pl.when(i + stages < count)(functools.partial(fetch, start + i + stages, slot))
                return o, m_new, l

            o = plgpu.layout_cast(jnp.zeros((TILE_ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA)
            m = plgpu.layout_cast(jnp.full((TILE_ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l = plgpu.layout_cast(jnp.zeros((TILE_ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            o, m, l = lax.fori_loop(0, count, step_body, (o, m, l))
            seen = l > 0  # an empty share yields zeros and a log-sum-exp of -inf
            o_smem[...] = o / lax.broadcast_in_dim(jnp.where(seen, l, 1.0), o.shape, [0])
            lse_smem[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, heads)], o_gmem.at[h, pl.ds(w * heads, heads)])
            plgpu.copy_smem_to_gmem(lse_smem, lse_gmem.at[h, w])
            plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        body,
        plgpu.SMEM((TILE_ROWS, head_dim), dtype, transforms=transforms),
        plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=transforms),
        plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=transforms),
        plgpu.SMEM((TILE_ROWS, block_kv), dtype, transforms=_transforms(block_kv, bits)),
        plgpu.SMEM((TILE_ROWS, head_dim), jnp.float32),
        plgpu.SMEM((TILE_ROWS,), jnp.float32),
        plgpu.Barrier(),
        plgpu.Barrier(num_arrivals=2 * pieces, num_barriers=stages),
    )


def decode_launch(
    items: dict[str, jax.Array],  # triton.decode_items: per item row0, seq, lo, hi, part, parts [I]
    qs: jax.Array,  # [Hkv, (T+Q) R', K], the rows sorted
    page_table: jax.Array,  # [S, M]
    k_rows: jax.Array,  # [P Z, Hkv, K]: the pool, a row per slot
    v_rows: jax.Array,  # [P Z, Hkv, K]
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
    reason = unsupported_reason(k_rows.dtype, heads, head_dim, block_kv, stages)
    if reason is not None:
        raise ValueError(f"The Mosaic GPU decode launch cannot run this pool: {reason}.")
    # Each row's heads from a multiple of 8 rows, and a full tile of rows past the last, so the query
    # copy starts on a tile and stays in bounds.
    q_stride = -(-heads // 8) * 8
    qs = qs.astype(k_rows.dtype).reshape(num_kv_heads, -1, heads, head_dim)
    qs = jnp.pad(qs, ((0, 0), (0, 0), (0, q_stride - heads), (0, 0))).reshape(num_kv_heads, -1, head_dim)
    qs = jnp.pad(qs, ((0, 0), (0, TILE_ROWS), (0, 0)))
    kernel = plgpu.kernel(
        functools.partial(_kernel, heads=heads, q_stride=q_stride, page_size=page_size, block_kv=block_kv,
                          stages=stages, sm_scale=sm_scale),
        out_type=(jax.ShapeDtypeStruct((num_kv_heads, num_items * heads, head_dim), jnp.float32),
                  jax.ShapeDtypeStruct((num_kv_heads, num_items, TILE_ROWS), jnp.float32)),
        grid=(num_kv_heads, num_items),
        grid_names=("h", "w"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name="jaxfire_paged_attention_decode_mosaic",
    )
    o, lse = kernel(*(items[name].astype(jnp.int32) for name in ("row0", "seq", "lo", "hi", "part", "parts")),
                    page_table.astype(jnp.int32), qs, k_rows, v_rows)
    return o, lse[:, :, :heads].reshape(num_kv_heads, num_items * heads)
