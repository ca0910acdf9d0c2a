# B sequences (cache rows), n sequences written (n <= B), S cached positions, Hkv key/value heads,
# K head dim.
"""Public entry point of cache append: input checks and the `implementation=` switch.

The cache layout is `pallas_kernels.decode_attention`'s: [B, S, Hkv, K] values, and for an fp8
(float8_e4m3fn) cache one float32 scale per token and head, [B, S, Hkv].
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.cache_append import mosaic, reference
from pallas_kernels.cache_append import triton as triton_backend
from pallas_kernels.implementation import TRITON_LAUNCHERS, Implementation, resolve
from pallas_kernels import triton_call

_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float8_e4m3fn)


def cache_append(
    k_cache: jax.Array,  # [B, S, Hkv, K]
    v_cache: jax.Array,  # [B, S, Hkv, K]
    k: jax.Array,  # [n, Hkv, K]
    v: jax.Array,  # [n, Hkv, K]
    positions: jax.Array,  # [n] int
    *,
    k_scale: jax.Array | None = None,  # [B, S, Hkv] float32, fp8 caches only
    v_scale: jax.Array | None = None,  # [B, S, Hkv] float32, fp8 caches only
    implementation: Implementation | Literal["pallas_mosaic", "triton", "jax_triton"] | None = None,
) -> tuple[jax.Array, ...]:
    """Writes k[b], v[b] at position positions[b] of sequence b (b < n) of the cache.

    A position outside [0, S) writes nothing, so a caller masks a sequence out with -1. An fp8
    cache stores each head's values quantized with a scale of max|x| / 448 (its k_scale / v_scale
    entry); other caches store the values cast to their dtype. Sequences n..B-1 are untouched.

    Returns (k_cache, v_cache), plus (k_scale, v_scale) for an fp8 cache. Under jit with the caches
    donated the kernel writes in place: its cost is the new tokens' bytes, not the cache's.

    implementation: None picks the Pallas kernel on GPU and the reference elsewhere; "pallas" /
    "pallas_triton" force the kernel (interpret mode off the GPU); "pallas_mosaic" the Mosaic GPU
    kernel (opt-in); "triton" the same kernel written in Triton, launched as XLA's Triton custom call,
    and "jax_triton" the same through jax-triton (both opt-in). The Mosaic and jax-triton launches
    were slower than the Pallas kernel at most sizes (run S7; see the README).
    """
    _check(k_cache, v_cache, k, v, positions, k_scale, v_scale)
    use_reference, interpret = resolve(implementation, mosaic=True, triton=True)
    if use_reference:
        return reference.cache_append(k_cache, v_cache, k, v, positions, k_scale, v_scale)
    if implementation == "pallas_mosaic":
        return mosaic.cache_append(k_cache, v_cache, k, v, positions, k_scale, v_scale, interpret=interpret)
    if implementation in TRITON_LAUNCHERS:
        return triton_call.load("cache_append").cache_append(k_cache, v_cache, k, v, positions, k_scale, v_scale,
                                                             interpret=interpret,
                                                             launcher=TRITON_LAUNCHERS[implementation])
    return triton_backend.cache_append(k_cache, v_cache, k, v, positions, k_scale, v_scale, interpret=interpret)


def _check(k_cache, v_cache, k, v, positions, k_scale, v_scale) -> None:
    if k_cache.ndim != 4:
        raise ValueError(f"k_cache must have rank 4 [B, S, Hkv, K], got shape {k_cache.shape}.")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache must match k_cache ({k_cache.dtype} {k_cache.shape}), "
                         f"got {v_cache.dtype} {v_cache.shape}.")
    if k_cache.dtype not in _DTYPES:
        raise ValueError(f"the cache must be bfloat16, float16, float32 or float8_e4m3fn, got {k_cache.dtype}.")
    batch, _, heads, head_dim = k_cache.shape
    if k.ndim != 3 or k.shape[1:] != (heads, head_dim) or k.shape[0] > batch:
        raise ValueError(f"k must be [n, Hkv, K] with n <= {batch} and (Hkv, K) = {(heads, head_dim)} as in the "
                         f"cache, got shape {k.shape}.")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {k.shape}, got {v.shape}.")
    if positions.shape != (k.shape[0],) or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"positions must be an int array of shape ({k.shape[0]},), "
                         f"got {positions.dtype} {positions.shape}.")
    fp8 = k_cache.dtype == jnp.float8_e4m3fn
    if fp8 != (k_scale is not None) or (k_scale is None) != (v_scale is None):
        raise ValueError("an fp8 cache needs both k_scale and v_scale, and only an fp8 cache takes them.")
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is not None and (scale.shape != k_cache.shape[:3] or scale.dtype != jnp.float32):
            raise ValueError(f"{name} must be float32 [B, S, Hkv] = {k_cache.shape[:3]}, "
                             f"got {scale.dtype} {scale.shape}.")
