"""Grouped matmul as a Pallas Triton kernel: the bandwidth-bound decode path and the general fallback.

Shapes: T rows (sorted by expert), K contraction, N weight output columns, E experts, F swiglu
width (N = 2F), P row tasks, BM/BN/BK block sizes.

One program computes a [BM, BN] output tile of one row task (rows of one expert, see tiling.py)
and streams that expert's [BN, K] weight band once, BK columns per pipelined step. When bands x
tasks are too few to keep every multiprocessor reading (a dense projection of one token: N=1024
gives 8 bands), `Config.split_k` programs share each band's K range; each writes f32 partial sums
[S, T, N] (gate and up side by side for swiglu) that one XLA reduction adds up (and applies swiglu). With few rows
per expert a single row task covers all of an expert's rows, so every weight byte of an active
expert is read exactly once; empty experts have no tasks and their weights are never read.
FP8 operands are upcast to bf16 in registers (exact for e4m3) and the scales are applied to the
f32 accumulator.

With `Config.gemv` a program multiplies without the MMA units: each weight tile is upcast to f32 and
multiplied into each of its task's `block_m` rows (one to four: a decode step's rows of one expert),
the products summed over K in registers. An MMA needs 16 or 64 rows, so a one-row product pays for
the padding in register traffic and layout changes; the multiply-add path streams weights only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.grouped_matmul.config import Config
from pallas_kernels.grouped_matmul.tiling import row_tasks


def _load(ref, mask: jax.Array | None, dtype) -> jax.Array:
    """Loads a tile, upcast, with masked-off elements zero (Triton cannot fill fp8 with `other`)."""
    if mask is None:
        return ref[...].astype(dtype)
    return jnp.where(mask, pltriton.load(ref, mask=mask).astype(dtype), 0)


@dataclasses.dataclass(frozen=True)
class _Program:
    """What a program of either kernel reads off its grid position (traced values, built per kernel)."""

    lhs_scale_ref: object  # [T] f32 or None
    rhs_scale_ref: object  # [E, N] f32 or None
    out_ref: object  # [T, N or F], or f32 partial sums [S, T, N or 2F] when split_k > 1
    band_offsets: tuple[int, ...]  # weight column offsets this program multiplies: gate and up for swiglu
    j: jax.Array  # column band
    split: jax.Array | int  # this program's share of K
    group: jax.Array
    start: jax.Array  # first row of the task
    size: jax.Array
    col_valid: jax.Array  # [BN]
    mask_cols: bool  # a band can run past N
    mask_k: bool  # a K step can run past K


def _program(group_ref, start_ref, size_ref, lhs_ref, refs, *, has_lhs_scale, has_rhs_scale, swiglu, split_k,
             block_n, block_k) -> _Program:
    refs = list(refs)
    lhs_scale_ref = refs.pop(0) if has_lhs_scale else None
    rhs_scale_ref = refs.pop(0) if has_rhs_scale else None
    (out_ref,) = refs
    n_out = out_ref.shape[-1] // 2 if swiglu and split_k > 1 else out_ref.shape[-1]
    j, p = pl.program_id(0), pl.program_id(1)
    return _Program(
        lhs_scale_ref=lhs_scale_ref, rhs_scale_ref=rhs_scale_ref, out_ref=out_ref,
        band_offsets=(0, n_out) if swiglu else (0,), j=j, split=pl.program_id(2) if split_k > 1 else 0,
        group=group_ref[p], start=start_ref[p], size=size_ref[p],
        col_valid=j * block_n + jnp.arange(block_n) < n_out, mask_cols=n_out % block_n != 0,
        mask_k=lhs_ref.shape[1] % block_k != 0)


def _k_steps(prog: _Program, k: int, block_k: int, split_k: int, num_groups: int):
    """The expert whose weights to read, and this program's first K step and step count; the
    zero-filled tail group runs none and so reads no weights. (Integer arithmetic, not a select:
    Triton's scf.for needs an i32 bound.)"""
    expert = jnp.minimum(prog.group, num_groups - 1)
    per_split = pl.cdiv(pl.cdiv(k, block_k), split_k)
    first = prog.split * per_split
    num_steps = jnp.minimum(num_groups - prog.group, 1) * jnp.maximum(
        jnp.minimum(per_split, pl.cdiv(k, block_k) - first), 0)
    return expert, first, num_steps


def _weight_tile(prog: _Program, rhs_ref, expert, offset: int, k0, k_valid, *, transpose_rhs, block_n, block_k,
                 dtype) -> jax.Array:
    """One band's weights for one K step, upcast: [BN, BK] (transpose_rhs) or [BK, BN]."""
    c0 = offset + prog.j * block_n
    masked = prog.mask_cols or prog.mask_k
    if transpose_rhs:
        mask = prog.col_valid[:, None] & k_valid[None, :] if masked else None
        return _load(rhs_ref.at[expert, pl.ds(c0, block_n), pl.ds(k0, block_k)], mask, dtype)
    mask = k_valid[:, None] & prog.col_valid[None, :] if masked else None
    return _load(rhs_ref.at[expert, pl.ds(k0, block_k), pl.ds(c0, block_n)], mask, dtype)


def _column_scale(prog: _Program, expert, offset: int, block_n: int) -> jax.Array:
    """The band's per-output-channel weight scales [BN]."""
    return pltriton.load(
        prog.rhs_scale_ref.at[expert, pl.ds(offset + prog.j * block_n, block_n)],
        mask=prog.col_valid if prog.mask_cols else None,
        other=0.0 if prog.mask_cols else None,
    )


def _kernel(
    group_ref,  # [P] int32
    start_ref,  # [P] int32
    size_ref,  # [P] int32
    lhs_ref,  # [T, K]
    rhs_ref,  # [E, N, K] (transpose_rhs) or [E, K, N]
    *refs,  # lhs_scale [T] f32?, rhs_scale [E, N] f32?, out [T, N or F] or f32 partial sums [S, T, N or 2F]
    num_groups: int,
    config: Config,
    transpose_rhs: bool,
    has_lhs_scale: bool,
    has_rhs_scale: bool,
    swiglu: bool,
):
    prog = _program(group_ref, start_ref, size_ref, lhs_ref, refs, has_lhs_scale=has_lhs_scale,
                    has_rhs_scale=has_rhs_scale, swiglu=swiglu, split_k=config.split_k, block_n=config.block_n,
                    block_k=config.block_k)
    body = _gemv_program if config.gemv else _mma_program
    body(prog, lhs_ref, rhs_ref, num_groups=num_groups, config=config, transpose_rhs=transpose_rhs,
         has_lhs_scale=has_lhs_scale, has_rhs_scale=has_rhs_scale, swiglu=swiglu)


def _mma_program(prog: _Program, lhs_ref, rhs_ref, *, num_groups, config, transpose_rhs, has_lhs_scale,
                 has_rhs_scale, swiglu):
    """One output tile [BM, BN] of a row task on the MMA units."""
    block_m, block_n, block_k = config.block_m, config.block_n, config.block_k
    swap_ab, split_k = config.swap_ab, config.split_k
    k = lhs_ref.shape[1]
    start, j = prog.start, prog.j
    row_valid = jnp.arange(block_m) < prog.size  # [BM]
    compute_dtype = jnp.bfloat16  # e4m3 -> bf16 is exact; the MMA accumulates in f32

    @pl.when(prog.size > 0)
    def _():
        expert, first, num_steps = _k_steps(prog, k, block_k, split_k, num_groups)

        def step(i, accs):
            k0 = pl.multiple_of(i * block_k, block_k)
            k_valid = k0 + jnp.arange(block_k) < k  # [BK]
            x = _load(
                lhs_ref.at[pl.ds(start, block_m), pl.ds(k0, block_k)],
                row_valid[:, None] & k_valid[None, :],
                compute_dtype,
            )  # [BM, BK]
            if transpose_rhs:  # w: [BN, BK]
                dims = (((1,), (1,)), ((), ()))
            else:  # w: [BK, BN]
                dims = (((1,), (0,)), ((), ())) if not swap_ab else (((0,), (1,)), ((), ()))
            new = []
            for acc, offset in zip(accs, prog.band_offsets):
                w = _weight_tile(prog, rhs_ref, expert, offset, k0, k_valid, transpose_rhs=transpose_rhs,
                                 block_n=block_n, block_k=block_k, dtype=compute_dtype)
                if swap_ab:
                    # Weights as the M operand: a wide MMA even when only a few rows are live.
                    new.append(acc + jax.lax.dot_general(w, x, dims, preferred_element_type=jnp.float32))  # [BN, BM]
                else:
                    new.append(acc + jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32))  # [BM, BN]
            return tuple(new)

        acc_shape = (block_n, block_m) if swap_ab else (block_m, block_n)
        zeros = tuple(jnp.zeros(acc_shape, jnp.float32) for _ in prog.band_offsets)
        accs = jax.lax.fori_loop(first, first + num_steps, step, zeros)
        if swap_ab:
            accs = tuple(acc.T for acc in accs)  # each [BM, BN] f32

        if has_rhs_scale:
            accs = tuple(acc * _column_scale(prog, expert, offset, block_n)[None, :]
                         for acc, offset in zip(accs, prog.band_offsets))
        if has_lhs_scale:
            row_scale = pltriton.load(
                prog.lhs_scale_ref.at[pl.ds(start, block_m)], mask=row_valid, other=0.0
            )  # [BM]
            accs = tuple(acc * row_scale[:, None] for acc in accs)
        mask = row_valid[:, None] & prog.col_valid[None, :]
        if split_k > 1:  # partial sums; the wrapper adds them up and applies swiglu
            for acc, offset in zip(accs, prog.band_offsets):
                pltriton.store(
                    prog.out_ref.at[prog.split, pl.ds(start, block_m), pl.ds(offset + j * block_n, block_n)],
                    acc, mask=mask,
                )
            return
        if swiglu:
            gate, up = accs
            out = gate * jax.nn.sigmoid(gate) * up  # [BM, BN]
        else:
            (out,) = accs
        pltriton.store(prog.out_ref.at[pl.ds(start, block_m), pl.ds(j * block_n, block_n)],
                       out.astype(prog.out_ref.dtype), mask=mask)


