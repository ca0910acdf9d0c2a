# B sequences (cache rows), n sequences written (n <= B), S cached positions, Hkv key/value heads,
# K head dim.
"""Cache append in plain jnp: the always-available implementation and the kernel's yardstick."""

from __future__ import annotations

import jax
import jax.numpy as jnp

FP8 = jnp.dtype(jnp.float8_e4m3fn)
FP8_MAX = float(jnp.finfo(FP8).max)  # 448
TINY = 1e-12  # keeps an all-zero head from dividing by zero


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """e4m3 values and one float32 scale per head (over K): value * scale approximates x."""
    # x: [n, Hkv, K] -> [n, Hkv, K] e4m3, [n, Hkv] f32
    xf = x.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(xf), axis=-1), TINY) / FP8_MAX
    return jnp.clip(xf / scale[..., None], -FP8_MAX, FP8_MAX).astype(FP8), scale


@jax.jit
def cache_append(
    k_cache: jax.Array,  # [B, S, Hkv, K]
    v_cache: jax.Array,  # [B, S, Hkv, K]
    k: jax.Array,  # [n, Hkv, K]
    v: jax.Array,  # [n, Hkv, K]
    positions: jax.Array,  # [n] int
    k_scale: jax.Array | None = None,  # [B, S, Hkv] f32, fp8 caches only
    v_scale: jax.Array | None = None,  # [B, S, Hkv] f32, fp8 caches only
) -> tuple[jax.Array, ...]:
    n, seq_len = k.shape[0], k_cache.shape[1]
    rows = jnp.arange(n)
    # Out-of-range positions (negative included) are dropped, never wrapped or clamped.
    index = jnp.where((positions >= 0) & (positions < seq_len), positions, seq_len)

    def put(buf, new):
        return buf.at[rows, index].set(new.astype(buf.dtype), mode="drop")

    if k_scale is None:
        return put(k_cache, k), put(v_cache, v)
    (kq, ks), (vq, vs) = quantize(k), quantize(v)
    return put(k_cache, kq), put(v_cache, vq), put(k_scale, ks), put(v_scale, vs)
