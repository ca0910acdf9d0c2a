"""Grouped (ragged) expert matmul: the public entry points, input checks and backend choice.

Shapes: T rows (sorted by expert), K contraction, N output columns,
E experts, F swiglu width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import mosaic, reference, triton
from pallas_kernels.grouped_matmul.config import Config, mosaic_config, triton_config
from pallas_kernels import triton_call
from pallas_kernels.implementation import TRITON_LAUNCHERS

IMPLEMENTATIONS = (None, "reference", "pallas", "pallas_mma", "pallas_mosaic", "pallas_triton", *TRITON_LAUNCHERS)
_FP8 = jnp.dtype(jnp.float8_e4m3fn)
_INPUT_DTYPES = (jnp.dtype(jnp.bfloat16), _FP8)
_OUTPUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
# At or below this many rows the bandwidth-bound Triton kernel beats the wgmma kernel (H100 grid in
# bench/results/grouped_matmul.jsonl): at T=128 it took 10-26% less time in bf16 in three of the
# four shape/routing cases (5% more in one). With fp8 operands the wgmma kernel took as long or up to
# 21% less there, and it also reads the experts' FP8 weights faster at decode sizes (one H200,
# studies decode-alt and decode-tiles, 8 / 32 / 64 rows over 8 experts): the down projection in 114 /
# 150 / 150 us against 178-180 for the weight-only Triton kernel, the fused gate/up (64-row tiles) in
# 222 / 229 / 231 against 321-322. So FP8 activations take it from 8 rows (jaxfire.quant quantizes
# expert rows from there). Below that the whole decode step measured no gain on it (one H100, run S6:
# 1.75 against 1.68 ms per 8 layers at batch 1, 2.49 against 2.56 at batch 2).
DECODE_MAX_ROWS = {1: 7, 2: 128}  # by lhs itemsize


def _check(lhs, rhs, group_sizes, lhs_scale, rhs_scale, transpose_rhs, out_dtype, implementation, config,
           swiglu):
    name = "grouped_matmul_swiglu" if swiglu else "grouped_matmul"
    rhs_name = "rhs_gate_up" if swiglu else "rhs"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{name}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
    if config is not None and not isinstance(config, Config):
        raise ValueError(f"{name}: config must be a pallas_kernels.grouped_matmul.Config, got {type(config).__name__}.")
    if lhs.ndim != 2:
        raise ValueError(f"{name}: lhs must be [T, K], got shape {lhs.shape}.")
    if rhs.ndim != 3:
        layout = "[E, N, K]" if transpose_rhs else "[E, K, N]"
        raise ValueError(f"{name}: {rhs_name} must be {layout}, got shape {rhs.shape}.")
    t, k = lhs.shape
    e = rhs.shape[0]
    rhs_k, n = (rhs.shape[2], rhs.shape[1]) if transpose_rhs else (rhs.shape[1], rhs.shape[2])
    if rhs_k != k:
        axis = "last" if transpose_rhs else "middle"
        raise ValueError(
            f"{name}: lhs has K={k} but the {axis} axis of {rhs_name} {rhs.shape} "
            f"(transpose_rhs={transpose_rhs}) has {rhs_k}."
        )
    if group_sizes.shape != (e,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"{name}: group_sizes must be an integer vector of length E={e}, "
            f"got {group_sizes.dtype} of shape {group_sizes.shape}."
        )
    if swiglu and n % 2:
        raise ValueError(f"{name}: {rhs_name} must stack gate and up on its output axis, but it has an odd N={n}.")
    for arg, dtype in (("lhs", lhs.dtype), (rhs_name, rhs.dtype)):
        if jnp.dtype(dtype) not in _INPUT_DTYPES:
            raise ValueError(f"{name}: {arg} must be bfloat16 or float8_e4m3fn, got {jnp.dtype(dtype).name}.")
    if jnp.dtype(lhs.dtype) == _FP8 and jnp.dtype(rhs.dtype) != _FP8:
        raise ValueError(f"{name}: fp8 lhs needs fp8 {rhs_name} too, got {jnp.dtype(rhs.dtype).name}.")
    if jnp.dtype(lhs.dtype) == _FP8 and lhs_scale is None:
        raise ValueError(f"{name}: fp8 lhs needs lhs_scale, its per-row float32 scale [T].")
    if jnp.dtype(rhs.dtype) == _FP8 and rhs_scale is None:
        raise ValueError(f"{name}: fp8 {rhs_name} needs rhs_scale, its per-output-channel float32 scale [E, N].")
    if lhs_scale is not None and lhs_scale.shape != (t,):
        raise ValueError(f"{name}: lhs_scale must be [T]=({t},), got shape {lhs_scale.shape}.")
    if rhs_scale is not None and rhs_scale.shape != (e, n):
        raise ValueError(f"{name}: rhs_scale must be [E, N]=({e}, {n}), got shape {rhs_scale.shape}.")
    for arg, s in (("lhs_scale", lhs_scale), ("rhs_scale", rhs_scale)):
        if s is not None and not jnp.issubdtype(s.dtype, jnp.floating):
            raise ValueError(f"{name}: {arg} must be floating point, got {s.dtype}.")
    if jnp.dtype(out_dtype) not in _OUTPUT_DTYPES:
        raise ValueError(
            f"{name}: preferred_element_type must be bfloat16, float16 or float32, got {jnp.dtype(out_dtype).name}."
        )


def fp8_takes_wgmma(num_rows: int, k: int, n: int, *, swiglu: bool) -> bool:
    """Whether FP8 x FP8 rows of a K-major problem (`n`: the weight's rows, gate and up together for
    swiglu) run on the wgmma kernel when the implementation is left to choose."""
    lhs, rhs = jax.ShapeDtypeStruct((num_rows, k), _FP8), jax.ShapeDtypeStruct((1, n, k), _FP8)
    return _pallas_backend(lhs, rhs, True, swiglu, jnp.dtype(jnp.bfloat16), None, None)[0] == "mosaic"


def _pallas_backend(lhs, rhs, transpose_rhs, swiglu, out_dtype, config, implementation) -> tuple[str, Config]:
    """The kernel and config for a problem: decode-sized -> Triton, else wgmma if it can. "triton" (the
    kernel written in Triton itself) takes the Pallas Triton kernel's configs."""
    t, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    n_out = n // 2 if swiglu else n
    t_config = dict(swiglu=swiglu, num_groups=rhs.shape[0], weight_itemsize=jnp.dtype(rhs.dtype).itemsize,
                    gemv=implementation != "pallas_mma")
    if implementation == "pallas_triton" or implementation in TRITON_LAUNCHERS:
        return "triton", config or triton_config(t, k, n_out, **t_config)
    m_config = config or mosaic_config(t, k, n_out, itemsize=jnp.dtype(lhs.dtype).itemsize, swiglu=swiglu)
    reason = mosaic.unsupported_reason(
        lhs.dtype, rhs.dtype, k, n, transpose_rhs=transpose_rhs, swiglu=swiglu, out_dtype=out_dtype, config=m_config
    )
    if implementation == "pallas_mosaic":
        if reason is not None:
            raise ValueError(f"implementation='pallas_mosaic' cannot run this problem: {reason}.")
        return "mosaic", m_config
    if reason is None and t > DECODE_MAX_ROWS[jnp.dtype(lhs.dtype).itemsize]:
        return "mosaic", m_config
    return "triton", config or triton_config(t, k, n_out, **t_config)


