"""Which key steps a share of a row's span reads: one rule for the Triton and the Mosaic GPU kernels."""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl


def key_steps(lo, hi, span: int, part, parts):
    """Key steps [start, stop) of share `part` of `parts` of a span [lo, hi) read W = `span` positions
    a step from a multiple of W (stop <= start: the share has none)."""
    first = lo // span
    num_steps = jnp.maximum(pl.cdiv(hi, span) - first, 0)
    per_part = pl.cdiv(num_steps, parts)
    start = first + part * per_part
    return start, jnp.minimum(start + per_part, first + num_steps)
