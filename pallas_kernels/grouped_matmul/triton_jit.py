"""Grouped matmul as a kernel written in Triton itself (`@triton.jit`), launched through jax-triton
(`pallas_kernels.triton_call`): `triton.py`'s algorithm, tiles, grid and configs without Pallas.

Shapes: T rows (sorted by expert), K contraction, N weight output columns, E experts, F swiglu
width (N = 2F), P row tasks, S K splits, BM/BN/BK block sizes, R a task's rows as a tile (BM; for
the multiply-add kernel BM rounded up to a power of two).

As in `triton.py`: one program computes an [R, BN] output tile of one row task (rows of one
expert, tiling.py) and streams that expert's [BN, K] weight band once, BK columns per pipelined
step; `Config.split_k` programs share a band's K range and write f32 partial sums [S, T, N or 2F]
that one XLA reduction adds up (and applies swiglu to); `Config.gemv` multiplies without the MMA
units, per row over [BN, BK] f32 weight tiles. Pointers come from the row-major arrays' strides
(constexprs, as the shapes are static), so both weight layouts share the code; each weight tile is
read in memory order, as the Pallas kernel reads it. Weight-only fp8 is upcast to bf16 in registers
(exact for e4m3); e4m3 x e4m3 goes to the MMA as fp8, accumulated in f32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from pallas_kernels import triton_call
from pallas_kernels.grouped_matmul.config import Config
from pallas_kernels.grouped_matmul.tiling import max_row_tasks, row_tasks


@triton.jit
def _kernel(
    group_ptr,  # [P] int32
    start_ptr,  # [P] int32
    size_ptr,  # [P] int32
    lhs_ptr,  # [T, K]
    rhs_ptr,  # [E, N, K] or [E, K, N] (STRIDE_RN and STRIDE_RK tell which)
    lhs_scale_ptr,  # [T] f32 ([1], unread, without HAS_LHS_SCALE)
    rhs_scale_ptr,  # [E, N] f32 ([1], unread, without HAS_RHS_SCALE)
    out_ptr,  # [T, N or F], or f32 partial sums [S, T, N or 2F] when SPLIT_K > 1
    K: tl.constexpr, N_OUT: tl.constexpr, NUM_GROUPS: tl.constexpr,
    STRIDE_LT: tl.constexpr, STRIDE_RE: tl.constexpr, STRIDE_RN: tl.constexpr, STRIDE_RK: tl.constexpr,
    STRIDE_SE: tl.constexpr, STRIDE_OS: tl.constexpr, STRIDE_OT: tl.constexpr,
    BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, SWAP_AB: tl.constexpr, GEMV: tl.constexpr, SWIGLU: tl.constexpr,
    HAS_LHS_SCALE: tl.constexpr, HAS_RHS_SCALE: tl.constexpr, FP8_DOT: tl.constexpr,
):
    j = tl.program_id(0)  # column band
    p = tl.program_id(1)  # row task
    split = tl.program_id(2)  # share of K (0 on a grid of two axes)
    group = tl.load(group_ptr + p)
    start = tl.load(start_ptr + p)
    size = tl.load(size_ptr + p)
    if size > 0:
        # The zero-filled tail group (E) runs no K steps and so reads no weights. (Integer
        # arithmetic, not a select: the loop needs an i32 bound.)
        expert = tl.minimum(group, NUM_GROUPS - 1)
        steps: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
        per_split: tl.constexpr = (steps + SPLIT_K - 1) // SPLIT_K
        first = split * per_split
        num_steps = tl.minimum(NUM_GROUPS - group, 1) * tl.maximum(tl.minimum(per_split, steps - first), 0)

        rows = tl.arange(0, ROWS)
        row_valid = rows < size  # [R]
        cols = j * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN], of gate for swiglu
        col_valid = cols < N_OUT
        ks = tl.arange(0, BLOCK_K)
        w_cols = rhs_ptr + expert.to(tl.int64) * STRIDE_RE + cols * STRIDE_RN  # [BN]
        UP: tl.constexpr = N_OUT * STRIDE_RN  # up's weights follow gate's
        MASK_W: tl.constexpr = N_OUT % BLOCK_N != 0 or K % BLOCK_K != 0
        # A weight tile is [BN, BK], read by the MMA transposed, except that the MMA reads an N-major
        # one ([E, K, N]) as [BK, BN]: in memory order, so the pipeline stages it in shared memory
        # (through a transpose it stays in registers). The multiply-add compiles alike either way.
        W_BY_K: tl.constexpr = not GEMV and STRIDE_RK != 1
        # One row and one band keep the multiply-add products [BN, BK] in registers and sum over K
        # once at the end; more would not fit, so those sum each step (row r into column r).
        DEFER: tl.constexpr = GEMV and BLOCK_M == 1 and not SWIGLU
        if DEFER:
            gate = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)  # [BN, BK]
        elif GEMV or SWAP_AB:  # the MMA's M side is BN with SWAP_AB: wide even when few rows are live
            gate = tl.zeros((BLOCK_N, ROWS), tl.float32)  # [BN, R]
        else:
            gate = tl.zeros((ROWS, BLOCK_N), tl.float32)  # [R, BN]
        up = tl.zeros_like(gate)
        for i in range(first, first + num_steps):
            k = i * BLOCK_K + ks  # [BK]
            k_valid = k < K
            if W_BY_K:
                w_ptrs = w_cols[None, :] + k[:, None] * STRIDE_RK  # [BK, BN]
                w_mask = k_valid[:, None] & col_valid[None, :]
            else:
                w_ptrs = w_cols[:, None] + k[None, :] * STRIDE_RK  # [BN, BK]
                w_mask = col_valid[:, None] & k_valid[None, :]
            w_gate = tl.load(w_ptrs, mask=w_mask if MASK_W else None, other=0.0 if MASK_W else None)  # as w_ptrs
            if SWIGLU:
                w_up = tl.load(w_ptrs + UP, mask=w_mask if MASK_W else None, other=0.0 if MASK_W else None)
            if GEMV:
                w_gate = w_gate.to(tl.float32)
                if SWIGLU:
                    w_up = w_up.to(tl.float32)
                for r in tl.static_range(BLOCK_M):
                    x = tl.load(lhs_ptr + (start + r) * STRIDE_LT + k, mask=(r < size) & k_valid, other=0.0)
                    x = x.to(tl.float32)[None, :]  # [1, BK]
                    if DEFER:
                        gate += w_gate * x
                    else:
                        gate += tl.where(rows[None, :] == r, tl.sum(w_gate * x, axis=1)[:, None], 0.0)
                        if SWIGLU:
                            up += tl.where(rows[None, :] == r, tl.sum(w_up * x, axis=1)[:, None], 0.0)
            else:
                x_ptrs = lhs_ptr + (start + rows)[:, None] * STRIDE_LT + k[None, :]
                x = tl.load(x_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)  # [R, BK]
                # e4m3 -> bf16 is exact. Hopper's fp8 wgmma (tiles of 64 rows or more; Triton runs
                # smaller ones on the f16 MMA, upcasting both) adds with fewer bits than f32 inside
                # an instruction sequence: max_num_imprecise_acc=BK adds each K step's sum into the
                # f32 accumulator.
                if not FP8_DOT:
                    x = x.to(tl.bfloat16)
                    w_gate = w_gate.to(tl.bfloat16)
                    if SWIGLU:
                        w_up = w_up.to(tl.bfloat16)
                if SWAP_AB:
                    gate = tl.dot(tl.trans(w_gate) if W_BY_K else w_gate, tl.trans(x), gate,
                                  max_num_imprecise_acc=BLOCK_K)  # [BN, R]
                    if SWIGLU:
                        up = tl.dot(tl.trans(w_up) if W_BY_K else w_up, tl.trans(x), up,
                                    max_num_imprecise_acc=BLOCK_K)
                else:
                    gate = tl.dot(x, w_gate if W_BY_K else tl.trans(w_gate), gate,
                                  max_num_imprecise_acc=BLOCK_K)  # [R, BN]
                    if SWIGLU:
                        up = tl.dot(x, w_up if W_BY_K else tl.trans(w_up), up, max_num_imprecise_acc=BLOCK_K)
        if DEFER:
            gate = tl.sum(gate, axis=1)[:, None]  # [BN, 1]
        if GEMV or SWAP_AB:
            gate = tl.trans(gate)
            up = tl.trans(up)  # each [R, BN] f32

        if HAS_RHS_SCALE:
            scale_ptrs = rhs_scale_ptr + expert * STRIDE_SE + cols
            gate *= tl.load(scale_ptrs, mask=col_valid, other=0.0)[None, :]
            if SWIGLU:
                up *= tl.load(scale_ptrs + N_OUT, mask=col_valid, other=0.0)[None, :]
        if HAS_LHS_SCALE:
            row_scale = tl.load(lhs_scale_ptr + start + rows, mask=row_valid, other=0.0)[:, None]  # [R, 1]
            gate *= row_scale
            up *= row_scale
        mask = row_valid[:, None] & col_valid[None, :]
        if SPLIT_K > 1:  # partial sums; the wrapper adds them up and applies swiglu
            out_ptrs = out_ptr + split * STRIDE_OS + (start + rows)[:, None] * STRIDE_OT + cols[None, :]
            tl.store(out_ptrs, gate, mask=mask)
            if SWIGLU:
                tl.store(out_ptrs + N_OUT, up, mask=mask)
        else:
            if SWIGLU:
                gate = gate * tl.sigmoid(gate) * up
            out_ptrs = out_ptr + (start + rows)[:, None] * STRIDE_OT + cols[None, :]
            tl.store(out_ptrs, gate.to(out_ptr.dtype.element_ty), mask=mask)


def unsupported_reason(config: Config) -> str | None:
    """Why this kernel cannot run `config`, or None. (Any dtype pair, layout, N and K run.)"""
    for name in ("block_n", "block_k") + (() if config.gemv else ("block_m",)):
        v = getattr(config, name)
        if v & (v - 1):
            return f"Config.{name}={v} is not a power of two (a Triton block)"
    if not config.gemv and config.block_k < 16:
        return f"the MMA takes at least 16 of K a step, got Config.block_k={config.block_k}"
    return None


def _launch(lhs, rhs, lhs_scale, rhs_scale, *, transpose_rhs, swiglu, out_dtype, config):
    """The grid, output shape and constexprs of one launch, from shapes alone."""
    t, k = lhs.shape
    e = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    n_out = n // 2 if swiglu else n
    split = config.split_k
    grid = (triton.cdiv(n_out, config.block_n), max_row_tasks(t, e, config.block_m)) + ((split,) if split > 1 else ())
    width = 2 * n_out if swiglu and split > 1 else n_out
    if split > 1:
        out_shape = jax.ShapeDtypeStruct((split, t, width), jnp.float32)
    else:
        out_shape = jax.ShapeDtypeStruct((t, width), out_dtype)
    fp8 = jnp.dtype(jnp.float8_e4m3fn)
    params = dict(
        K=k, N_OUT=n_out, NUM_GROUPS=e, STRIDE_LT=k, STRIDE_RE=n * k, STRIDE_RN=k if transpose_rhs else 1,
        STRIDE_RK=1 if transpose_rhs else n, STRIDE_SE=n, STRIDE_OS=t * width, STRIDE_OT=width,
        BLOCK_M=config.block_m, ROWS=triton.next_power_of_2(config.block_m), BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, SPLIT_K=split, SWAP_AB=config.swap_ab, GEMV=config.gemv, SWIGLU=swiglu,
        HAS_LHS_SCALE=lhs_scale is not None, HAS_RHS_SCALE=rhs_scale is not None,
        # The fp8 MMA takes 32 of K a step; fewer go to it upcast to bf16, as weight-only fp8 does.
        FP8_DOT=jnp.dtype(lhs.dtype) == fp8 and jnp.dtype(rhs.dtype) == fp8 and config.block_k >= 32)
    return grid, out_shape, params


def _scale_or_stub(scale):
    return jnp.zeros((1,), jnp.float32) if scale is None else scale.astype(jnp.float32)


@functools.partial(
    jax.jit,
    static_argnames=("transpose_rhs", "swiglu", "out_dtype", "config", "interpret", "launcher"),
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
    launcher: str = "xla",
) -> jax.Array:
    t = lhs.shape[0]
    grid, out_shape, params = _launch(lhs, rhs, lhs_scale, rhs_scale, transpose_rhs=transpose_rhs, swiglu=swiglu,
                                      out_dtype=out_dtype, config=config)
    tasks = row_tasks(group_sizes, t, config.block_m)
    out = triton_call.call(
        _kernel, tasks.group, tasks.start, tasks.size, lhs, rhs, _scale_or_stub(lhs_scale), _scale_or_stub(rhs_scale),
        out_shape=out_shape, grid=grid, num_warps=config.num_warps, num_stages=config.num_stages,
        interpret=interpret, launcher=launcher, name="grouped_matmul_swiglu_triton_jit" if swiglu else "grouped_matmul_triton_jit",
        **params)
    if config.split_k == 1:
        return out
    out = out.sum(axis=0)  # [T, N or 2F] f32
    if swiglu:
        n_out = params["N_OUT"]
        gate, up = out[:, :n_out], out[:, n_out:]
        out = gate * jax.nn.sigmoid(gate) * up
    return out.astype(out_dtype)


def compile_for(lhs, rhs, group_sizes, lhs_scale, rhs_scale, *, transpose_rhs: bool, swiglu: bool, out_dtype,
                config: Config, capability: int = 90):
    """Compiles the kernel `grouped_matmul` launches for these arguments (arrays or
    jax.ShapeDtypeStruct) for a GPU of compute `capability`, on any machine: Triton's CompiledKernel."""
    del group_sizes  # the row tasks' length is known from the shapes
    grid, out_shape, params = _launch(lhs, rhs, lhs_scale, rhs_scale, transpose_rhs=transpose_rhs, swiglu=swiglu,
                                      out_dtype=out_dtype, config=config)
    tasks = jax.ShapeDtypeStruct((grid[1],), jnp.int32)
    scale = jax.ShapeDtypeStruct((1,), jnp.float32)
    scales = [scale if s is None else jax.ShapeDtypeStruct(s.shape, jnp.float32) for s in (lhs_scale, rhs_scale)]
    return triton_call.compile_for(_kernel, tasks, tasks, tasks, lhs, rhs, *scales, out_shape=out_shape,
                                   num_warps=config.num_warps, num_stages=config.num_stages, capability=capability,
                                   **params)
