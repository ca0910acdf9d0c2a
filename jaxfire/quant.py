"""The matmul helpers every weight goes through.

Model code calls `dense` for plain projections and `grouped` for expert projections and never looks at
a weight's dtype: what a weight is (a plain array today, an FP8 array with scales later) is decided
here, in one place.

Dimensions: T tokens, D / K input width, N output width, E experts.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def dense(x: jax.Array, w: Any) -> jax.Array:
    """x @ w.T for a weight stored [N, K]; returns x's dtype."""
    # x: [..., K], w: [N, K] -> [..., N]
    return jnp.einsum("...k,nk->...n", x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def grouped(x: jax.Array, w: Any, group_sizes: jax.Array) -> jax.Array:
    """Per-group x @ w[e].T over rows sorted by expert; w is [E, N, K]; rows past sum(group_sizes) are zero."""
    # x: [T, K], w: [E, N, K] -> [T, N]
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([1], [2]), ([], [])),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[0],
    )
    out = jax.lax.ragged_dot_general(x, w.astype(x.dtype), group_sizes, dims, preferred_element_type=jnp.float32)
    return out.astype(x.dtype)
