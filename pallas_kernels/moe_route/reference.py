# T tokens, D model width, E experts, k experts per token.
"""Mixtral's routing in plain jnp: the always-available implementation and the kernel's yardstick."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def moe_route(x: jax.Array, router: jax.Array, top_k: int,
              valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Logits in x's dtype (as Hugging Face's router linear returns them), softmax over all experts in
    float32, the top k (the lower id first on ties), weights renormalised to sum to one. Tokens with
    valid False get expert id E and weight zero."""
    # x: [T, D], router: [E, D], valid: [T] -> weights [T, k] float32, experts [T, k] int32
    logits = jnp.einsum("td,ed->te", x, router.astype(x.dtype), preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits.astype(x.dtype).astype(jnp.float32), axis=-1)  # [T, E]
    weights, experts = jax.lax.top_k(probs, top_k)  # [T, k]
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    if valid is not None:
        weights = jnp.where(valid[:, None], weights, 0.0)
        experts = jnp.where(valid[:, None], experts, router.shape[0])
    return weights, experts.astype(jnp.int32)
