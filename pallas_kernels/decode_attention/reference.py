# B batch, S cached positions, H heads (Hq query, Hkv key/value, G = Hq // Hkv), K head dim.
"""Decode attention in plain jnp: the always-available implementation and the kernels' yardstick."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _dequantize(x: jax.Array, scale: jax.Array | None) -> jax.Array:
    x = x.astype(jnp.float32)
    if scale is None:
        return x
    if scale.ndim == 1:  # per KV head
        return x * scale[:, None]
    return x * scale[..., None]  # per token and head: [B, S, Hkv]


@functools.partial(jax.jit, static_argnames=("sm_scale", "window"))
def decode_attention(
    q: jax.Array,  # [B, Hq, K]
    k: jax.Array,  # [B, S, Hkv, K]
    v: jax.Array,  # [B, S, Hkv, K]
    lengths: jax.Array,  # [B]
    *,
    k_scale: jax.Array | None = None,  # [Hkv] or [B, S, Hkv]
    v_scale: jax.Array | None = None,  # [Hkv] or [B, S, Hkv]
    sm_scale: float | None = None,
    window: int | None = None,
) -> jax.Array:  # [B, Hq, K]
    batch, num_q_heads, head_dim = q.shape
    k, v = k[:batch], v[:batch]  # a step over the cache's first sequences
    if k_scale is not None and k_scale.ndim == 3:
        k_scale, v_scale = k_scale[:batch], v_scale[:batch]
    if sm_scale is None:
        sm_scale = head_dim**-0.5
    seq_len, num_kv_heads = k.shape[1], k.shape[2]
    group = num_q_heads // num_kv_heads
    length = jnp.clip(lengths.astype(jnp.int32), 0, seq_len)[:, None]  # [B, 1]
    pos = jnp.arange(seq_len, dtype=jnp.int32)[None, :]  # [1, S]
    valid = pos < length  # [B, S]
    if window is not None:
        valid &= pos >= length - window
    # Garbage past the length (NaN included) must not reach the result, so both K and V are zeroed
    # there rather than only masking the logits (0 * NaN is NaN).
    kf = jnp.where(valid[:, :, None, None], _dequantize(k, k_scale), 0.0)  # [B, S, Hkv, K]
    vf = jnp.where(valid[:, :, None, None], _dequantize(v, v_scale), 0.0)  # [B, S, Hkv, K]
    qf = q.astype(jnp.float32).reshape(batch, num_kv_heads, group, head_dim)  # [B, Hkv, G, K]
    logits = jnp.einsum("bhgk,bshk->bhgs", qf, kf, precision=jax.lax.Precision.HIGHEST)
    logits = jnp.where(valid[:, None, None, :], logits * sm_scale, -jnp.inf)  # [B, Hkv, G, S]
    m = jnp.max(logits, axis=-1, keepdims=True)  # [B, Hkv, G, 1]
    p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))  # [B, Hkv, G, S]
    denom = jnp.sum(p, axis=-1, keepdims=True)  # [B, Hkv, G, 1]
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhgs,bshk->bhgk", p, vf, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(batch, num_q_heads, head_dim).astype(q.dtype)
