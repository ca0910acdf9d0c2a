# B sequences (cache rows), n sequences written, S cached positions, Hkv key/value heads, K head dim.
"""cache_append against a NumPy statement of what it must write, for every implementation.

On a CPU the Pallas kernels run in interpret mode, the Triton one in Triton's interpreter. Values
written to a bf16 / f32 cache are the new keys cast to the cache's dtype; to an fp8 cache, e4m3
values whose product with the written scale is within e4m3's rounding (2^-4 relative) of the new
key, with the scale max|x| / 448 per head.
"""

from __future__ import annotations

import importlib.util
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.cache_append import cache_append
from tests.kernels.lowering import lower_for_h100, verify_triton_modules

FP8 = jnp.float8_e4m3fn
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


@pytest.fixture
def rng(request) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def make(rng, *, batch=4, n=3, seq_len=16, heads=2, head_dim=64, dtype=jnp.bfloat16):
    caches = [jnp.asarray(rng.standard_normal((batch, seq_len, heads, head_dim)), dtype) for _ in range(2)]
    scales = {}
    if dtype == FP8:
        scales = {name: jnp.asarray(rng.uniform(0.5, 2, (batch, seq_len, heads)), jnp.float32)
                  for name in ("k_scale", "v_scale")}
    new = [jnp.asarray(rng.standard_normal((n, heads, head_dim)) * 3, jnp.bfloat16) for _ in range(2)]
    return caches, new, scales


class CacheAppendCases:
    implementation = "reference"
    fp8_heads = 2  # KV heads of the fp8 caches below

    def run(self, caches, new, positions, scales):
        return cache_append(*caches, *new, jnp.asarray(positions, jnp.int32), **scales,
                            implementation=self.implementation)

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, FP8])
    @pytest.mark.parametrize("heads", [1, 3, 8])
    def test_writes_each_row_at_its_position_and_nothing_else(self, rng, dtype, heads):
        caches, new, scales = make(rng, heads=heads, dtype=dtype)
        positions = [5, -1, 15]  # row 1 not stepped; row 3 of the cache past n
        out = self.run(caches, new, positions, scales)
        assert len(out) == (4 if dtype == FP8 else 2)
        for i, (before, x) in enumerate(zip(caches, new)):
            got = np.asarray(out[i].astype(jnp.float32))
            want = np.asarray(before.astype(jnp.float32)).copy()
            written = np.zeros(want.shape[:2], bool)
            for b, p in enumerate(positions):
                if p >= 0:
                    written[b, p] = True
                    if dtype == FP8:
                        scale = np.asarray(out[2 + i])[b, p]  # [Hkv]
                        xb = np.asarray(x[b].astype(jnp.float32))
                        np.testing.assert_allclose(scale, np.abs(xb).max(-1) / 448, rtol=1e-6)
                        np.testing.assert_allclose(got[b, p] * scale[:, None], xb, rtol=2**-4, atol=1e-6)
                    else:
                        np.testing.assert_array_equal(got[b, p], np.asarray(x[b].astype(dtype).astype(jnp.float32)))
            np.testing.assert_array_equal(got[~written], want[~written])
            if dtype == FP8:
                np.testing.assert_array_equal(np.asarray(out[2 + i])[~written], np.asarray(scales[
                    ("k_scale", "v_scale")[i]])[~written])

    def test_positions_past_the_cache_write_nothing(self, rng):
        caches, new, scales = make(rng, dtype=FP8, heads=self.fp8_heads)
        out = self.run(caches, new, [16, 1000, -7], scales)
        for got, before in zip(out, caches + [scales["k_scale"], scales["v_scale"]]):
            np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(before.astype(jnp.float32)))

    def test_under_jit_with_donated_caches(self, rng):
        caches, new, scales = make(rng, dtype=FP8, n=4, heads=self.fp8_heads)
        want = self.run(jax.tree.map(jnp.copy, caches), new, [0, 3, 9, 15], jax.tree.map(jnp.copy, scales))
        fn = jax.jit(lambda c, n_, p, s: cache_append(*c, *n_, p, **s, implementation=self.implementation),
                     donate_argnums=(0, 3))
        got = fn(caches, new, jnp.asarray([0, 3, 9, 15], jnp.int32), scales)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


class TestReference(CacheAppendCases):
    implementation = "reference"


