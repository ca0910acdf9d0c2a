"""Mixtral as pure functions over the params pytree: the full forward pass, `prefill` and `decode_step`.

Dimensions: B batch, T tokens, S cache positions, D model width, H query heads, G key/value heads,
R = H / G query heads per key/value head, K head dim, V vocab.

The layer loop is unrolled at trace time on purpose: each layer's weights and cache are separate
buffers, so every matmul reads its weights in place and every cache update is in place; a scan over
stacked layers would slice (copy) weights and caches on every step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxfire import kv_cache as kvc
from jaxfire import moe, quant
from jaxfire.config import Config
from jaxfire.params import Layer, Params


@dataclasses.dataclass(frozen=True)
class Kernels:
    """Which implementation runs each hot op; passed as a static argument.

    `decode_attention`: "xla" (the einsum attention the rest of the model uses) or an
    `implementation=` name of `pallas_kernels.decode_attention`.
    """

    decode_attention: str = "xla"


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in the half-split layout Hugging Face checkpoints use."""
    # x: [B, T, N, K], positions: [B, T]
    k = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))  # [K/2]
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, K/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, K]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, window: int | None) -> jax.Array:
    """Causal (optionally sliding-window) grouped-query attention of queries at q_pos over keys at 0..S-1."""
    # q: [B, T, H, K], k/v: [B, S, G, K], q_pos: [B, T] -> [B, T, H, K]
    b, t, h, d = q.shape
    g = k.shape[2]
    q = q.reshape(b, t, g, h // g, d)  # [B, T, G, R, K]
    s = jnp.einsum("btgrk,bsgk->bgrts", q, k, preferred_element_type=jnp.float32) * d**-0.5
    kv_pos = jnp.arange(k.shape[1])
    mask = kv_pos[None, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if window is not None:
        mask &= kv_pos[None, None, :] > q_pos[:, :, None] - window
    s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)  # [B, G, R, T, S]
    o = jnp.einsum("bgrts,bsgk->btgrk", p, v, preferred_element_type=jnp.float32)
    return o.reshape(b, t, h, d).astype(q.dtype)


def _decode_attention(q, k, v, lengths, window, implementation):
    from pallas_kernels import decode_attention  # imported lazily: the default path needs no kernels

    return decode_attention(q, k, v, lengths, window=window, implementation=implementation)


def attention_block(layer: Layer, x, positions, cache_kv, counts, config: Config, kernels: Kernels):
    """Self-attention of x at `positions`; with a cache, writes the new keys/values and attends over it."""
    # x: [B, T, D], positions: [B, T], cache_kv: ([B, S, G, K], [B, S, G, K]) or None
    b, t, _ = x.shape
    c = config
    p = layer.attn
    q = quant.dense(x, p.wq).reshape(b, t, c.num_heads, c.head_dim)
    k = quant.dense(x, p.wk).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = quant.dense(x, p.wv).reshape(b, t, c.num_kv_heads, c.head_dim)
    q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
    if cache_kv is None:
        o = attend(q, k, v, positions, c.sliding_window)
    else:
        k_cache, v_cache = cache_kv
        k_cache = kvc.write(k_cache, k, positions, counts)
        v_cache = kvc.write(v_cache, v, positions, counts)
        cache_kv = (k_cache, v_cache)
        if t == 1 and kernels.decode_attention != "xla":
            lengths = positions[:, 0] + counts
            o = _decode_attention(q[:, 0], k_cache, v_cache, lengths, c.sliding_window,
                                  kernels.decode_attention)[:, None]
        else:
            o = attend(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), positions, c.sliding_window)
    return quant.dense(o.reshape(b, t, -1), p.wo), cache_kv


def decoder_layer(layer: Layer, x, positions, cache_kv, counts, config: Config, kernels: Kernels):
    with jax.named_scope("attention"):
        h, cache_kv = attention_block(layer, rms_norm(x, layer.attn_norm, config.rms_norm_eps), positions,
                                      cache_kv, counts, config, kernels)
    x = x + h
    with jax.named_scope("moe"):
        y = rms_norm(x, layer.moe_norm, config.rms_norm_eps)
        y = moe.moe_block(layer.moe, y.reshape(-1, y.shape[-1]), config.num_experts_per_tok).reshape(x.shape)
    return x + y, cache_kv


def _lm_head(params: Params, h: jax.Array, config: Config) -> jax.Array:
    h = rms_norm(h, params.final_norm, config.rms_norm_eps)
    head = params.embed if params.lm_head is None else params.lm_head
    return quant.dense(h, head).astype(jnp.float32)


def _trunk(params: Params, tokens, positions, cache: kvc.KVCache | None, counts, config, kernels):
    x = params.embed[tokens]  # [B, T, D]
    new_k, new_v = [], []
    for i, layer in enumerate(params.layers):
        with jax.named_scope(f"layer_{i}"):
            cache_kv = None if cache is None else (cache.k[i], cache.v[i])
            x, cache_kv = decoder_layer(layer, x, positions, cache_kv, counts, config, kernels)
        if cache_kv is not None:
            new_k.append(cache_kv[0])
            new_v.append(cache_kv[1])
    return x, new_k, new_v


@functools.partial(jax.jit, static_argnames=("config", "kernels"))
def forward(params: Params, tokens: jax.Array, config: Config, kernels: Kernels = Kernels()) -> jax.Array:
    """Full-sequence logits without a cache."""
    # tokens: [B, T] -> [B, T, V] float32
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    h, _, _ = _trunk(params, tokens, positions, None, None, config, kernels)
    return _lm_head(params, h, config)


@functools.partial(jax.jit, static_argnames=("config", "kernels"), donate_argnames=("cache",))
def prefill(params: Params, cache: kvc.KVCache, tokens: jax.Array, counts: jax.Array, config: Config,
            kernels: Kernels = Kernels()) -> tuple[jax.Array, kvc.KVCache]:
    """Appends counts[b] tokens of tokens[b] to sequence b of the cache; returns each one's last logits.

    Sequences with counts[b] == 0 are left untouched (their logits are meaningless), so the same call
    can prefill some slots of a running batch, or continue a prompt chunk by chunk.
    """
    # tokens: [B, T], counts: [B] -> logits [B, V] float32
    t = tokens.shape[1]
    positions = cache.lengths[:, None] + jnp.arange(t)[None, :]  # [B, T]
    h, ks, vs = _trunk(params, tokens, positions, cache, counts, config, kernels)
    last = jnp.take_along_axis(h, jnp.maximum(counts - 1, 0)[:, None, None], axis=1)[:, 0]  # [B, D]
    logits = _lm_head(params, last, config)
    return logits, kvc.KVCache(k=ks, v=vs, lengths=cache.lengths + counts)


@functools.partial(jax.jit, static_argnames=("config", "kernels"), donate_argnames=("cache",))
def decode_step(params: Params, cache: kvc.KVCache, tokens: jax.Array, config: Config,
                active: jax.Array | None = None, kernels: Kernels = Kernels()) -> tuple[jax.Array, kvc.KVCache]:
    """One new token per sequence; inactive sequences (active[b] False) are left untouched."""
    # tokens: [B] -> logits [B, V] float32
    counts = jnp.ones_like(cache.lengths) if active is None else active.astype(jnp.int32)
    positions = cache.lengths[:, None]  # [B, 1]
    h, ks, vs = _trunk(params, tokens[:, None], positions, cache, counts, config, kernels)
    logits = _lm_head(params, h[:, 0], config)
    return logits, kvc.KVCache(k=ks, v=vs, lengths=cache.lengths + counts)
