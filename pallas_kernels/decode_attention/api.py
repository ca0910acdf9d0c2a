# B batch, S cached positions, H heads (Hq query, Hkv key/value, G = Hq // Hkv), K head dim.
"""Public entry point of decode attention: input checks, defaults and the `implementation=` switch.

The cache is contiguous, [B, S, Hkv, K] per sequence. A paged cache will get its own function
(`paged_decode_attention`, taking pages and a page table) beside this one, so callers of this
signature never change; the kernels already address the cache only through (sequence, position).
"""

from __future__ import annotations

import numbers
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.decode_attention import reference
from pallas_kernels.decode_attention import triton as triton_backend
from pallas_kernels.decode_attention.config import DecodeAttentionConfig, default_config
from pallas_kernels.implementation import TRITON_LAUNCHERS, Implementation, resolve
from pallas_kernels import triton_call

HEAD_DIMS = (64, 128, 256)
_QUERY_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_CACHE_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float8_e4m3fn)


def decode_attention(
    q: jax.Array,  # [B, Hq, K]
    k: jax.Array,  # [B', S, Hkv, K], B' >= B
    v: jax.Array,  # [B', S, Hkv, K]
    lengths: jax.Array,  # [B] int
    *,
    k_scale: jax.Array | None = None,  # [Hkv] or [B', S, Hkv] float32, fp8 caches only
    v_scale: jax.Array | None = None,  # [Hkv] or [B', S, Hkv] float32, fp8 caches only
    sm_scale: float | None = None,
    window: int | None = None,
    implementation: Implementation | Literal["triton", "jax_triton"] | None = None,
    config: DecodeAttentionConfig | None = None,
) -> jax.Array:  # [B, Hq, K] in q's dtype
    """Attention of one new token per sequence over its cached keys and values.

    Sequence b attends to positions p < lengths[b] (and p >= lengths[b] - window when `window` is
    set); nothing at or past its length is read into the result, whatever it holds. A sequence of
    length 0 gets zeros. Lengths above S are treated as S. The cache may hold more sequences than q
    (B' >= B): q's sequence b reads the cache's row b, a step over its first B sequences. An fp8
    (float8_e4m3fn) cache needs
    `k_scale` and `v_scale` (dequantised value = fp8 value * scale), per KV head [Hkv] or per token
    and head [B, S, Hkv]. Softmax runs in float32; `sm_scale` defaults to 1 / sqrt(K).

    implementation: None picks the fastest measured path for the platform (the Pallas kernel on
    GPU, the reference elsewhere); "reference" is plain jnp; "pallas" / "pallas_triton" force the
    kernel, run in interpret mode off the GPU; "triton" the same kernel written in Triton, launched as
    XLA's Triton custom call, and "jax_triton" the same through jax-triton (both opt-in; through
    jax-triton level with it from B=32, slower at B=1: see the README). `config` overrides the
    kernel's tuning.
    """
    q, k, v, lengths = (jnp.asarray(x) for x in (q, k, v, lengths))
    _check_arrays(q, k, v, lengths, k_scale, v_scale)
    head_dim = q.shape[-1]
    if sm_scale is None:
        sm_scale = head_dim**-0.5
    elif not isinstance(sm_scale, numbers.Real) or isinstance(sm_scale, bool):
        raise ValueError(f"sm_scale must be a Python float, got {type(sm_scale).__name__}.")
    if window is not None and (
        not isinstance(window, numbers.Integral) or isinstance(window, bool) or window < 1
    ):
        raise ValueError(f"window must be a positive int or None, got {window!r}.")
    use_reference, interpret = resolve(implementation, triton=True)
    if config is not None:
        if not isinstance(config, DecodeAttentionConfig):
            raise ValueError(
                f"config must be a DecodeAttentionConfig, got {type(config).__name__}."
            )
        config.validate()
    window = None if window is None else int(window)
    sm_scale = float(sm_scale)

    if use_reference:
        return reference.decode_attention(
            q, k, v, lengths, k_scale=k_scale, v_scale=v_scale, sm_scale=sm_scale, window=window
        )
    batch, seq_len, num_kv_heads, _ = k.shape
    if config is None:
        config = default_config(batch, seq_len, num_kv_heads, head_dim, k.dtype)
    launch = {}
    if implementation in TRITON_LAUNCHERS:
        backend = triton_call.load("decode_attention")  # imports Triton
        launch = dict(launcher=TRITON_LAUNCHERS[implementation])
    else:
        backend = triton_backend
    return backend.decode_attention(
        q,
        k,
        v,
        lengths,
        k_scale=k_scale,
        v_scale=v_scale,
        sm_scale=sm_scale,
        window=window,
        config=config,
        interpret=interpret,
        **launch,
    )


def _check_arrays(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    k_scale: jax.Array | None,
    v_scale: jax.Array | None,
) -> None:
    if q.ndim != 3:
        raise ValueError(f"q must have rank 3 [B, Hq, K], got shape {q.shape}.")
    if k.ndim != 4:
        raise ValueError(f"k must have rank 4 [B, S, Hkv, K], got shape {k.shape}.")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {k.shape}, got {v.shape}.")
    batch, num_q_heads, head_dim = q.shape
    kb, seq_len, num_kv_heads, kd = k.shape
    if kb < batch:
        raise ValueError(f"q has {batch} sequences but the cache only {kb}.")
    if kd != head_dim:
        raise ValueError(f"q and k disagree on the head dim: {head_dim} vs {kd}.")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head dim must be one of {HEAD_DIMS}, got {head_dim}.")
    if seq_len < 1 or num_kv_heads < 1:
        raise ValueError(f"k must have at least one position and one head, got shape {k.shape}.")
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"the {num_q_heads} query heads are not a multiple of the {num_kv_heads} KV heads."
        )
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(
            f"lengths must be an int array of shape ({batch},), got {lengths.dtype} {lengths.shape}."
        )
    if q.dtype not in _QUERY_DTYPES:
        raise ValueError(f"q must be bfloat16, float16 or float32, got {q.dtype}.")
    if k.dtype not in _CACHE_DTYPES:
        raise ValueError(
            f"the cache must be bfloat16, float16, float32 or float8_e4m3fn, got {k.dtype}."
        )
    if v.dtype != k.dtype:
        raise ValueError(f"k and v must share a dtype, got {k.dtype} and {v.dtype}.")
    if k.dtype != jnp.float8_e4m3fn:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale and v_scale apply to fp8 caches only; this cache is {k.dtype}.")
        return
    if k_scale is None or v_scale is None:
        raise ValueError("an fp8 cache needs both k_scale and v_scale.")
    layouts = ((num_kv_heads,), (kb, seq_len, num_kv_heads))
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale.shape not in layouts:
            raise ValueError(
                f"{name} must have shape [Hkv] {layouts[0]} or [B, S, Hkv] {layouts[1]}, "
                f"got {scale.shape}."
            )
        if not jnp.issubdtype(scale.dtype, jnp.floating):
            raise ValueError(f"{name} must be a float array, got {scale.dtype}.")
    if k_scale.shape != v_scale.shape:
        raise ValueError(
            f"k_scale and v_scale must share a layout, got {k_scale.shape} and {v_scale.shape}."
        )
