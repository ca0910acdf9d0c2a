"""Pure-jnp grouped matmul: `jax.lax.ragged_dot` plus the FP8 scales, always available.

Shapes: T rows (sorted by expert), K contraction, N output columns, E experts, F expert width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _row_groups(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    # Rows past sum(group_sizes) get the last expert; their product is zero anyway.
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))  # [E]
    rows = jnp.arange(num_rows, dtype=jnp.int32)  # [T]
    return jnp.minimum(jnp.searchsorted(ends, rows, side="right"), group_sizes.shape[0] - 1)  # [T]


def _ragged_f32(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, transpose_rhs: bool) -> jax.Array:
    if lhs.dtype != rhs.dtype:
        # Weight-only fp8: e4m3 values are exact in bf16.
        lhs, rhs = lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16)
    if not transpose_rhs:
        return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)  # [T, N]
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((1,), (2,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0]
    )
    return jax.lax.ragged_dot_general(lhs, rhs, group_sizes, dims, preferred_element_type=jnp.float32)  # [T, N]


def grouped_matmul_f32(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    lhs_scale: jax.Array | None = None,
    rhs_scale: jax.Array | None = None,
    transpose_rhs: bool = False,
) -> jax.Array:
    """The scaled grouped product in float32, before the cast to the output type."""
    out = _ragged_f32(lhs, rhs, group_sizes, transpose_rhs)  # [T, N]
    if lhs_scale is not None:
        out = out * lhs_scale.astype(jnp.float32)[:, None]
    if rhs_scale is not None:
        out = out * rhs_scale.astype(jnp.float32)[_row_groups(group_sizes, lhs.shape[0])]  # [T, N]
    return out


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    lhs_scale: jax.Array | None = None,
    rhs_scale: jax.Array | None = None,
    transpose_rhs: bool = False,
    preferred_element_type=jnp.bfloat16,
) -> jax.Array:
    out = grouped_matmul_f32(
        lhs, rhs, group_sizes, lhs_scale=lhs_scale, rhs_scale=rhs_scale, transpose_rhs=transpose_rhs
    )
    return out.astype(preferred_element_type)


def split_gate_up(rhs: jax.Array, rhs_scale: jax.Array | None, transpose_rhs: bool):
    """Gate (first F output channels) and up (next F) halves of a stacked [E, 2F, K] / [E, K, 2F]."""
    f = rhs.shape[1 if transpose_rhs else 2] // 2
    if transpose_rhs:
        gate, up = rhs[:, :f, :], rhs[:, f:, :]
    else:
        gate, up = rhs[:, :, :f], rhs[:, :, f:]
    if rhs_scale is None:
        return (gate, None), (up, None)
    return (gate, rhs_scale[:, :f]), (up, rhs_scale[:, f:])


def grouped_matmul_swiglu(
    lhs: jax.Array,
    rhs_gate_up: jax.Array,
    group_sizes: jax.Array,
    *,
    lhs_scale: jax.Array | None = None,
    rhs_scale: jax.Array | None = None,
    transpose_rhs: bool = False,
    preferred_element_type=jnp.bfloat16,
) -> jax.Array:
    (gate_w, gate_s), (up_w, up_s) = split_gate_up(rhs_gate_up, rhs_scale, transpose_rhs)
    kw = dict(lhs_scale=lhs_scale, transpose_rhs=transpose_rhs)
    gate = grouped_matmul_f32(lhs, gate_w, group_sizes, rhs_scale=gate_s, **kw)  # [T, F]
    up = grouped_matmul_f32(lhs, up_w, group_sizes, rhs_scale=up_s, **kw)  # [T, F]
    return (jax.nn.silu(gate) * up).astype(preferred_element_type)

