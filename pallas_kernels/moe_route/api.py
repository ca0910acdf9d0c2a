# T tokens, D model width, E experts, k experts per token.
"""Public entry point of MoE routing: input checks and the `implementation=` switch."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.implementation import Implementation, resolve
from pallas_kernels.moe_route import reference
from pallas_kernels.moe_route import triton as triton_backend

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def moe_route(
    x: jax.Array,  # [T, D]
    router: jax.Array,  # [E, D]
    top_k: int,
    valid: jax.Array | None = None,  # [T] bool
    *,
    implementation: Implementation | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Mixtral's routing: softmax over the E router logits (in float32, the logits rounded to x's
    dtype first), the top k experts (the lower id first on ties), their weights renormalised to sum
    to one. Tokens with `valid` False get expert id E and weight zero.

    Returns (weights [T, k] float32, experts [T, k] int32).

    implementation: None picks the Pallas kernel on GPU and the reference elsewhere; "pallas" /
    "pallas_triton" force the kernel (interpret mode off the GPU).
    """
    _check(x, router, top_k, valid)
    use_reference, interpret = resolve(implementation)
    if use_reference:
        return reference.moe_route(x, router, top_k, valid)
    return triton_backend.moe_route(x, router, valid, top_k=top_k, interpret=interpret)


def _check(x, router, top_k, valid) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must be [T, D], got shape {x.shape}.")
    if router.ndim != 2 or router.shape[1] != x.shape[1]:
        raise ValueError(f"router must be [E, D] with D={x.shape[1]} as in x, got shape {router.shape}.")
    for name, a in (("x", x), ("router", router)):
        if jnp.dtype(a.dtype) not in _DTYPES:
            raise ValueError(f"{name} must be bfloat16, float16 or float32, got {jnp.dtype(a.dtype).name}.")
    if not isinstance(top_k, int) or not 1 <= top_k <= router.shape[0]:
        raise ValueError(f"top_k must be an int in [1, E={router.shape[0]}], got {top_k!r}.")
    if valid is not None and (valid.shape != (x.shape[0],) or valid.dtype != jnp.bool_):
        raise ValueError(f"valid must be bool [T]=({x.shape[0]},), got {valid.dtype} {valid.shape}.")