def _run(lhs, rhs, group_sizes, lhs_scale, rhs_scale, transpose_rhs, out_dtype, implementation, config, swiglu):
    out_dtype = jnp.dtype(out_dtype)
    _check(lhs, rhs, group_sizes, lhs_scale, rhs_scale, transpose_rhs, out_dtype, implementation, config, swiglu)
    on_cpu = jax.default_backend() == "cpu"
    if implementation == "reference" or (implementation is None and on_cpu):
        ref = reference.grouped_matmul_swiglu if swiglu else reference.grouped_matmul
        return ref(lhs, rhs, group_sizes, lhs_scale=lhs_scale, rhs_scale=rhs_scale, transpose_rhs=transpose_rhs,
                   preferred_element_type=out_dtype)
    backend, cfg = _pallas_backend(lhs, rhs, transpose_rhs, swiglu, out_dtype, config, implementation)
    if implementation in TRITON_LAUNCHERS:
        triton_jit = triton_call.load("grouped_matmul")
        if (reason := triton_jit.unsupported_reason(cfg)) is not None:
            raise ValueError(f"implementation={implementation!r} cannot run this problem: {reason}.")
        return triton_jit.grouped_matmul(lhs, rhs, group_sizes.astype(jnp.int32), lhs_scale, rhs_scale,
                                         transpose_rhs=transpose_rhs, swiglu=swiglu, out_dtype=out_dtype,
                                         config=cfg, interpret=on_cpu, launcher=TRITON_LAUNCHERS[implementation])
    if backend == "mosaic":
        return mosaic.grouped_matmul(lhs, rhs, group_sizes.astype(jnp.int32), lhs_scale, rhs_scale,
                                     transpose_rhs=transpose_rhs, swiglu=swiglu, out_dtype=out_dtype, config=cfg,
                                     interpret=on_cpu)
    return triton.grouped_matmul(lhs, rhs, group_sizes.astype(jnp.int32), lhs_scale,
                                 rhs_scale, transpose_rhs=transpose_rhs, swiglu=swiglu, out_dtype=out_dtype,
                                 config=cfg, interpret=on_cpu)


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    lhs_scale: jax.Array | None = None,
    rhs_scale: jax.Array | None = None,
    transpose_rhs: bool = False,
    preferred_element_type=jnp.bfloat16,
    implementation: str | None = None,
    config: Config | None = None,
) -> jax.Array:
    """`jax.lax.ragged_dot` with FP8 scales: out[t] = (lhs[t] * lhs_scale[t]) @ (rhs[e(t)] * rhs_scale[e(t)]).

    Args:
      lhs: [T, K] bf16 or float8_e4m3fn, rows sorted by expert.
      rhs: [E, K, N], or [E, N, K] (K-major, the fast layout) when `transpose_rhs`; bf16 or fp8.
      group_sizes: [E] int32 rows per expert; rows past their sum come out as zeros.
      lhs_scale: [T] float32 per-row scale, required for fp8 lhs.
      rhs_scale: [E, N] float32 per-output-channel scale, required for fp8 rhs.
      preferred_element_type: output dtype (bf16, f16 or f32); accumulation is always f32.
      implementation: None (best measured per platform and shape), "reference", "pallas",
        "pallas_mma" ("pallas" without the multiply-add kernel of one-token steps), "pallas_mosaic"
        (wgmma prefill kernel), "pallas_triton" (decode / fallback kernel), "triton" (the same
        kernel written in Triton itself, launched as XLA's Triton custom call) or "jax_triton" (the
        same through jax-triton). Kernels run in interpret mode on a CPU backend.
      config: block sizes (`Config`); a heuristic default per shape when None.

    Returns:
      [T, N] in `preferred_element_type`.
    """
    return _run(
        lhs, rhs, group_sizes, lhs_scale, rhs_scale, transpose_rhs, preferred_element_type,
        implementation, config, swiglu=False,
    )


def grouped_matmul_swiglu(
    lhs: jax.Array,
    rhs_gate_up: jax.Array,
    group_sizes: jax.Array,
    *,
    lhs_scale: jax.Array | None = None,
    rhs_scale: jax.Array | None = None,
    transpose_rhs: bool = False,
    preferred_element_type=jnp.bfloat16,
    implementation: str | None = None,
    config: Config | None = None,
) -> jax.Array:
    """silu(lhs @ gate) * (lhs @ up) per expert in one pass: the [T, 2F] products never reach memory.

    `rhs_gate_up` is [E, 2F, K] when `transpose_rhs` (first F output channels gate, next F up) or
    [E, K, 2F]; `rhs_scale` is [E, 2F]. Returns [T, F]. Other arguments as in `grouped_matmul`.
    """
    return _run(
        lhs, rhs_gate_up, group_sizes, lhs_scale, rhs_scale, transpose_rhs, preferred_element_type,
        implementation, config, swiglu=True,
    )