def _gemv_program(prog: _Program, lhs_ref, rhs_ref, *, num_groups, config, transpose_rhs, has_lhs_scale,
                  has_rhs_scale, swiglu):
    """`_mma_program`'s tiles and K split without the MMA: per row a multiply-add over [BN, BK] weight tiles."""
    block_m, block_n, block_k, split_k = config.block_m, config.block_n, config.block_k, config.split_k
    k = lhs_ref.shape[1]
    start, size, j = prog.start, prog.size, prog.j
    k_axis = 1 if transpose_rhs else 0  # of a weight tile: [BN, BK] or [BK, BN]
    # One row and one band keep the products [BN, BK] in registers and sum over K once at the end;
    # more would not fit, so those sum each step.
    defer = block_m * len(prog.band_offsets) == 1

    @pl.when(size > 0)
    def _():
        expert, first, num_steps = _k_steps(prog, k, block_k, split_k, num_groups)

        def step(i, accs):  # accs[band][row]
            k0 = pl.multiple_of(i * block_k, block_k)
            k_valid = k0 + jnp.arange(block_k) < k  # [BK]
            rows = []
            for r in range(block_m):
                x = _load(lhs_ref.at[start + r, pl.ds(k0, block_k)], (r < size) & k_valid, jnp.float32)  # [BK]
                rows.append(x[None, :] if transpose_rhs else x[:, None])
            new = []
            for band, offset in zip(accs, prog.band_offsets):
                w = _weight_tile(prog, rhs_ref, expert, offset, k0, k_valid, transpose_rhs=transpose_rhs,
                                 block_n=block_n, block_k=block_k, dtype=jnp.float32)
                if defer:
                    new.append(tuple(acc + w * x for acc, x in zip(band, rows)))
                else:
                    new.append(tuple(acc + jnp.sum(w * x, axis=k_axis) for acc, x in zip(band, rows)))
            return tuple(new)

        shape = ((block_n, block_k) if transpose_rhs else (block_k, block_n)) if defer else (block_n,)
        zeros = tuple(tuple(jnp.zeros(shape, jnp.float32) for _ in range(block_m)) for _ in prog.band_offsets)
        accs = jax.lax.fori_loop(first, first + num_steps, step, zeros)
        if defer:
            accs = tuple(tuple(jnp.sum(acc, axis=k_axis) for acc in band) for band in accs)  # each [BN]

        for r in range(block_m):
            row = []
            for band, offset in zip(accs, prog.band_offsets):
                acc = band[r]  # [BN] f32
                if has_rhs_scale:
                    acc = acc * _column_scale(prog, expert, offset, block_n)
                if has_lhs_scale:
                    acc = acc * pltriton.load(prog.lhs_scale_ref.at[pl.ds(start + r, 1)],
                                              mask=jnp.full((1,), r, jnp.int32) < size, other=0.0)  # [1]
                row.append(acc)
            mask = (r < size) & prog.col_valid  # [BN]
            if split_k > 1:
                for acc, offset in zip(row, prog.band_offsets):
                    pltriton.store(prog.out_ref.at[prog.split, start + r, pl.ds(offset + j * block_n, block_n)], acc,
                                   mask=mask)
                continue
            if swiglu:
                gate, up = row
                out = gate * jax.nn.sigmoid(gate) * up
            else:
                (out,) = row
            pltriton.store(prog.out_ref.at[start + r, pl.ds(j * block_n, block_n)], out.astype(prog.out_ref.dtype),
                           mask=mask)


