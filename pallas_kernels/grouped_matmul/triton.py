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
"""

from __future__ import annotations

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


def _kernel(
    group_ref,  # [P] int32
    start_ref,  # [P] int32
    size_ref,  # [P] int32
    lhs_ref,  # [T, K]
    rhs_ref,  # [E, N, K] (transpose_rhs) or [E, K, N]
    *refs,  # lhs_scale [T] f32?, rhs_scale [E, N] f32?, out [T, N or F]
    num_groups: int,
    block_m: int,
    block_n: int,
    block_k: int,
    transpose_rhs: bool,
    has_lhs_scale: bool,
    has_rhs_scale: bool,
    swiglu: bool,
    swap_ab: bool,
    split_k: int,
):
    refs = list(refs)
    lhs_scale_ref = refs.pop(0) if has_lhs_scale else None
    rhs_scale_ref = refs.pop(0) if has_rhs_scale else None
    (out_ref,) = refs  # [T, N or F], or f32 partial sums [S, T, N or 2F] when split_k > 1
    k = lhs_ref.shape[1]
    n_out = out_ref.shape[-1] // 2 if swiglu and split_k > 1 else out_ref.shape[-1]
    # Column offsets of the weight bands this program multiplies: gate and up for swiglu.
    band_offsets = (0, n_out) if swiglu else (0,)

    j, p = pl.program_id(0), pl.program_id(1)
    split = pl.program_id(2) if split_k > 1 else 0  # this program's share of K
    group, start, size = group_ref[p], start_ref[p], size_ref[p]
    row_valid = jnp.arange(block_m) < size  # [BM]
    cols = j * block_n + jnp.arange(block_n)  # [BN]
    col_valid = cols < n_out  # [BN]
    mask_cols = n_out % block_n != 0
    mask_k = k % block_k != 0
    compute_dtype = jnp.bfloat16  # e4m3 -> bf16 is exact; the MMA accumulates in f32

    @pl.when(size > 0)
    def _():
        expert = jnp.minimum(group, num_groups - 1)
        # This program's share of the K steps; the zero-filled tail group runs none and so reads no
        # weights. (Integer arithmetic, not a select: Triton's scf.for needs an i32 bound.)
        per_split = pl.cdiv(pl.cdiv(k, block_k), split_k)
        first = split * per_split
        num_steps = jnp.minimum(num_groups - group, 1) * jnp.maximum(
            jnp.minimum(per_split, pl.cdiv(k, block_k) - first), 0)

        def step(i, accs):
            k0 = pl.multiple_of(i * block_k, block_k)
            k_valid = k0 + jnp.arange(block_k) < k  # [BK]
            x = _load(
                lhs_ref.at[pl.ds(start, block_m), pl.ds(k0, block_k)],
                row_valid[:, None] & k_valid[None, :],
                compute_dtype,
            )  # [BM, BK]
            new = []
            for acc, offset in zip(accs, band_offsets):
                c0 = offset + j * block_n
                if transpose_rhs:
                    w_mask = None
                    if mask_cols or mask_k:
                        w_mask = col_valid[:, None] & k_valid[None, :]
                    w = _load(
                        rhs_ref.at[expert, pl.ds(c0, block_n), pl.ds(k0, block_k)], w_mask, compute_dtype
                    )  # [BN, BK]
                    dims = (((1,), (1,)), ((), ()))
                else:
                    w_mask = None
                    if mask_cols or mask_k:
                        w_mask = k_valid[:, None] & col_valid[None, :]
                    w = _load(
                        rhs_ref.at[expert, pl.ds(k0, block_k), pl.ds(c0, block_n)], w_mask, compute_dtype
                    )  # [BK, BN]
                    dims = (((1,), (0,)), ((), ())) if not swap_ab else (((0,), (1,)), ((), ()))
                if swap_ab:
                    # Weights as the M operand: a wide MMA even when only a few rows are live.
                    new.append(acc + jax.lax.dot_general(w, x, dims, preferred_element_type=jnp.float32))  # [BN, BM]
                else:
                    new.append(acc + jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32))  # [BM, BN]
            return tuple(new)

        acc_shape = (block_n, block_m) if swap_ab else (block_m, block_n)
        zeros = tuple(jnp.zeros(acc_shape, jnp.float32) for _ in band_offsets)
        accs = jax.lax.fori_loop(first, first + num_steps, step, zeros)
        if swap_ab:
            accs = tuple(acc.T for acc in accs)  # each [BM, BN] f32

        if has_rhs_scale:
            accs = tuple(
                acc
                * pltriton.load(
                    rhs_scale_ref.at[expert, pl.ds(offset + j * block_n, block_n)],
                    mask=col_valid if mask_cols else None,
                    other=0.0 if mask_cols else None,
                )[None, :]
                for acc, offset in zip(accs, band_offsets)
            )
        if has_lhs_scale:
            row_scale = pltriton.load(
                lhs_scale_ref.at[pl.ds(start, block_m)], mask=row_valid, other=0.0
            )  # [BM]
            accs = tuple(acc * row_scale[:, None] for acc in accs)
        mask = row_valid[:, None] & col_valid[None, :]
        if split_k > 1:  # partial sums; the wrapper adds them up and applies swiglu
            for acc, offset in zip(accs, band_offsets):
                pltriton.store(
                    out_ref.at[split, pl.ds(start, block_m), pl.ds(offset + j * block_n, block_n)],
                    acc, mask=mask,
                )
            return
        if swiglu:
            gate, up = accs
            out = gate * jax.nn.sigmoid(gate) * up  # [BM, BN]
        else:
            (out,) = accs
        pltriton.store(out_ref.at[pl.ds(start, block_m), pl.ds(j * block_n, block_n)], out.astype(out_ref.dtype),
                       mask=mask)


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
        block_m=config.block_m,
        block_n=config.block_n,
        block_k=config.block_k,
        transpose_rhs=transpose_rhs,
        has_lhs_scale=lhs_scale is not None,
        has_rhs_scale=rhs_scale is not None,
        swiglu=swiglu,
        swap_ab=config.swap_ab,
        split_k=split,
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
