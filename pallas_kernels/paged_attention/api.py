# T token rows, S sequences (page-table rows), M pages per sequence, P pages in the pool, Z page size,
# Hq query heads, Hkv key/value heads, K head dim.
"""Public entry points of ragged paged attention and the page write: input checks, defaults and the
`implementation=` switch.

The pool holds P pages of Z positions, [P, Z, Hkv, K] (an fp8 pool with one float32 scale per token
and head, [P, Z, Hkv]); sequence s keeps its positions in pages page_table[s, 0], page_table[s, 1],
... in position order, position p at offset p % Z of page page_table[s, p // Z]. A step is a ragged
set of token rows: decode tokens, prompt chunks that continue a sequence, several new prompts, in any
mix; row t belongs to sequence seq_ids[t] (-1: padding) at position positions[t].
"""

from __future__ import annotations

import numbers
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.implementation import TRITON_LAUNCHERS, Implementation, resolve
from pallas_kernels import triton_call
from pallas_kernels.paged_attention import reference
from pallas_kernels.paged_attention.config import PagedAttentionConfig, default_config, mosaic_config

HEAD_DIMS = (64, 128, 256)
_QUERY_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_CACHE_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float8_e4m3fn)


def check_page_size(page_size) -> None:
    """Pages are the kernel's key blocks: a power of two of at least 16 positions (a tensor-core tile)."""
    if (not isinstance(page_size, numbers.Integral) or isinstance(page_size, bool) or page_size < 16
            or page_size & (page_size - 1)):
        raise ValueError(f"page size must be a power of two of at least 16 positions, got {page_size!r}.")


def paged_attention(
    q: jax.Array,  # [T, Hq, K]
    k_pages: jax.Array,  # [P, Z, Hkv, K]
    v_pages: jax.Array,  # [P, Z, Hkv, K]
    page_table: jax.Array,  # [S, M] int
    seq_ids: jax.Array,  # [T] int, -1 for padding rows
    positions: jax.Array,  # [T] int
    context_lens: jax.Array,  # [S] int
    *,
    k_scale: jax.Array | None = None,  # [P, Z, Hkv] float32, fp8 pages only
    v_scale: jax.Array | None = None,  # [P, Z, Hkv] float32, fp8 pages only
    sm_scale: float | None = None,
    window: int | None = None,
    implementation: Implementation | Literal["pallas_mosaic", "triton", "jax_triton"] | None = None,
    config: PagedAttentionConfig | None = None,
) -> jax.Array:  # [T, Hq, K] in q's dtype
    """Causal attention of each token row over its own sequence's keys, read from the pages.

    Row t attends to positions p <= positions[t] (and p > positions[t] - window with a window) of
    sequence seq_ids[t], below context_lens of that sequence; it never reads another sequence's
    pages, and nothing outside its keys reaches the result, whatever the pool holds there (NaN
    included). Padding rows (seq_ids -1) get zeros. Rows of a sequence need not be adjacent or in
    order. The keys and values of this step's rows must already be in the pages (`append` first).
    Softmax runs in float32; `sm_scale` defaults to 1 / sqrt(K).

    implementation: None picks the Pallas kernel on GPUs and the reference elsewhere; "reference"
    is plain jnp; "pallas" / "pallas_triton" force the kernel (interpret mode off the GPU);
    "pallas_mosaic" the default config with both launches on Mosaic GPU (`config.mosaic_config`;
    opt-in, slower than Triton so far: see the README); "triton" the same kernel written in Triton
    itself (`triton_jit.py`; Triton's interpreter off the GPU), launched as XLA's Triton custom call,
    and "jax_triton" the same through jax-triton, for when JAX drops the Pallas Triton backend.
    `config` overrides the kernel's tuning.
    """
    q, k_pages, v_pages, page_table, seq_ids, positions, context_lens = (
        jnp.asarray(x) for x in (q, k_pages, v_pages, page_table, seq_ids, positions, context_lens))
    _check(q, k_pages, v_pages, page_table, seq_ids, positions, context_lens, k_scale, v_scale)
    head_dim = q.shape[-1]
    if sm_scale is None:
        sm_scale = head_dim**-0.5
    elif not isinstance(sm_scale, numbers.Real) or isinstance(sm_scale, bool):
        raise ValueError(f"sm_scale must be a Python float, got {type(sm_scale).__name__}.")
    if window is not None and (not isinstance(window, numbers.Integral) or isinstance(window, bool) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}.")
    window = None if window is None else int(window)
    use_reference, interpret = resolve(implementation, mosaic=True, triton=True)
    mosaic = implementation == "pallas_mosaic"
    if config is not None and not isinstance(config, PagedAttentionConfig):
        raise ValueError(f"config must be a PagedAttentionConfig, got {type(config).__name__}.")
    if use_reference:
        return reference.paged_attention(q, k_pages, v_pages, page_table, seq_ids, positions, context_lens,
                                         k_scale=k_scale, v_scale=v_scale, sm_scale=float(sm_scale), window=window)
    if implementation in TRITON_LAUNCHERS:  # Triton itself is imported only here
        paged_attention = triton_call.load("paged_attention").BY_LAUNCHER[TRITON_LAUNCHERS[implementation]]
    else:
        from pallas_kernels.paged_attention.triton import paged_attention

    check_page_size(k_pages.shape[1])
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"the kernel takes head dims {HEAD_DIMS}, got {head_dim}.")
    if config is None:
        config = default_config(q.shape[1] // k_pages.shape[2], k_pages.shape[1], q.shape[0], *page_table.shape,
                                kv_heads=k_pages.shape[2], head_dim=head_dim, itemsize=k_pages.dtype.itemsize)
        if mosaic:
            config = mosaic_config(config, k_pages.shape[1], kv_heads=k_pages.shape[2], head_dim=head_dim,
                                   itemsize=k_pages.dtype.itemsize)
    config.validate()
    return paged_attention(q, k_pages, v_pages, page_table, seq_ids, positions, context_lens,
                                   k_scale=k_scale, v_scale=v_scale, sm_scale=float(sm_scale), window=window,
                                   config=config, interpret=interpret)


