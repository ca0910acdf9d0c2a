# B batch, S cached positions, H heads (Hq query, Hkv key/value, G = Hq // Hkv), K head dim,
# P splits of the sequence, R query rows per program (G padded to the tensor-core minimum).
"""Split-sequence (flash-decoding) attention for one new token, written in Triton
(`pallas_kernels.triton_call`): the Pallas Triton kernel's algorithm, grid, configs and numerics.

Grid (Hkv, P, B), KV heads fastest. Each program streams its share of one KV head's blocks once for
all G query heads of that head, keeps the running max and sum in float32, and writes a normalised
partial output with its log-sum-exp; `combine` merges the P partials. With one split the program
writes the final output directly and no combine runs.

A Triton kernel's parameters are fixed: a cache without scales passes one-float stand-ins for them,
and one split a one-float log-sum-exp output; the kernel touches neither (`SCALES`, `SPLITS`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from pallas_kernels.decode_attention.config import DecodeAttentionConfig
from pallas_kernels.decode_attention.triton import _FP8_COMPUTE_DTYPE, _MIN_ROWS
from pallas_kernels.splits import combine
from pallas_kernels.triton_call import call, compile_for

_TL_DTYPES = {jnp.dtype(jnp.bfloat16): tl.bfloat16, jnp.dtype(jnp.float16): tl.float16,
              jnp.dtype(jnp.float32): tl.float32}


@triton.jit
def _kernel(
    lengths_ptr,  # [B] int32
    q_ptr,  # [B, Hkv, G, K]
    k_ptr,  # [B', S, Hkv, K]
    v_ptr,  # [B', S, Hkv, K]
    k_scale_ptr,  # [Hkv] or [B', S, Hkv] f32 (SCALES "head" or "token"); a stand-in otherwise
    v_scale_ptr,  # like k_scale_ptr
    o_ptr,  # [B, Hkv, G, K] in q's dtype, or [B, Hkv, P, G, K] f32: each split normalised on its own
    lse_ptr,  # [B, Hkv, P, G] f32; a stand-in with one split
    SM_SCALE: tl.constexpr,
    WINDOW: tl.constexpr,  # None or an int
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SPLITS: tl.constexpr,
    SCALES: tl.constexpr,  # None, "head" or "token"
    SEQ_LEN: tl.constexpr,
    HEADS: tl.constexpr,  # Hkv
    HEAD_DIM: tl.constexpr,
    COMPUTE: tl.constexpr,  # the dots' input dtype
    INPUT_PRECISION: tl.constexpr,
):
    h = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    length = tl.minimum(tl.maximum(tl.load(lengths_ptr + b), 0), SEQ_LEN)
    lo = 0
    if WINDOW is not None:
        lo = tl.maximum(length - WINDOW, 0)
    # Blocks start at `lo`, not at a multiple of BLOCK_S: a window then costs no partial block at its
    # start, and rows stay 16-byte aligned because only the row index moves.
    num_blocks = (length - lo + BLOCK_S - 1) // BLOCK_S
    per_split = (num_blocks + SPLITS - 1) // SPLITS
    first = split * per_split
    last = tl.minimum(first + per_split, num_blocks)

    rows = tl.arange(0, ROWS)  # [R]
    row_ok = rows < GROUP  # [R]
    cols = tl.arange(0, HEAD_DIM)  # [K]
    head = b * HEADS + h  # (b, h) in [B, Hkv]
    q = tl.load(q_ptr + head * (GROUP * HEAD_DIM) + rows[:, None] * HEAD_DIM + cols[None, :],
                mask=row_ok[:, None], other=0.0)  # [R, K]
    q = q.to(COMPUTE)
    # 64-bit: B * S * Hkv * K passes 2^31 in a large cache.
    sequence = b.to(tl.int64) * SEQ_LEN  # (b, position 0) in [B', S]
    k_ptr += sequence * (HEADS * HEAD_DIM) + h * HEAD_DIM
    v_ptr += sequence * (HEADS * HEAD_DIM) + h * HEAD_DIM
    qk_scale = SM_SCALE
    if SCALES == "head":
        qk_scale = SM_SCALE * tl.load(k_scale_ptr + h)
    if SCALES == "token":
        k_scale_ptr += sequence * HEADS + h
        v_scale_ptr += sequence * HEADS + h
    offs = tl.arange(0, BLOCK_S)  # [Bs]

    o = tl.zeros((ROWS, HEAD_DIM), tl.float32)
    m = tl.full((ROWS,), -float("inf"), tl.float32)
    l = tl.zeros((ROWS,), tl.float32)
    for i in range(first, last):
        positions = lo + i * BLOCK_S + offs  # [Bs]
        pos_ok = positions < length  # [Bs]
        tile = positions[:, None] * (HEADS * HEAD_DIM) + cols[None, :]  # [Bs, K]
        k = tl.load(k_ptr + tile, mask=pos_ok[:, None], other=0.0)  # [Bs, K]
        s = tl.dot(q, tl.trans(k.to(COMPUTE)), input_precision=INPUT_PRECISION)  # [R, Bs] f32
        s = s * qk_scale
        if SCALES == "token":
            # Scaling the logit columns costs Bs multiplies instead of Bs * K on the tile.
            ks = tl.load(k_scale_ptr + positions * HEADS, mask=pos_ok, other=0.0)  # [Bs]
            s = s * ks[None, :]
        s = tl.where(pos_ok[None, :], s, -float("inf"))  # [R, Bs]
        m_new = tl.maximum(m, tl.max(s, axis=1))  # [R]: finite, each block has a valid position
        alpha = tl.exp(m - m_new)  # [R]
        p = tl.exp(s - m_new[:, None])  # [R, Bs]
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + tile, mask=pos_ok[:, None], other=0.0)  # [Bs, K]
        if SCALES == "token":
            vs = tl.load(v_scale_ptr + positions * HEADS, mask=pos_ok, other=0.0)  # [Bs]
            p = p * vs[None, :]
        pv = tl.dot(p.to(COMPUTE), v.to(COMPUTE), input_precision=INPUT_PRECISION)  # [R, K]
        o = o * alpha[:, None] + pv
        m = m_new

    # An empty share (length 0, or a split past the end) has l == 0 and yields zeros.
    o = o / tl.where(l > 0, l, 1.0)[:, None]
    if SCALES == "head":
        o = o * tl.load(v_scale_ptr + h)
    out = head * SPLITS + split  # (b, h, split) in [B, Hkv, P]
    tl.store(o_ptr + out * (GROUP * HEAD_DIM) + rows[:, None] * HEAD_DIM + cols[None, :],
             o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    if SPLITS > 1:
        lse = tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), -float("inf"))  # [R]
        tl.store(lse_ptr + out * GROUP + rows, lse, mask=row_ok)


def _operands(q, k, v, lengths, k_scale, v_scale, *, sm_scale, window, config) -> tuple[list, list, dict]:
    """The kernel's arguments, outputs and constexprs (arrays or jax.ShapeDtypeStruct; lengths int32)."""
    batch, num_q_heads, head_dim = q.shape
    seq_len, num_kv_heads = k.shape[1], k.shape[2]
    group = num_q_heads // num_kv_heads
    splits = config.num_splits
    if k_scale is None:
        scale_layout = None
        k_scale = v_scale = jnp.zeros((1,), jnp.float32)
    else:
        scale_layout = "head" if k_scale.ndim == 1 else "token"
    if k.dtype == jnp.float8_e4m3fn:
        compute_dtype = jnp.float32 if q.dtype == jnp.float32 else _FP8_COMPUTE_DTYPE
    else:
        compute_dtype = jnp.promote_types(q.dtype, k.dtype)
    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct((batch, num_kv_heads, group, head_dim), q.dtype),
                     jax.ShapeDtypeStruct((1,), jnp.float32)]
    else:
        out_shape = [jax.ShapeDtypeStruct((batch, num_kv_heads, splits, group, head_dim), jnp.float32),
                     jax.ShapeDtypeStruct((batch, num_kv_heads, splits, group), jnp.float32)]
    constexprs = dict(
        SM_SCALE=sm_scale, WINDOW=window, GROUP=group, ROWS=max(_MIN_ROWS, 1 << (group - 1).bit_length()),
        BLOCK_S=config.block_s, SPLITS=splits, SCALES=scale_layout, SEQ_LEN=seq_len, HEADS=num_kv_heads,
        HEAD_DIM=head_dim, COMPUTE=_TL_DTYPES[jnp.dtype(compute_dtype)],
        # Triton's default f32 dot rounds inputs to tf32; f32 callers asked for f32.
        INPUT_PRECISION="ieee" if compute_dtype == jnp.float32 else "tf32",
    )
    return [lengths, q, k, v, k_scale, v_scale], out_shape, constexprs


