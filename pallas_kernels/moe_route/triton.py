# T tokens, D model width, E experts (Ep: padded to a power of two, at least 16), k experts per token,
# BT tokens per program, BD model columns per step.
"""Routing on the Pallas Triton backend: one program per BT tokens streams their rows and the router
[E, D] over D, multiplies them on the MMA units, then takes the softmax, the top k and the
renormalised weights in registers. XLA spends a matmul, a softmax and a top-k kernel (and the gaps
between them) on what is one small launch here; in a decode step that is a few microseconds a layer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _kernel(
    x_ref,  # [T, D]
    router_ref,  # [E, D]
    *refs,  # valid [T] int32?, then weights [T, k] f32, experts [T, k] int32
    top_k: int,
    padded_experts: int,
    block_t: int,
    block_d: int,
    has_valid: bool,
):
    valid_ref = refs[0] if has_valid else None
    weights_ref, experts_ref = refs[-2:]
    t, d = x_ref.shape
    e = router_ref.shape[0]
    t0 = pl.program_id(0) * block_t
    row_ok = t0 + lax.broadcasted_iota(jnp.int32, (block_t,), 0) < t  # [BT]
    ids = lax.broadcasted_iota(jnp.int32, (1, padded_experts), 1)  # [1, Ep]
    expert_ok = ids < e  # [1, Ep]

    def step(i, acc):
        d0 = pl.multiple_of(i * block_d, block_d)
        col_ok = d0 + lax.broadcasted_iota(jnp.int32, (1, block_d), 1) < d  # [1, BD]
        x = plgpu.load(x_ref.at[pl.ds(t0, block_t), pl.ds(d0, block_d)], mask=row_ok[:, None] & col_ok,
                       other=0.0)  # [BT, BD]
        w = plgpu.load(router_ref.at[pl.ds(0, padded_experts), pl.ds(d0, block_d)],
                       mask=expert_ok.reshape(padded_experts, 1) & col_ok, other=0.0)  # [Ep, BD]
        return acc + lax.dot_general(x, w.astype(x.dtype), (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)  # [BT, Ep]

    acc = lax.fori_loop(0, pl.cdiv(d, block_d), step, jnp.zeros((block_t, padded_experts), jnp.float32))
    # Logits rounded to x's dtype first, as the reference (and Hugging Face's router linear) does.
    logits = jnp.where(expert_ok, acc.astype(x_ref.dtype).astype(jnp.float32), -jnp.inf)  # [BT, Ep]
    ex = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
    probs = jnp.where(expert_ok, ex / jnp.sum(ex, axis=1, keepdims=True), -2.0)  # padding is never picked
    chosen_w, chosen_id = [], []
    for _ in range(top_k):
        best = jnp.max(probs, axis=1)  # [BT]
        best_id = jnp.min(jnp.where(probs == best[:, None], ids, padded_experts), axis=1)  # [BT]; lower id on ties
        chosen_w.append(best)
        chosen_id.append(jnp.minimum(best_id, e))  # a NaN row picks no expert
        probs = jnp.where(ids == best_id[:, None], -1.0, probs)
    total = functools.reduce(jnp.add, chosen_w)  # [BT]
    keep = plgpu.load(valid_ref.at[pl.ds(t0, block_t)], mask=row_ok, other=0) != 0 if has_valid else None
    for j, (w, i) in enumerate(zip(chosen_w, chosen_id)):
        w = w / total
        if keep is not None:
            w, i = jnp.where(keep, w, 0.0), jnp.where(keep, i, e)
        plgpu.store(weights_ref.at[pl.ds(t0, block_t), jnp.int32(j)], w, mask=row_ok)
        plgpu.store(experts_ref.at[pl.ds(t0, block_t), jnp.int32(j)], i, mask=row_ok)


@functools.partial(jax.jit, static_argnames=("top_k", "block_t", "block_d", "interpret"))
def moe_route(
    x: jax.Array,  # [T, D]
    router: jax.Array,  # [E, D]
    valid: jax.Array | None,  # [T] bool
    *,
    top_k: int,
    block_t: int = 16,
    block_d: int = 512,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Expects inputs already checked by the public wrapper."""
    t, d = x.shape
    padded = max(16, pl.next_power_of_2(router.shape[0]))  # the MMA's smallest N
    block_d = min(block_d, max(16, pl.next_power_of_2(d)))
    operands = [x, router] + ([] if valid is None else [valid.astype(jnp.int32)])
    kernel = functools.partial(_kernel, top_k=top_k, padded_experts=padded, block_t=block_t, block_d=block_d,
                               has_valid=valid is not None)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(t, block_t),),
        out_shape=[jax.ShapeDtypeStruct((t, top_k), jnp.float32), jax.ShapeDtypeStruct((t, top_k), jnp.int32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name="jaxfire_moe_route",
    )(*operands)
