"""Grouped matmul on Hopper through Mosaic GPU: warp-specialised wgmma for prefill, bf16 and FP8.

Shapes: T rows (sorted by expert), K contraction, N weight output columns, E experts, F swiglu
width (N = 2F), P row tasks, BM/BN/BK block sizes, WM rows of one warpgroup's tile, CN columns of
one CTA's output tile, EN epilogue tile width.

A persistent kernel: each SM loops over (row task, column tile) pairs. A CTA holds two compute
warpgroups and one TMA warpgroup that streams [BM, BK] lhs and weight tiles through a
`num_stages`-deep shared-memory ring. Plain matmul: the warpgroups split the CTA's 2*BN columns
(tile [BM, 2*BN]). Swiglu keeps a gate and an up accumulator per warpgroup, so silu(gate) * up is
formed in registers: from 128 rows the warpgroups split the BM rows over the same BN columns of F;
with 64-row tiles (decode) they share the rows and split 2*BN columns of F, so each pipeline step
loads half the lhs rows for the same weight bytes.
FP8 operands feed e4m3 x e4m3 wgmma with f32 accumulation (both K-major, so `transpose_rhs`);
the per-row and per-column scales, fetched by TMA while the main loop runs, multiply the f32
accumulator in the epilogue. Output rows outside a task's expert are never stored; the rows past
sum(group_sizes) are stored as zeros by the tasks of the tail group (see tiling.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.grouped_matmul.config import Config
from pallas_kernels.grouped_matmul.tiling import row_tasks

_SMEM_BYTES = 227 * 1024
# Row tiles start on multiples of 8 rows: 32-byte aligned f32 row-scale copies.
ROW_ALIGN = 8
_MEMORY_REGISTERS = 40


def _bits(dtype) -> int:
    return jnp.dtype(dtype).itemsize * 8


def _epilogue_width(out_dtype) -> int:
    # One 128-byte swizzle row of output per epilogue tile.
    return 128 * 8 // _bits(out_dtype)


def _split_rows(config: Config, swiglu: bool) -> bool:
    """Whether the two compute warpgroups split the tile's rows (swiglu from 128 rows) rather than
    its columns."""
    return swiglu and config.block_m >= 128


def _tile_shape(config: Config, swiglu: bool) -> tuple[int, int, int]:
    """(WM, CN, band): a warpgroup's rows, the CTA's output columns, the weight rows of one band
    (one each for gate and up with swiglu)."""
    if _split_rows(config, swiglu):
        return config.block_m // 2, config.block_n, config.block_n
    return config.block_m, 2 * config.block_n, 2 * config.block_n


def _stage_bytes(config: Config, in_dtype, swiglu: bool) -> int:
    # lhs [BM, BK] + weight bands [band, BK] (two N halves, or gate and up).
    bands = 2 if swiglu else 1
    band = _tile_shape(config, swiglu)[2]
    return (config.block_m + bands * band) * config.block_k * jnp.dtype(in_dtype).itemsize


def _epilogue_bytes(config: Config, out_dtype, swiglu: bool, slots: int, scales: tuple[bool, bool]) -> int:
    wg_m = _tile_shape(config, swiglu)[0]
    out = 2 * slots * wg_m * _epilogue_width(out_dtype) * jnp.dtype(out_dtype).itemsize
    row_scales = 2 * wg_m * 4 if scales[0] else 0
    col_scales = 2 * (2 if swiglu else 1) * config.block_n * 4 if scales[1] else 0
    return out + row_scales + col_scales + 1024  # and the barriers


def smem_plan(
    config: Config, in_dtype, out_dtype, swiglu: bool, scales: tuple[bool, bool] = (True, True)
) -> tuple[int, int]:
    """(pipeline stages, epilogue slots): the configured depth first, then double-buffered output."""
    stage = _stage_bytes(config, in_dtype, swiglu)
    for stages in range(config.num_stages, 0, -1):
        for slots in (2, 1):
            if stages * stage + _epilogue_bytes(config, out_dtype, swiglu, slots, scales) <= _SMEM_BYTES:
                return stages, slots
    return 0, 1


def unsupported_reason(
    lhs_dtype, rhs_dtype, k: int, n: int, *, transpose_rhs: bool, swiglu: bool, out_dtype, config: Config
) -> str | None:
    """Why this kernel cannot run a problem (None when it can)."""
    if jnp.dtype(lhs_dtype) != jnp.dtype(rhs_dtype):
        return "wgmma needs lhs and rhs of one dtype (weight-only fp8 runs on the Triton kernel)"
    if jnp.dtype(lhs_dtype).itemsize == 1 and not transpose_rhs:
        return "fp8 wgmma needs K-major weights (transpose_rhs=True)"
    if config.block_k * _bits(lhs_dtype) != 1024:
        return f"block_k={config.block_k} must span 128 bytes of {jnp.dtype(lhs_dtype).name}"
    if k % config.block_k:
        return f"K={k} is not a multiple of block_k={config.block_k}"
    wg_m, cta_n, _ = _tile_shape(config, swiglu)
    n_out = n // 2 if swiglu else n
    if n_out % cta_n:
        return f"{'F' if swiglu else 'N'}={n_out} is not a multiple of the CTA tile width {cta_n}"
    if wg_m % 64 or config.block_m % ROW_ALIGN:
        return f"block_m={config.block_m} gives warpgroup tiles of {wg_m} rows, not a multiple of 64"
    if config.block_n % _epilogue_width(out_dtype):
        return f"block_n={config.block_n} is not a multiple of the epilogue width {_epilogue_width(out_dtype)}"
    if smem_plan(config, lhs_dtype, out_dtype, swiglu)[0] < 2:
        return "the tiles of two pipeline stages do not fit in shared memory"
    return None


def tile_order(lin: jax.Array, num_tasks: int, n_tiles: int, width: int) -> tuple[jax.Array, jax.Array]:
    """(row task, column tile) of the persistent loop's step `lin`; each SM takes every SM-count-th step.

    Bands of `width` column tiles are visited one after another, the row tasks snaking within each
    (L2 reuse of lhs rows in prefill). A width of at least `n_tiles` visits each row task's tiles in
    turn, so the padding tasks at the end of the trace-time bound take the last steps: at decode
    sizes, with a few row tasks, that spreads the real tiles evenly over the SMs. (A power-of-two
    width is passed as is: clamped to a width that is not one, the helper would also evaluate a
    division by a zero-width last band.)
    """
    return plgpu.planar_snake(lin, (num_tasks, n_tiles), 1, width)


def _store_rows(src_smem, dst_gmem, dst_row: jax.Array, first: jax.Array, count: jax.Array, max_rows: int):
    """TMA-stores rows [first, first + count) of src to dst rows from dst_row + first.

    TMA boxes are static, so the ragged count is written as its binary digits: at most one copy
    of each power of two.
    """
    pos = first
    rows = max_rows
    while rows >= 1:

        @pl.when((count & rows) != 0)
        def _(pos=pos, rows=rows):
            plgpu.copy_smem_to_gmem(
                src_smem.at[pl.ds(pos, rows)], dst_gmem.at[pl.ds(dst_row + pos, rows)], commit_group=False
            )

        pos = pos + (count & rows)
        rows //= 2
    plgpu.commit_smem_to_gmem_group()


def _kernel(
    group_gmem,  # [P] int32
    start_gmem,  # [P] int32, first row of the tile (a multiple of 8)
    offset_gmem,  # [P] int32, first row of the task within the tile
    size_gmem,  # [P] int32
    lhs_gmem,  # [T, K]
    rhs_gmem,  # [E, N, K] (transpose_rhs) or [E, K, N]
    *refs,  # lhs_scale [T + BM] f32?, rhs_scale [E, N] f32?, out [T, N or F]
    num_groups: int,
    config: Config,
    stages: int,
    out_slots: int,
    transpose_rhs: bool,
    swiglu: bool,
    has_lhs_scale: bool,
    has_rhs_scale: bool,
):
    refs = list(refs)
    lhs_scale_gmem = refs.pop(0) if has_lhs_scale else None
    rhs_scale_gmem = refs.pop(0) if has_rhs_scale else None
    (out_gmem,) = refs
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    k = lhs_gmem.shape[1]
    n_out = out_gmem.shape[1]
    out_dtype = out_gmem.dtype
    num_tasks = group_gmem.shape[0]
    split_rows = _split_rows(config, swiglu)
    wg_m, cta_n, w_rows = _tile_shape(config, swiglu)
    n_tiles = n_out // cta_n
    epi_n = _epilogue_width(out_dtype)
    num_acc = 2 if swiglu else 1

    in_bits = _bits(lhs_gmem.dtype)
    swizzle = plgpu.find_swizzle(bk * in_bits)
    in_transforms = (plgpu.TilingTransform((8, swizzle * 8 // in_bits)), plgpu.SwizzleTransform(swizzle))
    out_swizzle = plgpu.find_swizzle(epi_n * _bits(out_dtype))
    # Row tiling of 1 lets the ragged epilogue start a TMA store on any row.
    out_transforms = (
        plgpu.TilingTransform((1, out_swizzle * 8 // _bits(out_dtype))),
        plgpu.SwizzleTransform(out_swizzle),
    )

    lhs_spec = plgpu.BlockSpec((bm, bk), lambda ki: (0, ki), transforms=in_transforms, delay_release=1)
    if transpose_rhs:
        w_spec = plgpu.BlockSpec((w_rows, bk), lambda ki: (0, ki), transforms=in_transforms, delay_release=1)
    else:
        w_spec = plgpu.BlockSpec((bk, w_rows), lambda ki: (ki, 0), transforms=in_transforms, delay_release=1)
    in_specs = (lhs_spec, w_spec, w_spec) if swiglu else (lhs_spec, w_spec)

    def weight_band(expert, c0):
        """The [N-band, K] (or [K, N-band]) slice of one expert's weights starting at column c0."""
        if transpose_rhs:
            return rhs_gmem.at[expert, pl.ds(c0, w_rows), :]
        return rhs_gmem.at[expert, :, pl.ds(c0, w_rows)]

    def make_pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k // bk,),
            memory_registers=_MEMORY_REGISTERS,
            in_specs=in_specs,
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=stages,
            compute_context=compute_context,
        )

    ignore = lambda *_, **__: None  # noqa: E731
    example_refs = (lhs_gmem, *(weight_band(0, 0) for _ in range(num_acc)))

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=make_pipeline(ignore, ignore).get_allocations(*example_refs),
        out_smem=plgpu.SMEM((2, out_slots, wg_m, epi_n), out_dtype, transforms=out_transforms),
        row_scale_smem=plgpu.SMEM((2, wg_m), jnp.float32) if has_lhs_scale else None,
        row_barrier=plgpu.Barrier(num_barriers=2) if has_lhs_scale else None,
        col_scale_smem=plgpu.SMEM((2, num_acc, bn), jnp.float32) if has_rhs_scale else None,
        col_barrier=plgpu.Barrier(num_barriers=2 * num_acc) if has_rhs_scale else None,
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, out_smem, row_scale_smem, row_barrier, col_scale_smem, col_barrier):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((num_tasks * n_tiles,), collective_axes="sm")
        def _tile_loop(loop_info: plgpu.NDLoopInfo):
            (lin,) = loop_info.index
            task, nj = tile_order(lin, num_tasks, n_tiles, config.grid_tile_width)
            group, tile_start = group_gmem[task], pl.multiple_of(start_gmem[task], ROW_ALIGN)
            offset, size = offset_gmem[task], size_gmem[task]
            expert = jnp.minimum(group, num_groups - 1)
            # Warpgroups own row halves of the tile (swiglu from 128 rows) or column halves.
            row0 = wg * wg_m if split_rows else 0
            col0 = nj * cta_n + (0 if split_rows else wg * bn)
            first = jnp.clip(offset - row0, 0, wg_m)
            count = jnp.clip(offset + size - row0, 0, wg_m) - first

            def store(out):  # [WM, BN] in the WGMMA layout
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                for ei in range(bn // epi_n):
                    slot = ei % out_slots
                    if ei:
                        plgpu.wait_smem_to_gmem(out_slots - 1, wait_read_only=True)
                    out_smem[wg, slot] = out[:, ei * epi_n : (ei + 1) * epi_n]
                    plgpu.commit_smem()
                    _store_rows(
                        out_smem.at[wg, slot],
                        out_gmem.at[:, pl.ds(col0 + ei * epi_n, epi_n)],
                        tile_start + row0,
                        first,
                        count,
                        wg_m,
                    )

            def mma_body(_, lhs_smem, *w_smems_and_accs):
                *w_smems, accs = w_smems_and_accs
                lhs = lhs_smem.at[pl.ds(wg * wg_m, wg_m)] if split_rows else lhs_smem
                for acc_ref, w_smem in zip(accs, w_smems):
                    if not split_rows:
                        if transpose_rhs:
                            w_smem = w_smem.at[pl.ds(wg * bn, bn)]
                        else:
                            w_smem = w_smem.at[:, pl.ds(wg * bn, bn)]
                    plgpu.wgmma(acc_ref, lhs, w_smem.transpose((1, 0)) if transpose_rhs else w_smem)
                # Keep one step of wgmma in flight; its tiles are released one step late.
                plgpu.wgmma_wait(1)
                return accs

            def compute_context(run_pipeline):
                # Scale vectors land in shared memory while the main loop runs.
                if has_lhs_scale:
                    plgpu.copy_gmem_to_smem(
                        lhs_scale_gmem.at[pl.ds(tile_start + row0, wg_m)], row_scale_smem.at[wg], row_barrier.at[wg]
                    )
                if has_rhs_scale:
                    band_cols = (col0, n_out + col0) if swiglu else (col0,)
                    for i, c in enumerate(band_cols):
                        plgpu.copy_gmem_to_smem(
                            rhs_scale_gmem.at[expert, pl.ds(c, bn)],
                            col_scale_smem.at[wg, i],
                            col_barrier.at[wg * num_acc + i],
                        )

                def acc_scope(*acc_refs):
                    run_pipeline(tuple(acc_refs))
                    return [r[...] for r in acc_refs]

                accs = pl.run_scoped(acc_scope, *(plgpu.ACC((wg_m, bn), jnp.float32) for _ in range(num_acc)))
                if has_rhs_scale:
                    scaled = []
                    for i, acc in enumerate(accs):
                        plgpu.barrier_wait(col_barrier.at[wg * num_acc + i])
                        col = plgpu.load(col_scale_smem.at[wg, i], layout=plgpu.Layout.WGMMA.reduce(0))  # [BN]
                        scaled.append(acc * lax.broadcast_in_dim(col, acc.shape, [1]))
                    accs = scaled
                if has_lhs_scale:
                    plgpu.barrier_wait(row_barrier.at[wg])
                    row = plgpu.load(row_scale_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))  # [WM]
                    accs = [acc * lax.broadcast_in_dim(row, acc.shape, [0]) for acc in accs]
                if swiglu:
                    gate, up = accs
                    out = gate / (1.0 + jnp.exp(-gate)) * up  # [WM, BN]
                else:
                    (out,) = accs
                store(out.astype(out_dtype))

            def run_expert():
                w_refs = [weight_band(expert, nj * cta_n)]
                if swiglu:
                    w_refs.append(weight_band(expert, n_out + nj * cta_n))
                make_pipeline(mma_body, compute_context)(
                    lhs_gmem.at[pl.ds(tile_start, bm)], *w_refs, allocations=pipeline_allocs
                )

            def run_zero_tail():
                @pl.when(wg < 2)
                def _():
                    zeros = plgpu.layout_cast(jnp.zeros((wg_m, bn), jnp.float32), plgpu.Layout.WGMMA)
                    store(zeros.astype(out_dtype))

            @pl.when(size > 0)
            def _():
                lax.cond(group < num_groups, run_expert, run_zero_tail)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _num_sms(interpret: bool) -> int:
    if interpret:
        return 2
    return getattr(jax.devices()[0], "core_count", 132)


