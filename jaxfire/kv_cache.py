"""The key/value cache: one buffer per layer, so every step updates each in place (the cache is donated).

Dimensions: L layers, B sequences (slots), S cache positions, G key/value heads, K head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxfire.config import Config


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: list[jax.Array]  # L x [B, S, G, K]
    v: list[jax.Array]  # L x [B, S, G, K]
    lengths: jax.Array  # [B] int32: positions filled per sequence; the next token goes at lengths[b]

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_length(self) -> int:
        return self.k[0].shape[1]


def init_cache(config: Config, batch_size: int, max_length: int, dtype: Any = jnp.bfloat16) -> KVCache:
    shape = (batch_size, max_length, config.num_kv_heads, config.head_dim)
    return KVCache(
        k=[jnp.zeros(shape, dtype) for _ in range(config.num_layers)],
        v=[jnp.zeros(shape, dtype) for _ in range(config.num_layers)],
        lengths=jnp.zeros((batch_size,), jnp.int32),
    )


def write(buf: jax.Array, new: jax.Array, positions: jax.Array, counts: jax.Array) -> jax.Array:
    """Writes new[b, t] at buf[b, positions[b, t]] for t < counts[b]; other tokens are dropped.

    Dropping instead of clamping means a padded token can never overwrite a valid entry, even when a
    sequence's padded positions run past the end of the cache.
    """
    # buf: [B, S, G, K], new: [B, T, G, K], positions: [B, T], counts: [B]
    t = new.shape[1]
    valid = jnp.arange(t)[None, :] < counts[:, None]  # [B, T]
    index = jnp.where(valid, positions, buf.shape[1])  # out of range -> dropped
    rows = jnp.arange(buf.shape[0])[:, None]
    return buf.at[rows, index].set(new.astype(buf.dtype), mode="drop")
