"""The sparse mixture-of-experts block: route, dispatch (sort by expert), grouped experts, combine.

Dimensions: T tokens, D model width, E experts, A = T * top_k token-expert assignments, F expert width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxfire import quant
from jaxfire.params import MoE


def route(router: jax.Array, x: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Mixtral routing: softmax over all experts in float32, top-k, weights renormalised to sum to one."""
    logits = quant.dense(x, router).astype(jnp.float32)  # [T, E]; the router is never quantized
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)  # [T, k]
    return weights / jnp.sum(weights, axis=-1, keepdims=True), experts


def experts_ffn(p: MoE, xs: jax.Array, group_sizes: jax.Array, policy: quant.Fp8Policy = quant.Fp8Policy(),
                implementation: str = "xla") -> jax.Array:
    """SwiGLU experts over rows sorted by expert."""
    # xs: [A, D] -> [A, D]
    gate_up = quant.grouped(xs, p.w_gate_up, group_sizes, policy, implementation)  # [A, 2F]
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return quant.grouped(jax.nn.silu(gate) * up, p.w_down, group_sizes, policy, implementation)


def dispatch(experts: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Orders the A assignments by expert; returns that order and the rows per expert."""
    flat = experts.reshape(-1)  # [A]
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, group_sizes


def moe_block(p: MoE, x: jax.Array, top_k: int, policy: quant.Fp8Policy = quant.Fp8Policy(),
              implementation: str = "xla") -> jax.Array:
    # x: [T, D] -> [T, D]
    num_experts = p.router.shape[0]
    with jax.named_scope("route"):
        weights, experts = route(p.router, x, top_k)  # [T, k]
    with jax.named_scope("dispatch"):
        order, group_sizes = dispatch(experts, num_experts)
        xs = x[order // top_k]  # [A, D]
    with jax.named_scope("experts"):
        ys = experts_ffn(p, xs, group_sizes, policy, implementation)  # [A, D]
    with jax.named_scope("combine"):
        y = jnp.zeros_like(ys).at[order].set(ys).reshape(x.shape[0], top_k, -1)  # [T, k, D]
        out = jnp.einsum("tkd,tk->td", y.astype(jnp.float32), weights)
    return out.astype(x.dtype)
