# B sequences (cache rows), n sequences written (n <= B), S cached positions, Hkv key/value heads,
# K head dim, R heads per program (Hkv padded to a power of two).
"""Cache append on the Pallas Triton backend: one program per sequence writes its token's keys and
values (quantized per head, with their scales, for an fp8 cache) straight into the cache buffers,
which alias the outputs. XLA would spend a reduction, a select and a scatter per buffer on it: about
ten small kernels a layer where this is one."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.cache_append.reference import FP8_MAX, TINY


def _kernel(
    pos_ref,  # [] int32
    k_ref,  # [Hkv, K]
    v_ref,  # [Hkv, K]
    *refs,  # caches in: k, v [B, S, Hkv, K] (k_scale, v_scale [B, S, Hkv]); then the same out, aliased
    heads: int,
    rows: int,
    quantized: bool,
):
    outs = refs[len(refs) // 2:]
    k_out, v_out = outs[:2]
    scale_outs = outs[2:] if quantized else (None, None)
    seq_len, head_dim = k_out.shape[1], k_out.shape[3]
    b = pl.program_id(0)
    pos = pos_ref[...]
    ok = lax.broadcasted_iota(jnp.int32, (rows, head_dim), 0) < heads  # [R, K]
    head_ok = lax.broadcasted_iota(jnp.int32, (rows,), 0) < heads  # [R]

    @pl.when((pos >= 0) & (pos < seq_len))
    def _():
        for new_ref, cache_ref, scale_ref in zip((k_ref, v_ref), (k_out, v_out), scale_outs):
            x = plgpu.load(new_ref.at[pl.ds(0, rows), :], mask=ok, other=0.0).astype(jnp.float32)  # [R, K]
            if quantized:
                scale = jnp.maximum(jnp.max(jnp.abs(x), axis=1), TINY) / FP8_MAX  # [R]
                x = jnp.clip(x / scale[:, None], -FP8_MAX, FP8_MAX)
                plgpu.store(scale_ref.at[b, pos, pl.ds(0, rows)], scale, mask=head_ok)
            plgpu.store(cache_ref.at[b, pos, pl.ds(0, rows), :], x.astype(cache_ref.dtype), mask=ok)


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
    n, heads, head_dim = k.shape
    caches = [k_cache, v_cache] + ([] if k_scale is None else [k_scale, v_scale])
    whole = [pl.BlockSpec(c.shape, lambda b, nd=c.ndim: (0,) * nd) for c in caches]
    new_spec = pl.BlockSpec((None, heads, head_dim), lambda b: (b, 0, 0))
    kernel = functools.partial(_kernel, heads=heads, rows=pl.next_power_of_2(heads), quantized=k_scale is not None)
    return tuple(pl.pallas_call(
        kernel,
        grid=(n,),
        in_specs=[pl.BlockSpec((None,), lambda b: (b,)), new_spec, new_spec] + whole,
        out_specs=whole,
        out_shape=[jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches],
        input_output_aliases={3 + i: i for i in range(len(caches))},
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="jaxfire_cache_append",
    )(positions.astype(jnp.int32), k, v, *caches))
