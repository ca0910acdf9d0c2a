"""The merge of split attention (flash-decoding): partial outputs, each normalised on its own, weighed by
their log-sum-exp. One rule for every attention kernel that splits its keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def combine(
    o: jax.Array,  # [..., J, ...rows, K] f32, each split normalised on its own
    lse: jax.Array,  # [..., J, ...rows] f32, -inf for an empty split
    axis: int = 0,
) -> jax.Array:  # o without the J axis
    top = jnp.max(lse, axis=axis, keepdims=True)
    w = jnp.exp(lse - jnp.where(jnp.isfinite(top), top, 0.0))  # like lse
    total = jnp.sum(w, axis=axis)
    out = jnp.sum(w[..., None] * o, axis=axis)
    return out / jnp.where(total > 0, total, 1.0)[..., None]