def append(
    k_pages: jax.Array,  # [P, Z, Hkv, K]
    v_pages: jax.Array,  # [P, Z, Hkv, K]
    k: jax.Array,  # [T, Hkv, K]
    v: jax.Array,  # [T, Hkv, K]
    slots: jax.Array,  # [T] int
    *,
    k_scale: jax.Array | None = None,  # [P, Z, Hkv] float32, fp8 pages only
    v_scale: jax.Array | None = None,
    k_new_scale: jax.Array | None = None,  # [T, Hkv] float32, fp8 pages only
    v_new_scale: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """Writes row t's key and value at slot slots[t] = page * Z + offset of the pool; a slot outside
    [0, P Z) (-1 for padding rows) writes nothing.

    An fp8 pool takes values already quantized with their per-token, per-head scales (k_new_scale,
    v_new_scale), stored beside them in k_scale / v_scale; other pools take values cast to their dtype.
    Returns (k_pages, v_pages), plus (k_scale, v_scale) for an fp8 pool. Under jit with the pool
    donated the write is in place: its cost is the new rows' bytes. (An XLA scatter: one row per
    token, nothing a kernel would do better.)
    """
    if k_pages.ndim != 4 or v_pages.shape != k_pages.shape or v_pages.dtype != k_pages.dtype:
        raise ValueError(f"k_pages and v_pages must be one [P, Z, Hkv, K] shape and dtype, got "
                         f"{k_pages.dtype} {k_pages.shape} and {v_pages.dtype} {v_pages.shape}.")
    if k.ndim != 3 or k.shape[1:] != k_pages.shape[2:] or v.shape != k.shape:
        raise ValueError(f"k and v must be [T, Hkv, K] with (Hkv, K) = {k_pages.shape[2:]}, got {k.shape} and "
                         f"{v.shape}.")
    if slots.shape != k.shape[:1] or not jnp.issubdtype(slots.dtype, jnp.integer):
        raise ValueError(f"slots must be an int array of shape ({k.shape[0]},), got {slots.dtype} {slots.shape}.")
    fp8 = k_pages.dtype == jnp.float8_e4m3fn
    scales = (k_scale, v_scale, k_new_scale, v_new_scale)
    if any((s is None) == fp8 for s in scales):
        raise ValueError("an fp8 pool needs k_scale, v_scale, k_new_scale and v_new_scale; other pools take none.")
    if fp8 and (k_scale.shape != k_pages.shape[:3] or k_new_scale.shape != k.shape[:2]):
        raise ValueError(f"k_scale must be [P, Z, Hkv] = {k_pages.shape[:3]} and k_new_scale [T, Hkv] = "
                         f"{k.shape[:2]}, got {k_scale.shape} and {k_new_scale.shape}.")
    return reference.append(k_pages, v_pages, k, v, slots, *scales)


def _check(q, k_pages, v_pages, page_table, seq_ids, positions, context_lens, k_scale, v_scale) -> None:
    if q.ndim != 3:
        raise ValueError(f"q must have rank 3 [T, Hq, K], got shape {q.shape}.")
    if k_pages.ndim != 4:
        raise ValueError(f"k_pages must have rank 4 [P, Z, Hkv, K], got shape {k_pages.shape}.")
    if v_pages.shape != k_pages.shape or v_pages.dtype != k_pages.dtype:
        raise ValueError(f"v_pages must match k_pages ({k_pages.dtype} {k_pages.shape}), got "
                         f"{v_pages.dtype} {v_pages.shape}.")
    rows, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, kd = k_pages.shape
    if kd != head_dim:
        raise ValueError(f"q and the pages disagree on the head dim: {head_dim} vs {kd}.")
    if page_size < 1 or num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"the {num_q_heads} query heads must be a multiple of the pages' {num_kv_heads} KV heads "
                         f"(pages of shape {k_pages.shape}).")
    if page_table.ndim != 2 or not jnp.issubdtype(page_table.dtype, jnp.integer):
        raise ValueError(f"page_table must be an int array [S, M], got {page_table.dtype} {page_table.shape}.")
    for name, a, shape in (("seq_ids", seq_ids, (rows,)), ("positions", positions, (rows,)),
                           ("context_lens", context_lens, page_table.shape[:1])):
        if a.shape != shape or not jnp.issubdtype(a.dtype, jnp.integer):
            raise ValueError(f"{name} must be an int array of shape {shape}, got {a.dtype} {a.shape}.")
    if q.dtype not in _QUERY_DTYPES:
        raise ValueError(f"q must be bfloat16, float16 or float32, got {q.dtype}.")
    if k_pages.dtype not in _CACHE_DTYPES:
        raise ValueError(f"the pages must be bfloat16, float16, float32 or float8_e4m3fn, got {k_pages.dtype}.")
    fp8 = k_pages.dtype == jnp.float8_e4m3fn
    if fp8 != (k_scale is not None) or (k_scale is None) != (v_scale is None):
        raise ValueError("fp8 pages need both k_scale and v_scale, and only fp8 pages take them.")
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is not None and scale.shape != k_pages.shape[:3]:
            raise ValueError(f"{name} must be [P, Z, Hkv] = {k_pages.shape[:3]}, got {scale.shape}.")
