# B sequences (cache rows), n sequences written (n <= B), S cached positions, Hkv key/value heads,
# K head dim, G = 64 tile rows (one warpgroup's register tile).
"""Cache append on Mosaic GPU: one warpgroup per sequence copies its token's key and value heads into
shared memory by TMA, quantizes each head (an fp8 cache: scale max|x| / 448) in registers, and writes
the rows (and their scales) into the cache by TMA. The caches are passed as mutable refs, so the
kernel writes them in place (under jit with the caches donated it moves the new tokens' bytes only).

The [Hkv, K] heads sit in the first rows of a 64-row tile, the register layout the warpgroup reduces
over; the rows past Hkv are never stored. An fp8 cache's [Hkv] scale row is one TMA box, which must
be a whole number of 16 bytes: Hkv a multiple of 4.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.cache_append.reference import FP8, FP8_MAX, TINY

TILE_ROWS = 64


def unsupported_reason(cache_dtype, heads: int) -> str | None:
    """Why the Mosaic kernel cannot write a cache (None when it can)."""
    if heads > TILE_ROWS:
        return f"{heads} KV heads exceed the {TILE_ROWS}-row tile"
    if jnp.dtype(cache_dtype) == FP8 and heads % 4:
        return f"an fp8 cache's scale row of {heads} heads is not a whole number of 16-byte TMA units (Hkv % 4)"
    return None


def _kernel(pos_gmem, k_gmem, v_gmem, *caches, seq_len: int, heads: int):
    quantized = len(caches) == 4
    b = lax.axis_index("b")

    def body(new_smem, out_smem, scale_smem, barrier):
        pos = pos_gmem[b]

        @pl.when((pos >= 0) & (pos < seq_len))  # a position outside the cache writes nothing
        def _():
            for i, src in enumerate((k_gmem, v_gmem)):
                plgpu.copy_gmem_to_smem(src.at[b], new_smem.at[i, pl.ds(0, heads)], barrier)
            plgpu.barrier_wait(barrier)
            for i, cache in enumerate(caches[:2]):
                x = plgpu.load(new_smem.at[i], layout=plgpu.Layout.WGMMA).astype(jnp.float32)  # [G, K]
                if quantized:
                    scale = jnp.maximum(jnp.max(jnp.abs(x), axis=1), TINY) / FP8_MAX  # [G]
                    x = jnp.clip(x / lax.broadcast_in_dim(scale, x.shape, [0]), -FP8_MAX, FP8_MAX)
                    scale_smem[i] = scale
                out_smem[i] = x.astype(out_smem.dtype)
            plgpu.commit_smem()
            for i, cache in enumerate(caches[:2]):
                plgpu.copy_smem_to_gmem(out_smem.at[i, pl.ds(0, heads)], cache.at[b, pos])
                if quantized:
                    plgpu.copy_smem_to_gmem(scale_smem.at[i, pl.ds(0, heads)], caches[2 + i].at[b, pos])
            plgpu.wait_smem_to_gmem(0)

    head_dim = k_gmem.shape[-1]
    pl.run_scoped(body, plgpu.SMEM((2, TILE_ROWS, head_dim), k_gmem.dtype),
                  plgpu.SMEM((2, TILE_ROWS, head_dim), caches[0].dtype),
                  plgpu.SMEM((2, TILE_ROWS), jnp.float32), plgpu.Barrier(num_arrivals=2))


@functools.partial(jax.jit, static_argnames=("interpret",))
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
) -> tuple[jax.Array, ...]:
    """Expects inputs already checked by the public wrapper."""
    n, heads, _ = k.shape
    reason = unsupported_reason(k_cache.dtype, heads)
    if reason is not None:
        raise ValueError(f"The Mosaic GPU cache append cannot write this cache: {reason}.")
    caches = [k_cache, v_cache] + ([] if k_scale is None else [k_scale, v_scale])
    refs = [jax.new_ref(c) for c in caches]
    plgpu.kernel(
        functools.partial(_kernel, seq_len=k_cache.shape[1], heads=heads),
        out_type=(),
        grid=(n,),
        grid_names=("b",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name="jaxfire_cache_append_mosaic",
    )(positions.astype(jnp.int32), k, v, *refs)
    return tuple(r[...] for r in refs)