@functools.partial(
    jax.jit,
    static_argnames=("transpose_rhs", "swiglu", "out_dtype", "config", "interpret"),
)
def grouped_matmul(
    lhs: jax.Array,  # [T, K]
    rhs: jax.Array,  # [E, N, K] or [E, K, N]
    group_sizes: jax.Array,  # [E] rows per expert
    lhs_scale: jax.Array | None,  # [T]
    rhs_scale: jax.Array | None,  # [E, N]
    *,
    transpose_rhs: bool,
    swiglu: bool,
    out_dtype,
    config: Config,
    interpret: bool = False,
) -> jax.Array:
    k = lhs.shape[1]
    e = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    n_out = n // 2 if swiglu else n
    t = lhs.shape[0]
    tasks = row_tasks(group_sizes, t, config.block_m)
    split = config.split_k
    grid = (pl.cdiv(n_out, config.block_n), tasks.num_tasks) + ((split,) if split > 1 else ())
    if split > 1:
        out_shape = jax.ShapeDtypeStruct((split, t, 2 * n_out if swiglu else n_out), jnp.float32)
    else:
        out_shape = jax.ShapeDtypeStruct((t, n_out), out_dtype)
    operands = [tasks.group, tasks.start, tasks.size, lhs, rhs]
    if lhs_scale is not None:
        operands.append(lhs_scale.astype(jnp.float32))
    if rhs_scale is not None:
        operands.append(rhs_scale.astype(jnp.float32))
    kernel = functools.partial(
        _kernel,
        num_groups=e,
        config=config,
        transpose_rhs=transpose_rhs,
        has_lhs_scale=lhs_scale is not None,
        has_rhs_scale=rhs_scale is not None,
        swiglu=swiglu,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="grouped_matmul_swiglu_triton" if swiglu else "grouped_matmul_triton",
    )(*operands)
    if split == 1:
        return out
    out = out.sum(axis=0)  # [T, N or 2F] f32
    if swiglu:
        gate, up = out[:, :n_out], out[:, n_out:]
        out = gate * jax.nn.sigmoid(gate) * up
    return out.astype(out_dtype)
