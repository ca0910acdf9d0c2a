"""The key/value cache: one buffer per layer, so every step updates each in place (the cache is donated).

A cache is bf16 (or the model's dtype), or FP8: float8_e4m3fn values with one float32 scale per token
and KV head, set when the token is written (the layout `pallas_kernels.decode_attention` reads).

Dimensions: L layers, B sequences (slots), S cache positions, G key/value heads, K head dim.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxfire import quant
from jaxfire import sharding as S
from jaxfire.config import Config


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: list[jax.Array]  # L x [B, S, G, K]
    v: list[jax.Array]  # L x [B, S, G, K]
    lengths: jax.Array  # [B] int32: positions filled per sequence; the next token goes at lengths[b]
    k_scale: list[jax.Array] | None = None  # L x [B, S, G] float32, FP8 caches only
    v_scale: list[jax.Array] | None = None  # L x [B, S, G] float32, FP8 caches only

    @property
    def is_fp8(self) -> bool:
        return self.k_scale is not None

    def layer(self, i: int) -> "LayerCache":
        if self.is_fp8:
            return LayerCache(self.k[i], self.v[i], self.k_scale[i], self.v_scale[i])
        return LayerCache(self.k[i], self.v[i])

    @classmethod
    def from_layers(cls, layers: list["LayerCache"], lengths: jax.Array) -> "KVCache":
        fp8 = layers[0].k_scale is not None
        return cls(k=[c.k for c in layers], v=[c.v for c in layers], lengths=lengths,
                   k_scale=[c.k_scale for c in layers] if fp8 else None,
                   v_scale=[c.v_scale for c in layers] if fp8 else None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    k: jax.Array  # [B, S, G, K]
    v: jax.Array  # [B, S, G, K]
    k_scale: jax.Array | None = None  # [B, S, G]
    v_scale: jax.Array | None = None  # [B, S, G]

    def write(self, k: jax.Array, v: jax.Array, positions: jax.Array, counts: jax.Array) -> "LayerCache":
        """Writes new keys/values at `positions`, quantizing them per token and head for an FP8 cache."""
        # k, v: [B, T, G, K]
        if self.k_scale is None:
            return LayerCache(write(self.k, k, positions, counts), write(self.v, v, positions, counts))
        kq, ks = quant.quantize(k, axis=-1)
        vq, vs = quant.quantize(v, axis=-1)
        return LayerCache(write(self.k, kq, positions, counts), write(self.v, vq, positions, counts),
                          write(self.k_scale, ks, positions, counts), write(self.v_scale, vs, positions, counts))

    def read(self, dtype: Any) -> tuple[jax.Array, jax.Array]:
        """The whole cache dequantized to `dtype` (the reference path; kernels read FP8 directly)."""
        if self.k_scale is None:
            return self.k.astype(dtype), self.v.astype(dtype)
        k = self.k.astype(jnp.float32) * self.k_scale[..., None]
        v = self.v.astype(jnp.float32) * self.v_scale[..., None]
        return k.astype(dtype), v.astype(dtype)


# Logical axes of the cache arrays, placed on a mesh by `jaxfire.sharding.RULES`.
VALUE_AXES = ("batch", "cache_seq", "kv_heads", "head_dim")
SCALE_AXES = VALUE_AXES[:-1]


def init_cache(config: Config, batch_size: int, max_length: int, dtype: Any = jnp.bfloat16,
               mesh: Mesh | None = None) -> KVCache:
    """An empty cache; `dtype` float8_e4m3fn (or "fp8") makes an FP8 cache with per-token scales.

    With a mesh, each buffer is created directly in its sharded layout.
    """
    fp8 = isinstance(dtype, str) and dtype == "fp8" or jnp.dtype(dtype) == quant.FP8
    shape = (batch_size, max_length, config.num_kv_heads, config.head_dim)
    value_dtype = quant.FP8 if fp8 else dtype

    def make(shape, dtype, fill, axes):
        sharding = None if mesh is None else S.named_sharding(mesh, axes, shape)
        return _filler(shape, jnp.dtype(dtype), fill, sharding)()

    layers = range(config.num_layers)
    return KVCache(
        k=[make(shape, value_dtype, 0, VALUE_AXES) for _ in layers],
        v=[make(shape, value_dtype, 0, VALUE_AXES) for _ in layers],
        lengths=make((batch_size,), jnp.int32, 0, ("batch",)),
        k_scale=[make(shape[:-1], jnp.float32, 1, SCALE_AXES) for _ in layers] if fp8 else None,
        v_scale=[make(shape[:-1], jnp.float32, 1, SCALE_AXES) for _ in layers] if fp8 else None,
    )


@functools.lru_cache(maxsize=None)
def _filler(shape: tuple[int, ...], dtype: Any, fill: float, sharding: Any):
    """One compiled program per buffer kind: a cache of L layers compiles two or four, not 2L or 4L."""
    return jax.jit(lambda: jnp.full(shape, fill, dtype), out_shardings=sharding)


def write(buf: jax.Array, new: jax.Array, positions: jax.Array, counts: jax.Array) -> jax.Array:
    """Writes new[b, t] at buf[b, positions[b, t]] for t < counts[b]; other tokens are dropped.

    Dropping instead of clamping means a padded token can never overwrite a valid entry, even when a
    sequence's padded positions run past the end of the cache.
    """
    # buf: [B, S, ...], new: [B, T, ...], positions: [B, T], counts: [B]
    t = new.shape[1]
    valid = jnp.arange(t)[None, :] < counts[:, None]  # [B, T]
    index = jnp.where(valid, positions, buf.shape[1])  # out of range -> dropped
    rows = jnp.arange(buf.shape[0])[:, None]
    return buf.at[rows, index].set(new.astype(buf.dtype), mode="drop")
