"""Next-token sampling with per-sequence parameters: greedy at temperature 0, else top-k and top-p
(nucleus) over the temperature-scaled logits.

Dimensions: B sequences, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
           top_k: jax.Array | int = 0) -> jax.Array:
    """One token per row; temperature, top_p and top_k are [B] (or scalars), so each request keeps its
    own. top_k 0 keeps every token; otherwise the k most likely (and any tied with the k-th)."""
    # logits: [B, V] float32 -> [B] int32
    b, v = logits.shape
    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (b,))
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (b,))
    top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (b,))
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    # Keep the smallest set of tokens whose probability reaches top_p (always at least the top one).
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B, V] descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p[:, None]
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
    kth = jnp.take_along_axis(sorted_logits, jnp.clip(top_k - 1, 0, v - 1)[:, None], axis=-1)  # [B, 1]
    cutoff = jnp.maximum(cutoff, jnp.where(top_k[:, None] > 0, kth, -jnp.inf))
    masked = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    sampled = jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)
