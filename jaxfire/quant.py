"""FP8 arrays and the matmul helpers every weight goes through.

Model code calls `dense` for projections and `grouped` for expert projections and never looks at a
weight's dtype: a weight is either a plain array or a `QArray` (float8_e4m3fn values with float32
scales per output channel), and what runs for each is decided here, in one place.

FP8 runs in two modes, picked per call from the number of tokens (see `Fp8Policy`):
- weight-only: the weight is upcast inside the matmul and the activation stays bf16. Few tokens
  (decode) are bound by reading the weights, so this halves the bytes at no accuracy cost.
- fp8 x fp8: activations are quantized per token with a dynamic scale, the matmul runs on the FP8
  tensor cores (twice the bf16 rate), and both scales are applied to the float32 result. Expert
  calls on the GPU's kernels take it from 8 rows (a decode batch of 4 at top-2), where the wgmma
  kernel reads the FP8 weights faster than the weight-only one; projections from 64 tokens.

Dimensions: T tokens, K input width, N output width, E experts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448
_TINY = 1e-12  # keeps all-zero rows from dividing by zero


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QArray:
    """A quantized weight stored [..., N, K]: value * scale[..., :, None] approximates the original."""

    value: jax.Array  # [..., N, K] float8_e4m3fn
    scale: jax.Array  # [..., N] float32

    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape

    @property
    def dtype(self) -> Any:
        return self.value.dtype

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        return (self.value.astype(jnp.float32) * self.scale[..., None]).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Fp8Policy:
    """When FP8 weights also get FP8 activations. A static argument of the jitted model functions.

    activations: "auto" quantizes activations from `min_tokens` tokens per call on (prefill and
    large batches), and the rows of expert calls that may run on the wgmma kernel from
    `min_kernel_rows` on; "always" and "never" force the choice.

    Measured on one H200 (bench/grouped_matmul.py, studies decode-alt and decode-tiles): at 8-64
    expert rows the wgmma kernel with FP8 activations takes 222-231 us for the fused gate/up and
    114-120 us for the down projection (its tiles task-major, run S5), where the weight-only kernel
    took 319-322 and 178-182 us.
    The projections are another matter: with FP8 activations XLA was slower than its weight-only
    product below 64 tokens (15.5 against 9.9 us for q/k/v at 8). In whole decode steps
    (bench/decode.py, run S4, 8 layers) these paths took 3.03 / 3.51 / 3.70 / 3.87 ms at batch
    4 / 8 / 16 / 32 against 3.61 / 4.29 / 4.55 / 3.97 for the weight-only paths before them. One
    layer's logits part from XLA's weight-only decode by 4.2% (1.1% weight-only), the e4m3 rounding
    of the activations.
    """

    activations: str = "auto"
    min_tokens: int = 64
    min_kernel_rows: int = 8

    def __post_init__(self):
        if self.activations not in ("auto", "always", "never"):
            raise ValueError(f"Fp8Policy.activations must be 'auto', 'always' or 'never', got {self.activations!r}")

    def quantize_activations(self, tokens: int, kernel: bool = False) -> bool:
        """For a call of `tokens` rows; `kernel`: an expert call that may run on the wgmma kernel."""
        if self.activations == "auto":
            return tokens >= (min(self.min_tokens, self.min_kernel_rows) if kernel else self.min_tokens)
        return self.activations == "always"


def quantize(w: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """Symmetric e4m3 quantization with one scale per slice along `axis` (the contracted axis)."""
    wf = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(wf), axis=axis, keepdims=True)
    scale = jnp.maximum(amax, _TINY) / FP8_MAX
    value = jnp.clip(wf / scale, -FP8_MAX, FP8_MAX).astype(FP8)
    return value, jnp.squeeze(scale, axis)


def quantize_weight(w: jax.Array) -> QArray:
    value, scale = quantize(w, axis=-1)
    return QArray(value=value, scale=scale)


def _num_tokens(x: jax.Array) -> int:
    n = 1
    for d in x.shape[:-1]:
        n *= d
    return n


def dense(x: jax.Array, w: jax.Array | QArray, policy: Fp8Policy = Fp8Policy(),
          implementation: str = "xla") -> jax.Array:
    """x @ w.T for a weight stored [N, K]; returns x's dtype.

    `implementation` as for `grouped`: with "auto" on a GPU, weight-only FP8 of one token runs as a
    one-group grouped matmul on the multiply-add kernel; from two tokens on XLA's own product,
    which fuses the upcast into its matmul and read the weight 3-5x faster than the grouped
    matmul's MMA kernel at 8 and 32 tokens (one H200, study=decode-alt: q/k/v 9.9 / 13.3 us
    against 32 / 52, o 7.6 / 9.6 against 39 / 46).
    """
    # x: [..., K], w: [N, K] -> [..., N]
    if not isinstance(w, QArray):
        return jnp.einsum("...k,nk->...n", x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    fp8_acts = policy.quantize_activations(_num_tokens(x))
    if not fp8_acts and _dense_kernel(x, implementation):
        rows = x.reshape(-1, x.shape[-1])
        one_group = QArray(value=w.value[None], scale=w.scale[None])
        # weight-only, as decided above (the experts' lower threshold is not the projections')
        y = grouped(rows, one_group, jnp.array([rows.shape[0]], jnp.int32), Fp8Policy("never"), implementation)
        return y.reshape(*x.shape[:-1], -1)
    if fp8_acts:
        xq, xs = quantize(x, axis=-1)  # [..., K], [...]
        y = jnp.einsum("...k,nk->...n", xq, w.value, preferred_element_type=jnp.float32)
        return (y * xs[..., None] * w.scale).astype(x.dtype)
    y = jnp.einsum("...k,nk->...n", x, w.value.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * w.scale).astype(x.dtype)


_GROUPED_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)


def _ragged(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    # x: [T, K], w: [E, N, K] -> [T, N] float32
    return jax.lax.ragged_dot_general(x, w, group_sizes, _GROUPED_DIMS, preferred_element_type=jnp.float32)


def _row_scale(ys: jax.Array, w: QArray, group_sizes: jax.Array) -> jax.Array:
    """The per-output-channel scale of each row's own expert."""
    # ys: [T, N] -> [T, N]
    expert_of_row = jnp.repeat(jnp.arange(group_sizes.shape[0]), group_sizes, total_repeat_length=ys.shape[0])
    return w.scale[expert_of_row]


