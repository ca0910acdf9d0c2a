# T token rows, S sequences (page-table rows), M pages per sequence, P pages in the pool, Z page size,
# Hq query heads, Hkv key/value heads, R = Hq // Hkv, K head dim.
"""Ragged paged attention and the page write in plain jnp: the always-available implementation and
the kernel's yardstick."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Token rows per step of the row loop: bounds the gathered keys to ROWS x (M Z) x Hkv x K at a time.
_ROWS = 16


def _dequantize(x: jax.Array, scale: jax.Array | None) -> jax.Array:
    x = x.astype(jnp.float32)
    return x if scale is None else x * scale[..., None]


@functools.partial(jax.jit, static_argnames=("sm_scale", "window"))
def paged_attention(
    q: jax.Array,  # [T, Hq, K]
    k_pages: jax.Array,  # [P, Z, Hkv, K]
    v_pages: jax.Array,  # [P, Z, Hkv, K]
    page_table: jax.Array,  # [S, M] int
    seq_ids: jax.Array,  # [T] int, -1 for padding rows
    positions: jax.Array,  # [T] int
    context_lens: jax.Array,  # [S] int
    *,
    k_scale: jax.Array | None = None,  # [P, Z, Hkv] f32, fp8 pages only
    v_scale: jax.Array | None = None,  # [P, Z, Hkv] f32, fp8 pages only
    sm_scale: float,
    window: int | None = None,
) -> jax.Array:  # [T, Hq, K]
    num_rows, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_pages.shape[1], k_pages.shape[2]
    group = num_q_heads // num_kv_heads
    span = page_table.shape[1] * page_size  # positions a sequence can hold
    pad = -num_rows % _ROWS
    seq = jnp.pad(seq_ids.astype(jnp.int32), (0, pad), constant_values=-1)
    pos = jnp.pad(positions.astype(jnp.int32), (0, pad))
    qf = jnp.pad(q, ((0, pad), (0, 0), (0, 0))).astype(jnp.float32)
    qf = qf.reshape(-1, _ROWS, num_kv_heads, group, head_dim)  # [T/16, 16, Hkv, R, K]

    def rows(args):
        q, seq, pos = args  # [16, Hkv, R, K], [16], [16]
        live = seq >= 0
        s = jnp.where(live, seq, 0)
        pages = page_table[s]  # [16, M]
        k = _dequantize(k_pages[pages], None if k_scale is None else k_scale[pages])  # [16, M, Z, Hkv, K]
        v = _dequantize(v_pages[pages], None if v_scale is None else v_scale[pages])
        k, v = k.reshape(-1, span, num_kv_heads, head_dim), v.reshape(-1, span, num_kv_heads, head_dim)
        kv_pos = jnp.arange(span)[None, :]  # [1, M Z]
        length = jnp.minimum(context_lens[s], pos + 1)[:, None]  # [16, 1]
        valid = live[:, None] & (kv_pos < length)  # [16, M Z]
        if window is not None:
            valid &= kv_pos > pos[:, None] - window
        # What lies outside a row's keys (another sequence's data, NaN included) must not reach it:
        # zeroed, not only masked in the logits (0 * NaN is NaN).
        k = jnp.where(valid[:, :, None, None], k, 0.0)
        v = jnp.where(valid[:, :, None, None], v, 0.0)
        logits = jnp.einsum("thrk,tshk->thrs", q, k, precision=jax.lax.Precision.HIGHEST) * sm_scale
        logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)  # [16, Hkv, R, M Z]
        m = jnp.max(logits, axis=-1, keepdims=True)
        p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
        denom = jnp.sum(p, axis=-1, keepdims=True)
        p = p / jnp.where(denom > 0, denom, 1.0)
        return jnp.einsum("thrs,tshk->thrk", p, v, precision=jax.lax.Precision.HIGHEST)  # [16, Hkv, R, K]

    out = jax.lax.map(rows, (qf, seq.reshape(-1, _ROWS), pos.reshape(-1, _ROWS)))
    return out.reshape(-1, num_q_heads, head_dim)[:num_rows].astype(q.dtype)


@jax.jit
def append(
    k_pages: jax.Array,  # [P, Z, Hkv, K]
    v_pages: jax.Array,  # [P, Z, Hkv, K]
    k: jax.Array,  # [T, Hkv, K] in the pages' dtype
    v: jax.Array,  # [T, Hkv, K]
    slots: jax.Array,  # [T] int: page * Z + offset, -1 writes nothing
    k_scale: jax.Array | None = None,  # [P, Z, Hkv] f32, fp8 pages only
    v_scale: jax.Array | None = None,  # [P, Z, Hkv] f32
    k_new_scale: jax.Array | None = None,  # [T, Hkv] f32
    v_new_scale: jax.Array | None = None,  # [T, Hkv] f32
) -> tuple[jax.Array, ...]:
    num_pages, page_size = k_pages.shape[:2]
    total = num_pages * page_size
    index = jnp.where((slots >= 0) & (slots < total), slots, total)  # out of range -> dropped

    def put(buf, new):
        flat = buf.reshape(total, *buf.shape[2:])  # [P Z, ...]: a view of the donated buffer
        return flat.at[index].set(new.astype(buf.dtype), mode="drop").reshape(buf.shape)

    if k_scale is None:
        return put(k_pages, k), put(v_pages, v)
    return put(k_pages, k), put(v_pages, v), put(k_scale, k_new_scale), put(v_scale, v_new_scale)
