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
    with pytest.raises(ValueError, match="takes 6 non-constexpr parameters, got 4 arguments and 1 outputs"):
        compile_for(_scale_add, jnp.ones(n), jnp.ones(n), n, 0.5,
                    out_shape=jax.ShapeDtypeStruct((n,), jnp.float32), num_warps=1, num_stages=1, BLOCK=32)


@triton.jit
def _row_max_helper(x):
    return tl.max(x, axis=1)


@triton.jit
def _row_stats(x_ptr, lo_ptr, o_ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """o[r] = max of row r (through a jit helper and tl.max) + the dot of its bf16 row with itself, summed
    over rows lo..ROWS-1 in a loop with traced bounds."""
    r = tl.arange(0, ROWS)[:, None]
    c = tl.arange(0, COLS)[None, :]
    x = tl.load(x_ptr + r * COLS + c)  # bf16 [ROWS, COLS]
    sq = tl.dot(x, tl.trans(x))  # [ROWS, ROWS] f32
    acc = tl.zeros((ROWS,), tl.float32)
    lo = tl.load(lo_ptr)
    for i in range(lo, ROWS):
        acc += tl.sum(tl.where(tl.arange(0, ROWS)[None, :] == i, sq, 0.0), axis=1)
    tl.store(o_ptr + tl.arange(0, ROWS), _row_max_helper(x.to(tl.float32)) + acc)


def test_the_interpreter_runs_nested_jit_calls_traced_loops_and_bf16_dots():
    rows, cols = 16, 32
    x = jax.random.normal(jax.random.key(3), (rows, cols)).astype(jnp.bfloat16)
    lo = jnp.array([5], jnp.int32)
    o = call(_row_stats, x, lo, out_shape=jax.ShapeDtypeStruct((rows,), jnp.float32), grid=(1,), num_warps=4,
             num_stages=1, interpret=True, ROWS=rows, COLS=cols)
    xf = np.asarray(x.astype(jnp.float32))
    want = xf.max(axis=1) + (xf @ xf.T)[:, 5:].sum(axis=1)
    np.testing.assert_allclose(np.asarray(o), want, rtol=1e-5, atol=1e-4)


def test_a_kernel_compiles_after_an_interpreted_run_of_nested_calls():
    test_the_interpreter_runs_nested_jit_calls_traced_loops_and_bf16_dots()
    compiled = compile_for(_row_stats, jax.ShapeDtypeStruct((16, 32), jnp.bfloat16),
                           jax.ShapeDtypeStruct((1,), jnp.int32), out_shape=jax.ShapeDtypeStruct((16,), jnp.float32),
                           num_warps=4, num_stages=1, ROWS=16, COLS=32)
    assert len(compiled.asm["cubin"]) > 0


def test_compile_types_scalars_as_jax_triton_does():
    """A Python float reaches the kernel as fp64 (jax-triton's typing), np.float32 as fp32: an fp8 output
    computed from an fp64 scalar does not compile (as on the device: no f64 -> e4m3 conversion), the
    same kernel with an np.float32 scalar does."""
    n, s = 64, jax.ShapeDtypeStruct
    args = (s((n,), jnp.float8_e4m3fn), s((n,), jnp.float32), n)
    outs = [s((n,), jnp.float8_e4m3fn), s((n,), jnp.float32)]
    with pytest.raises(Exception, match="PassManager::run failed"):  # (its stderr names the f64 -> e4m3 cast)
        compile_for(_scale_add, *args, 0.5, out_shape=outs, num_warps=1, num_stages=1, BLOCK=64)
    compiled = compile_for(_scale_add, *args, np.float32(0.5), out_shape=outs, num_warps=1, num_stages=1, BLOCK=64)
    assert "cvt.rn.satfinite.e4m3x2.f32" in compiled.asm["ptx"]


def test_load_names_the_install_where_triton_is_missing(monkeypatch):
    import sys

    from pallas_kernels.triton_call import load

    assert load("cache_append").__name__ == "pallas_kernels.cache_append.triton_jit"
    monkeypatch.delitem(sys.modules, "pallas_kernels.cache_append.triton_jit")
    monkeypatch.setitem(sys.modules, "triton", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"implementation='triton' \(or 'jax_triton'\) needs Triton: pip install 'jaxfire\[triton\]'"):
        load("cache_append")
    with pytest.raises(ModuleNotFoundError, match="no_such_kernel"):  # other import errors pass through
        load("no_such_kernel")


def test_the_xla_launch_lowers_to_xlas_triton_call_without_a_gpu():
    """On a GPU the kernel is XLA's own Triton custom call: its TTIR, read back by jaxlib's Triton
    dialect, takes one pointer per operand then per result (scalars specialised into it as constants),
    and an aliased output stays aliased."""
    from tests.kernels.lowering import xla_triton_calls

    n, block = 37, 16
    outs = [jax.ShapeDtypeStruct((n,), jnp.bfloat16), jax.ShapeDtypeStruct((n,), jnp.float32)]
    [c] = xla_triton_calls(
        lambda x, y: call(_scale_add, x, y, n, 0.5, out_shape=outs, grid=(3,), num_warps=2, num_stages=4,
                          input_output_aliases={1: 1}, name="jaxfire_scale_add", BLOCK=block),
        jax.ShapeDtypeStruct((n,), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((n,), jnp.float32))
    assert (c.name, c.grid, c.num_warps, c.num_stages) == ("jaxfire_scale_add", (3, 1, 1), 2, 4)
    assert (c.operands, c.results, c.pointer_params) == (2, 2, 4) and c.aliased == ((1, 1),)
    assert "dense<5.000000e-01>" in c.ttir and "dense<37>" in c.ttir and "tt.divisibility = 16" in c.ttir
    assert "tt.call" not in c.ttir  # helpers inlined: the module XLA gets is one kernel


def test_the_xla_launch_refuses_what_xla_could_not_read():
    from pallas_kernels import triton_lowering

    with pytest.raises(ValueError, match="cannot read the TTIR of k"):
        triton_lowering.module_bytecode("module { tt.func public @k() { tt.bogus } }", "k")
    two = "module { tt.func public @a() { tt.return } tt.func public @b() { tt.return } }"
    with pytest.raises(ValueError, match="the TTIR of k has 2 public functions"):
        triton_lowering.module_bytecode(two, "k")
    with pytest.raises(ValueError, match="launcher must be one of"):
        call(_scale_add, jnp.ones(4), jnp.ones(4), 4, 0.5, out_shape=[jax.ShapeDtypeStruct((4,), jnp.float32)] * 2,
             grid=(1,), num_warps=1, num_stages=1, launcher="cuda", BLOCK=4)
