# B batch, S cached positions, H heads (Hq query, Hkv key/value, G = Hq // Hkv), K head dim,
# P splits of the sequence, R query rows per program (G padded to the tensor-core minimum).
"""Split-sequence (flash-decoding) attention for one new token, on the Pallas Triton backend.

Grid (Hkv, P, B), KV heads fastest so that programs sharing a sequence chunk run together and
share the L2 sectors of the per-token scales. Each program streams its share of one KV head's
blocks once for all G query heads of that head, keeps the running max and sum in float32, and
writes a normalised partial output with its log-sum-exp; `combine` merges the P partials. With one
split the program writes the final output directly and no combine runs.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.decode_attention.config import DecodeAttentionConfig
from pallas_kernels.splits import combine

# The smallest M of a tensor-core dot; a group of fewer query heads is padded up to it.
_MIN_ROWS = 16
# What an fp8 cache is widened to: e4m3 -> f16 is one instruction and exact, and f16 keeps more
# bits of q and of the probabilities than bf16 (q must then stay within f16 range, |q| < 65504).
_FP8_COMPUTE_DTYPE = jnp.float16


def _kernel(
    length_ref,  # [] int32
    q_ref,  # [G, K]
    k_ref,  # [S, K]
    v_ref,  # [S, K]
    *refs: Any,  # k_scale, v_scale ([S] per token or [] per head) if quantised; then outputs
    sm_scale: float,
    window: int | None,
    group: int,
    rows: int,
    block_s: int,
    num_splits: int,
    scale_layout: str | None,  # None, "head" or "token"
    compute_dtype: jnp.dtype,
    precision: lax.Precision | None,
):
    if scale_layout is None:
        ks_ref = vs_ref = None
        out_refs = refs
    else:
        ks_ref, vs_ref, *out_refs = refs
    o_ref = out_refs[0]  # [G, K]: final output, or this split's normalised partial
    lse_ref = out_refs[1] if num_splits > 1 else None  # [G]

    seq_len, head_dim = k_ref.shape
    split = pl.program_id(1)
    length = jnp.clip(length_ref[...], 0, seq_len)
    lo = jnp.int32(0) if window is None else jnp.maximum(length - window, 0)
    # Blocks start at `lo`, not at a multiple of block_s: a window then costs no partial block at
    # its start, and rows stay 16-byte aligned because only the row index moves.
    num_blocks = pl.cdiv(length - lo, block_s)
    per_split = pl.cdiv(num_blocks, num_splits)
    first = split * per_split
    last = jnp.minimum(first + per_split, num_blocks)

    row_ok = lax.broadcasted_iota(jnp.int32, (rows, head_dim), 0) < group  # [R, K]
    q = plgpu.load(q_ref.at[pl.ds(0, rows), :], mask=row_ok, other=0.0)  # [R, K]
    q = q.astype(compute_dtype)
    qk_scale = sm_scale
    if scale_layout == "head":
        qk_scale = sm_scale * ks_ref[...]
    offs = lax.broadcasted_iota(jnp.int32, (block_s,), 0)  # [Bs]

    def body(i, carry):
        o, m, l = carry  # [R, K], [R], [R]
        start = lo + i * block_s
        pos_ok = start + offs < length  # [Bs]
        tile_ok = jnp.broadcast_to(pos_ok[:, None], (block_s, head_dim))  # [Bs, K]
        k = plgpu.load(k_ref.at[pl.ds(start, block_s), :], mask=tile_ok, other=0.0)  # [Bs, K]
        s = plgpu.dot(q, k.astype(compute_dtype), trans_b=True, precision=precision)  # [R, Bs] f32
        s = s * qk_scale
        if scale_layout == "token":
            # Scaling the logit columns costs Bs multiplies instead of Bs * K on the tile.
            ks = plgpu.load(ks_ref.at[pl.ds(start, block_s)], mask=pos_ok, other=0.0)  # [Bs]
            s = s * ks[None, :]
        s = jnp.where(pos_ok[None, :], s, -jnp.inf)  # [R, Bs]
        m_new = jnp.maximum(m, jnp.max(s, axis=1))  # [R]: finite, each block has a valid position
        alpha = jnp.exp(m - m_new)  # [R]
        p = jnp.exp(s - m_new[:, None])  # [R, Bs]
        l = l * alpha + jnp.sum(p, axis=1)
        v = plgpu.load(v_ref.at[pl.ds(start, block_s), :], mask=tile_ok, other=0.0)  # [Bs, K]
        if scale_layout == "token":
            vs = plgpu.load(vs_ref.at[pl.ds(start, block_s)], mask=pos_ok, other=0.0)  # [Bs]
            p = p * vs[None, :]
        pv = plgpu.dot(p.astype(compute_dtype), v.astype(compute_dtype), precision=precision)  # [R, K]
        return o * alpha[:, None] + pv, m_new, l

    o = jnp.zeros((rows, head_dim), jnp.float32)
    m = jnp.full((rows,), -jnp.inf, jnp.float32)
    l = jnp.zeros((rows,), jnp.float32)
    o, m, l = lax.fori_loop(first, last, body, (o, m, l))

    # An empty share (length 0, or a split past the end) has l == 0 and yields zeros.
    o = o / jnp.where(l > 0, l, 1.0)[:, None]
    if scale_layout == "head":
        o = o * vs_ref[...]
    plgpu.store(o_ref.at[pl.ds(0, rows), :], o.astype(o_ref.dtype), mask=row_ok)
    if lse_ref is not None:
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)  # [R]
        lse_ok = lax.broadcasted_iota(jnp.int32, (rows,), 0) < group  # [R]
        plgpu.store(lse_ref.at[pl.ds(0, rows)], lse, mask=lse_ok)


@functools.partial(
    jax.jit, static_argnames=("sm_scale", "window", "config", "interpret")
)
def decode_attention(
    q: jax.Array,  # [B, Hq, K]
    k: jax.Array,  # [B, S, Hkv, K]
    v: jax.Array,  # [B, S, Hkv, K]
    lengths: jax.Array,  # [B]
    *,
    k_scale: jax.Array | None = None,  # [Hkv] or [B, S, Hkv]
    v_scale: jax.Array | None = None,  # [Hkv] or [B, S, Hkv]
    sm_scale: float,
    window: int | None,
    config: DecodeAttentionConfig,
    interpret: bool = False,
) -> jax.Array:  # [B, Hq, K]
    """Expects inputs already checked by the public wrapper."""
    batch, num_q_heads, head_dim = q.shape
    seq_len, num_kv_heads = k.shape[1], k.shape[2]
    group = num_q_heads // num_kv_heads
    rows = max(_MIN_ROWS, 1 << (group - 1).bit_length())
    splits = config.num_splits
    quantised = k_scale is not None
    scale_layout = None if not quantised else ("head" if k_scale.ndim == 1 else "token")
    if k.dtype == jnp.float8_e4m3fn:
        compute_dtype = jnp.float32 if q.dtype == jnp.float32 else _FP8_COMPUTE_DTYPE
    else:
        compute_dtype = jnp.promote_types(q.dtype, k.dtype)
    # Triton's default f32 dot rounds inputs to tf32; f32 callers asked for f32.
    precision = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None

    grid = (num_kv_heads, splits, batch)
    kv_spec = pl.BlockSpec((None, seq_len, None, head_dim), lambda h, j, b: (b, 0, h, 0))
    in_specs = [
        pl.BlockSpec((None,), lambda h, j, b: (b,)),
        pl.BlockSpec((None, None, group, head_dim), lambda h, j, b: (b, h, 0, 0)),
        kv_spec,
        kv_spec,
    ]
    args = [lengths.astype(jnp.int32), q.reshape(batch, num_kv_heads, group, head_dim), k, v]
    if scale_layout == "head":
        in_specs += [pl.BlockSpec((None,), lambda h, j, b: (h,))] * 2
        args += [k_scale.astype(jnp.float32), v_scale.astype(jnp.float32)]
    elif scale_layout == "token":
        in_specs += [pl.BlockSpec((None, seq_len, None), lambda h, j, b: (b, 0, h))] * 2
        args += [k_scale.astype(jnp.float32), v_scale.astype(jnp.float32)]

    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct((batch, num_kv_heads, group, head_dim), q.dtype)]
        out_specs = [pl.BlockSpec((None, None, group, head_dim), lambda h, j, b: (b, h, 0, 0))]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((batch, num_kv_heads, splits, group, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, num_kv_heads, splits, group), jnp.float32),
        ]
        out_specs = [
            pl.BlockSpec((None, None, None, group, head_dim), lambda h, j, b: (b, h, j, 0, 0)),
            pl.BlockSpec((None, None, None, group), lambda h, j, b: (b, h, j, 0)),
        ]

    kernel = functools.partial(
        _kernel,
        sm_scale=sm_scale,
        window=window,
        group=group,
        rows=rows,
        block_s=config.block_s,
        num_splits=splits,
        scale_layout=scale_layout,
        compute_dtype=compute_dtype,
        precision=precision,
    )
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="jaxfire_decode_attention",
    )(*args)
    if splits == 1:
        out = outs[0]  # [B, Hkv, G, K]
    else:
        out = combine(*outs, axis=2).astype(q.dtype)
    return out.reshape(batch, num_q_heads, head_dim)

