"""`pallas_kernels.triton_call` in interpret mode: arguments, outputs, aliases and dtypes reach a Triton
kernel as jax-triton passes them on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from pallas_kernels.triton_call import call, compile_for  # noqa: E402


@triton.jit
def _scale_add(x_ptr, y_ptr, n, alpha, o_ptr, acc_ptr, BLOCK: tl.constexpr):
    """o = alpha x + y (in x's dtype); acc (aliased to y's buffer) += x in f32."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=ok)
    tl.store(o_ptr + offs, (alpha * x + y).to(o_ptr.dtype.element_ty), mask=ok)
    acc = tl.load(acc_ptr + offs, mask=ok)
    tl.store(acc_ptr + offs, acc + x, mask=ok)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float8_e4m3fn, jnp.float32])
def test_arguments_outputs_and_an_alias_under_jit(dtype):
    n, block = 37, 16
    x = jax.random.normal(jax.random.key(0), (n,)).astype(dtype)
    y = jax.random.normal(jax.random.key(1), (n,))

    @jax.jit
    def f(x, y):
        return call(_scale_add, x, y, n, 0.5, out_shape=[jax.ShapeDtypeStruct((n,), dtype),
                                                         jax.ShapeDtypeStruct((n,), jnp.float32)],
                    grid=(-(-n // block),), num_warps=1, num_stages=1, input_output_aliases={1: 1},
                    interpret=True, BLOCK=block)

    o, acc = f(x, y)
    xf = np.asarray(x.astype(jnp.float32))
    assert o.dtype == dtype
    # rounded to nearest even, as on the device (the interpreter's own casts truncate, or drop a carry)
    want = (np.float32(0.5) * xf + np.asarray(y)).astype(np.dtype(dtype))
    np.testing.assert_array_equal(np.asarray(o).view(np.uint8), want.view(np.uint8))
    np.testing.assert_allclose(np.asarray(acc), np.asarray(y) + xf, rtol=1e-6)


def test_unwritten_outputs_are_nan_and_an_empty_grid_returns_the_aliased_inputs():
    n = 20
    x, y = jnp.ones((n,)), jnp.arange(n, dtype=jnp.float32)
    shapes = [jax.ShapeDtypeStruct((n,), jnp.float32)] * 2
    o, acc = call(_scale_add, x, y, 8, 1.0, out_shape=shapes, grid=(1,), num_warps=1, num_stages=1,
                  input_output_aliases={1: 1}, interpret=True, BLOCK=8)  # only the first 8 written
    assert np.all(np.isnan(np.asarray(o[8:]))) and np.all(np.asarray(o[:8]) == np.arange(8) + 1)
    np.testing.assert_array_equal(np.asarray(acc), np.arange(n) + (np.arange(n) < 8))
    o, acc = call(_scale_add, x, y, 0, 1.0, out_shape=shapes, grid=(0,), num_warps=1, num_stages=1,
                  input_output_aliases={1: 1}, interpret=True, BLOCK=8)
    assert o.shape == (n,) and np.array_equal(np.asarray(acc), np.asarray(y))


def test_compiles_for_hopper_without_a_gpu():
    n = 64
    compiled = compile_for(
        _scale_add, jax.ShapeDtypeStruct((n,), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((n,), jnp.float32), n, 0.5,
        out_shape=[jax.ShapeDtypeStruct((n,), jnp.bfloat16), jax.ShapeDtypeStruct((n,), jnp.float32)],
        num_warps=1, num_stages=1, BLOCK=32)
    assert len(compiled.asm["cubin"]) > 0 and ".target sm_90" in compiled.asm["ptx"]
    with pytest.raises(ValueError, match="takes 6 non-constexpr parameters, got 5"):
        compile_for(_scale_add, jnp.ones(n), jnp.ones(n), n, 0.5,
                    out_shape=jax.ShapeDtypeStruct((n,), jnp.float32), num_warps=1, num_stages=1, BLOCK=32)