@functools.partial(jax.jit, static_argnames=("sm_scale", "window", "config", "interpret", "launcher"))
def decode_attention(
    q: jax.Array,  # [B, Hq, K]
    k: jax.Array,  # [B', S, Hkv, K]
    v: jax.Array,  # [B', S, Hkv, K]
    lengths: jax.Array,  # [B]
    *,
    k_scale: jax.Array | None = None,  # [Hkv] or [B', S, Hkv]
    v_scale: jax.Array | None = None,  # [Hkv] or [B', S, Hkv]
    sm_scale: float,
    window: int | None,
    config: DecodeAttentionConfig,
    interpret: bool = False,
    launcher: str = "xla",
) -> jax.Array:  # [B, Hq, K]
    """Expects inputs already checked by the public wrapper."""
    batch, num_q_heads, head_dim = q.shape
    if k_scale is not None:
        k_scale, v_scale = k_scale.astype(jnp.float32), v_scale.astype(jnp.float32)
    args, out_shape, constexprs = _operands(q, k, v, lengths.astype(jnp.int32), k_scale, v_scale,
                                            sm_scale=sm_scale, window=window, config=config)
    o, lse = call(_kernel, *args, out_shape=out_shape, grid=(k.shape[2], config.num_splits, batch),
                  num_warps=config.num_warps, num_stages=config.num_stages, interpret=interpret, launcher=launcher,
                  name="jaxfire_decode_attention_triton", **constexprs)
    if config.num_splits > 1:
        o = combine(o, lse, axis=2).astype(q.dtype)  # [B, Hkv, G, K]
    return o.reshape(batch, num_q_heads, head_dim)


def compile_for_hopper(q, k, v, lengths, k_scale=None, v_scale=None, *, sm_scale: float, window: int | None,
                       config: DecodeAttentionConfig) -> Any:
    """Triton's compiled kernel for these shapes (arrays or jax.ShapeDtypeStruct, lengths int32, scales
    f32) on an H100, as `decode_attention` launches it; needs no GPU."""
    args, out_shape, constexprs = _operands(q, k, v, lengths, k_scale, v_scale, sm_scale=sm_scale,
                                            window=window, config=config)
    return compile_for(_kernel, *args, out_shape=out_shape, num_warps=config.num_warps,
                       num_stages=config.num_stages, **constexprs)