class TestPallas(CacheAppendCases):
    implementation = "pallas"

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, FP8])
    def test_equals_the_reference_bit_for_bit(self, rng, dtype):
        caches, new, scales = make(rng, batch=5, n=5, heads=4, head_dim=128, dtype=dtype)
        positions = [0, 7, -1, 15, 3]
        ref = cache_append(*caches, *new, jnp.asarray(positions), **scales, implementation="reference")
        for a, b in zip(self.run(caches, new, positions, scales), ref):
            np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


class TestPallasMosaic(CacheAppendCases):
    """The Mosaic GPU kernel (opt-in): the same cases where it takes the cache (an fp8 cache's heads a
    multiple of 4), bit-equal to the reference."""

    implementation = "pallas_mosaic"
    fp8_heads = 4

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, FP8])
    @pytest.mark.parametrize("heads", [4, 8])
    def test_writes_each_row_at_its_position_and_nothing_else(self, rng, dtype, heads):
        super().test_writes_each_row_at_its_position_and_nothing_else(rng, dtype, heads)

    def test_bf16_cache_of_three_heads(self, rng):
        super().test_writes_each_row_at_its_position_and_nothing_else(rng, jnp.bfloat16, 3)

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, FP8])
    def test_equals_the_reference_bit_for_bit(self, rng, dtype):
        TestPallas.test_equals_the_reference_bit_for_bit(self, rng, dtype)

    def test_refuses_fp8_heads_off_the_tma_unit(self, rng):
        caches, new, scales = make(rng, dtype=FP8, heads=2)
        with pytest.raises(ValueError, match="Hkv % 4"):
            self.run(caches, new, [1, 2, 3], scales)


@needs_triton
class TestTriton(CacheAppendCases):
    """The kernel written in Triton (`triton_jit.py`)."""

    implementation = "triton"

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, FP8])
    def test_equals_the_reference_up_to_the_scale_division(self, rng, dtype):
        """bf16 bit for bit. fp8: XLA computes the reference's max|x| / 448 as max|x| * (1/448), the
        kernel divides as the Pallas kernel does (exactly in the interpreter, within 2 ulp on the GPU),
        so a scale may differ by an ulp or two and a value at an e4m3 rounding midpoint by one step."""
        caches, new, scales = make(rng, batch=5, n=5, heads=4, head_dim=128, dtype=dtype)
        positions = [0, 7, -1, 15, 3]
        ref = cache_append(*caches, *new, jnp.asarray(positions), **scales, implementation="reference")
        got = self.run(caches, new, positions, scales)
        for a, b in zip(got[:2], ref[:2]):
            if dtype == FP8:  # e4m3 codes of one sign are ordered like their values
                codes = np.asarray(a).view(np.uint8).astype(int) - np.asarray(b).view(np.uint8).astype(int)
                assert np.abs(codes).max() <= 1 and np.mean(codes != 0) < 1e-3
            else:
                np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
        for a, b in zip(got[2:], ref[2:]):
            np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(b), maxulp=2)


def _good(**over):
    args = dict(k_cache=jnp.zeros((2, 8, 2, 64), FP8), v_cache=jnp.zeros((2, 8, 2, 64), FP8),
                k=jnp.zeros((2, 2, 64), jnp.bfloat16), v=jnp.zeros((2, 2, 64), jnp.bfloat16),
                positions=jnp.zeros((2,), jnp.int32), k_scale=jnp.ones((2, 8, 2)), v_scale=jnp.ones((2, 8, 2)))
    args.update(over)
    return args


@pytest.mark.parametrize("override,message", [
    (dict(k_cache=jnp.zeros((2, 8, 128), FP8)), "k_cache must have rank 4"),
    (dict(v_cache=jnp.zeros((2, 8, 2, 64), jnp.bfloat16)), "v_cache must match k_cache"),
    (dict(k=jnp.zeros((3, 2, 64), jnp.bfloat16), v=jnp.zeros((3, 2, 64), jnp.bfloat16),
          positions=jnp.zeros((3,), jnp.int32)), "n <= 2"),
    (dict(k=jnp.zeros((2, 1, 64), jnp.bfloat16)), "k must be"),
    (dict(v=jnp.zeros((1, 2, 64), jnp.bfloat16)), "v must have k's shape"),
    (dict(positions=jnp.zeros((2,), jnp.float32)), "positions must be an int array"),
    (dict(k_scale=None, v_scale=None), "needs both k_scale and v_scale"),
    (dict(k_scale=jnp.ones((2, 8))), "k_scale must be float32"),
    (dict(implementation="cuda"), "implementation must be one of"),
])
def test_bad_input_raises_one_clear_error(override, message):
    with pytest.raises(ValueError, match=message):
        cache_append(**_good(**override))