def _grouped_backend(x: jax.Array, implementation: str) -> str | None:
    """"xla", or the `implementation=` to pass to pallas_kernels ("auto": its own choice on GPUs, for
    the bf16 activations its kernels take)."""
    if implementation == "auto":
        on_gpu = jax.default_backend() == "gpu" and x.dtype == jnp.bfloat16
        return None if on_gpu else "xla"
    return implementation


def _dense_kernel(x: jax.Array, implementation: str) -> bool:
    """Whether a weight-only FP8 projection of x runs on the grouped matmul's kernels: a named
    implementation always, "auto" for one token on a GPU."""
    if implementation == "auto":
        return _grouped_backend(x, implementation) != "xla" and _num_tokens(x) == 1
    return implementation != "xla"


def _takes_wgmma(backend: str | None, x: jax.Array, w: jax.Array | QArray, swiglu: bool) -> bool:
    """Whether the grouped matmul would run x's rows through w on its wgmma kernel with FP8
    activations: a backend that includes it (the default choice, or a named one) and a problem it
    takes (elsewhere FP8 activations would land on the Triton kernel, not measured faster)."""
    if backend not in (None, "pallas", "pallas_mma", "pallas_mosaic"):
        return False
    from pallas_kernels.grouped_matmul.api import fp8_takes_wgmma

    return fp8_takes_wgmma(x.shape[0], w.shape[-1], w.shape[-2], swiglu=swiglu)


def _kernel_operands(x: jax.Array, w: jax.Array | QArray, fp8_acts: bool):
    lhs, lhs_scale = quantize(x, axis=-1) if fp8_acts else (x, None)
    rhs, rhs_scale = (w.value, w.scale) if isinstance(w, QArray) else (w.astype(x.dtype), None)
    return dict(lhs=lhs, lhs_scale=lhs_scale, rhs=rhs, rhs_scale=rhs_scale)


def grouped(x: jax.Array, w: jax.Array | QArray, group_sizes: jax.Array, policy: Fp8Policy = Fp8Policy(),
            implementation: str = "xla") -> jax.Array:
    """Per-group x @ w[e].T over rows sorted by expert, w stored [E, N, K]; rows past sum(group_sizes) are zero.

    implementation: "xla" runs `jax.lax.ragged_dot_general`; "auto" the Pallas kernels on GPUs (XLA
    elsewhere); any other value is passed as `implementation=` to `pallas_kernels.grouped_matmul`.
    """
    # x: [T, K], w: [E, N, K] -> [T, N]
    backend = _grouped_backend(x, implementation)
    fp8_acts = isinstance(w, QArray) and policy.quantize_activations(
        x.shape[0], kernel=_takes_wgmma(backend, x, w, swiglu=False))
    if backend != "xla":
        from pallas_kernels import grouped_matmul

        ops = _kernel_operands(x, w, fp8_acts)
        return grouped_matmul(ops["lhs"], ops["rhs"], group_sizes, lhs_scale=ops["lhs_scale"],
                              rhs_scale=ops["rhs_scale"], transpose_rhs=True, preferred_element_type=x.dtype,
                              implementation=backend)
    if not isinstance(w, QArray):
        return _ragged(x, w.astype(x.dtype), group_sizes).astype(x.dtype)
    if fp8_acts:
        xq, xs = quantize(x, axis=-1)
        y = _ragged(xq, w.value, group_sizes) * xs[:, None]
    else:
        y = _ragged(x, w.value.astype(x.dtype), group_sizes)
    return (y * _row_scale(y, w, group_sizes)).astype(x.dtype)


def grouped_swiglu(x: jax.Array, w: jax.Array | QArray, group_sizes: jax.Array,
                   policy: Fp8Policy = Fp8Policy(), implementation: str = "xla") -> jax.Array:
    """silu(x @ gate.T) * (x @ up.T) per group, w stored [E, 2F, K] (gate rows first); [T, F].

    The Pallas path fuses both projections and the product, so the [T, 2F] intermediate never
    reaches memory.
    """
    backend = _grouped_backend(x, implementation)
    if backend == "xla":
        gate, up = jnp.split(grouped(x, w, group_sizes, policy, "xla"), 2, axis=-1)
        return jax.nn.silu(gate) * up
    from pallas_kernels import grouped_matmul_swiglu

    fp8_acts = isinstance(w, QArray) and policy.quantize_activations(
        x.shape[0], kernel=_takes_wgmma(backend, x, w, swiglu=True))
    ops = _kernel_operands(x, w, fp8_acts)
    return grouped_matmul_swiglu(ops["lhs"], ops["rhs"], group_sizes, lhs_scale=ops["lhs_scale"],
                                 rhs_scale=ops["rhs_scale"], transpose_rhs=True, preferred_element_type=x.dtype,
                                 implementation=backend)
