# B sequences (cache rows), n sequences written (n <= B), S cached positions, Hkv key/value heads,
# K head dim, R heads per program (Hkv padded to a power of two).
"""Cache append written in Triton (`pallas_kernels.triton_call`): the Pallas Triton kernel's algorithm
and launch, one program per sequence writing its token's keys and values (quantized per head, with
their scales, for an fp8 cache) straight into the cache buffers, which alias the outputs.

One kernel serves every cache: a Triton kernel's parameters are fixed, so a cache without scales
passes one-float stand-ins for the scale buffers, which the kernel never touches (`QUANTIZED`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from pallas_kernels.cache_append.reference import FP8_MAX, TINY
from pallas_kernels.triton_call import call, compile_for

_LAUNCH = dict(num_warps=1, num_stages=1)
_FP8_MAX = tl.constexpr(FP8_MAX)
_TINY = tl.constexpr(TINY)


@triton.jit
def _kernel(
    pos_ptr,  # [n] int32
    k_ptr,  # [n, Hkv, K]
    v_ptr,  # [n, Hkv, K]
    k_cache_ptr,  # [B, S, Hkv, K], aliased to k_out_ptr
    v_cache_ptr,  # [B, S, Hkv, K], aliased to v_out_ptr
    k_scale_ptr,  # [B, S, Hkv] f32 (a stand-in unless QUANTIZED), aliased to k_scale_out_ptr
    v_scale_ptr,  # [B, S, Hkv] f32 (a stand-in unless QUANTIZED), aliased to v_scale_out_ptr
    k_out_ptr,
    v_out_ptr,
    k_scale_out_ptr,
    v_scale_out_ptr,
    SEQ_LEN: tl.constexpr,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROWS: tl.constexpr,
    QUANTIZED: tl.constexpr,
):
    b = tl.program_id(0)
    pos = tl.load(pos_ptr + b)
    if (pos >= 0) & (pos < SEQ_LEN):
        heads = tl.arange(0, ROWS)  # [R]
        head_ok = heads < HEADS  # [R]
        tile = heads[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]  # [R, K]
        # 64-bit: B * S * Hkv * K passes 2^31 in a large cache.
        token = (b.to(tl.int64) * SEQ_LEN + pos) * HEADS  # index of (b, pos, head 0) in [B, S, Hkv]
        for i in tl.static_range(2):
            new_ptr, cache_ptr, scale_ptr = ((k_ptr, k_out_ptr, k_scale_out_ptr),
                                             (v_ptr, v_out_ptr, v_scale_out_ptr))[i]
            x = tl.load(new_ptr + b * (HEADS * HEAD_DIM) + tile, mask=head_ok[:, None], other=0.0)  # [R, K]
            x = x.to(tl.float32)
            if QUANTIZED:
                scale = tl.maximum(tl.max(tl.abs(x), axis=1), _TINY) / _FP8_MAX  # [R]
                x = tl.minimum(tl.maximum(x / scale[:, None], -_FP8_MAX), _FP8_MAX)
                tl.store(scale_ptr + token + heads, scale, mask=head_ok)
            tl.store(cache_ptr + token * HEAD_DIM + tile, x.to(cache_ptr.dtype.element_ty),
                     mask=head_ok[:, None])


def _operands(k_cache, v_cache, k, v, positions, k_scale, v_scale) -> tuple[list, list, dict, dict]:
    """The kernel's arguments, outputs, aliases and constexprs (arrays or jax.ShapeDtypeStruct)."""
    heads = k.shape[1]
    quantized = k_scale is not None
    if not quantized:
        k_scale = v_scale = jnp.zeros((1,), jnp.float32)
    caches = [k_cache, v_cache, k_scale, v_scale]
    constexprs = dict(SEQ_LEN=k_cache.shape[1], HEADS=heads, HEAD_DIM=k_cache.shape[3],
                      ROWS=1 << (heads - 1).bit_length(), QUANTIZED=quantized)
    out_shape = [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches]
    # The stand-ins are not aliased: their outputs are dropped, and an aliased constant would be copied.
    aliases = {3 + i: i for i in range(4 if quantized else 2)}
    return [positions, k, v, *caches], out_shape, aliases, constexprs


@functools.partial(jax.jit, static_argnames=("interpret", "launcher"))
def cache_append(
    k_cache: jax.Array,  # [B, S, Hkv, K]
    v_cache: jax.Array,  # [B, S, Hkv, K]
    k: jax.Array,  # [n, Hkv, K]
    v: jax.Array,  # [n, Hkv, K]
    positions: jax.Array,  # [n] int
    k_scale: jax.Array | None = None,  # [B, S, Hkv] f32
    v_scale: jax.Array | None = None,  # [B, S, Hkv] f32
    *,
    interpret: bool = False,
    launcher: str = "xla",
) -> tuple[jax.Array, ...]:
    """Expects inputs already checked by the public wrapper."""
    args, out_shape, aliases, constexprs = _operands(k_cache, v_cache, k, v, positions.astype(jnp.int32),
                                                     k_scale, v_scale)
    outs = call(_kernel, *args, out_shape=out_shape, grid=(k.shape[0],), input_output_aliases=aliases,
                interpret=interpret, launcher=launcher, name="jaxfire_cache_append_triton", **_LAUNCH, **constexprs)
    return tuple(outs[:4 if k_scale is not None else 2])


def compile_for_hopper(k_cache, v_cache, k, v, positions, k_scale=None, v_scale=None) -> Any:
    """Triton's compiled kernel for these shapes (arrays or jax.ShapeDtypeStruct, positions int32) on an
    H100, as `cache_append` launches it; needs no GPU."""
    args, out_shape, _, constexprs = _operands(k_cache, v_cache, k, v, positions, k_scale, v_scale)
    return compile_for(_kernel, *args, out_shape=out_shape, **_LAUNCH, **constexprs)