@pytest.mark.parametrize("dtype,heads", [(FP8, 8), (FP8, 4), (jnp.bfloat16, 8), (FP8, 1)])
def test_kernel_lowers_for_h100(dtype, heads, monkeypatch):
    """Mixtral's decode shapes (8 KV heads; 4 and 1 per device under tensor parallelism) lower to a
    verified Triton module."""
    from pallas_kernels.cache_append import triton as triton_backend

    verified = verify_triton_modules(monkeypatch)
    s = jax.ShapeDtypeStruct
    kv = s((32, 1088, heads, 128), dtype)
    scale = s((32, 1088, heads), jnp.float32) if dtype == FP8 else None
    new = s((16, heads, 128), jnp.bfloat16)
    text = lower_for_h100(triton_backend.cache_append, kv, kv, new, new, s((16,), jnp.int32), scale, scale)
    assert "jaxfire_cache_append" in text
    assert verified == [True]


@pytest.mark.parametrize("dtype,heads", [(FP8, 8), (FP8, 4), (jnp.bfloat16, 8), (jnp.bfloat16, 1)])
def test_mosaic_kernel_lowers_for_h100(dtype, heads):
    """Mixtral's decode shapes lower through Mosaic GPU (layout inference, TMA boxes) for an H100, the
    caches written in place (aliased), no Triton."""
    from pallas_kernels.cache_append import mosaic

    s = jax.ShapeDtypeStruct
    kv = s((32, 1088, heads, 128), dtype)
    scale = s((32, 1088, heads), jnp.float32) if dtype == FP8 else None
    new = s((16, heads, 128), jnp.bfloat16)
    text = lower_for_h100(mosaic.cache_append, kv, kv, new, new, s((16,), jnp.int32), scale, scale)
    assert "jaxfire_cache_append_mosaic" in text and "triton" not in text.lower()
    assert "output_operand_alias" in text or "tf.aliasing_output" in text


@needs_triton
@pytest.mark.parametrize("dtype,heads", [(FP8, 8), (FP8, 4), (jnp.bfloat16, 8), (FP8, 1)])
def test_triton_kernel_compiles_for_hopper(dtype, heads):
    """Mixtral's decode shapes compile with Triton for an H100 (no GPU needed); an fp8 cache is written
    by the saturating round-to-nearest conversion."""
    from pallas_kernels.cache_append import triton_jit

    s = jax.ShapeDtypeStruct
    kv = s((32, 1088, heads, 128), dtype)
    scale = s((32, 1088, heads), jnp.float32) if dtype == FP8 else None
    new = s((16, heads, 128), jnp.bfloat16)
    compiled = triton_jit.compile_for_hopper(kv, kv, new, new, s((16,), jnp.int32), scale, scale)
    ptx = compiled.asm["ptx"]
    assert ".target sm_90" in ptx and len(compiled.asm["cubin"]) > 0
    assert ("cvt.rn.satfinite.e4m3x2.f32" in ptx) == (dtype == FP8)


@needs_triton
@pytest.mark.parametrize("dtype", [FP8, jnp.bfloat16])
def test_triton_kernel_lowers_to_xlas_triton_call(dtype):
    """On a GPU the kernel written in Triton is XLA's own Triton custom call, the caches (and scales)
    written in place: one pointer per operand and result, each cache its output's alias."""
    from pallas_kernels.cache_append import triton_jit
    from tests.kernels.lowering import xla_triton_calls

    s = jax.ShapeDtypeStruct
    kv = s((32, 1088, 8, 128), dtype)
    scale = s((32, 1088, 8), jnp.float32) if dtype == FP8 else None
    new = s((16, 8, 128), jnp.bfloat16)
    [c] = xla_triton_calls(triton_jit.cache_append, kv, kv, new, new, s((16,), jnp.int32), scale, scale)
    caches = 4 if dtype == FP8 else 2  # (a bf16 cache's two scale outputs are placeholders)
    assert c.name == "jaxfire_cache_append_triton" and c.grid == (16, 1, 1)
    assert c.results == 4 and c.pointer_params == c.operands + c.results
    assert c.aliased == tuple((3 + i, i) for i in range(caches))