@functools.partial(
    jax.jit,
    static_argnames=("transpose_rhs", "swiglu", "out_dtype", "config", "interpret"),
)
def grouped_matmul(
    lhs: jax.Array,  # [T, K]
    rhs: jax.Array,  # [E, N, K] or [E, K, N]
    group_sizes: jax.Array,  # [E]
    lhs_scale: jax.Array | None,  # [T]
    rhs_scale: jax.Array | None,  # [E, N]
    *,
    transpose_rhs: bool,
    swiglu: bool,
    out_dtype,
    config: Config,
    interpret: bool = False,
) -> jax.Array:
    t, k = lhs.shape
    e = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    n_out = n // 2 if swiglu else n
    reason = unsupported_reason(
        lhs.dtype, rhs.dtype, k, n, transpose_rhs=transpose_rhs, swiglu=swiglu, out_dtype=out_dtype, config=config
    )
    if reason is not None:
        raise ValueError(f"The Mosaic GPU grouped matmul cannot run this problem: {reason}.")
    tasks = row_tasks(group_sizes, t, config.block_m, align=ROW_ALIGN)
    # The lhs TMA descriptor is tiled by 8 rows, so T must be a multiple of 8 (a copy otherwise);
    # the GPU interpreter does not model TMA's zero fill of out-of-bounds rows.
    pad_rows = -t % ROW_ALIGN + (config.block_m if interpret else 0)
    if pad_rows:
        lhs = jnp.pad(lhs, ((0, pad_rows), (0, 0)))  # [T + pad, K]
    operands = [tasks.group, tasks.start, tasks.offset, tasks.size, lhs, rhs]
    if lhs_scale is not None:
        operands.append(jnp.pad(lhs_scale.astype(jnp.float32), (0, config.block_m)))  # [T + BM]
    if rhs_scale is not None:
        operands.append(rhs_scale.astype(jnp.float32))
    stages, out_slots = smem_plan(
        config, lhs.dtype, out_dtype, swiglu, (lhs_scale is not None, rhs_scale is not None)
    )
    body = functools.partial(
        _kernel,
        num_groups=e,
        config=config,
        stages=stages,
        out_slots=out_slots,
        transpose_rhs=transpose_rhs,
        swiglu=swiglu,
        has_lhs_scale=lhs_scale is not None,
        has_rhs_scale=rhs_scale is not None,
    )
    num_tiles = tasks.num_tasks * (n_out // _tile_shape(config, swiglu)[1])
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((t, n_out), out_dtype),
        grid=(min(_num_sms(interpret), num_tiles),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name="grouped_matmul_swiglu_mosaic" if swiglu else "grouped_matmul_mosaic",
    )
    return kernel(*operands)
