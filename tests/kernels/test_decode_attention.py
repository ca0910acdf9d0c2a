# B batch, S cached positions, H heads (Hq query, Hkv key/value, G = Hq // Hkv), K head dim.
"""decode_attention against a float64 NumPy computation, for every implementation.

`DecodeAttentionCases` holds the cases; each implementation subclasses it. On a CPU the Pallas
kernel runs in interpret mode and the Triton one in Triton's interpreter (grids of at most a few
dozen programs keep them fast); with a GPU the same classes run them natively. Every case draws
fresh inputs from its own seed and fills every position the result must not read (past the length,
before the window) with NaN: K, V and the per-token scales alike.

Tolerances, elementwise |out - ref| <= atol + rtol * |ref| and, over the whole output,
||out - ref|| / ||ref|| <= rel:
  bf16 output (bf16 or fp8 cache): atol = rtol = 2e-2, rel 1e-2 (bf16 rounding of q, the
      probabilities and the output, 2^-8 each);
  f16: atol = rtol = 5e-3, rel 3e-3;  f32: atol = rtol = 1e-4, rel 1e-5.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_attention
from pallas_kernels.decode_attention import DecodeAttentionConfig, default_config
from tests.kernels.checks import assert_close, seed  # noqa: F401 (seed: a fixture)
from tests.kernels.lowering import lower_for_h100, verify_triton_modules

@dataclasses.dataclass
class Case:
    q: np.ndarray  # [B, Hq, K]
    k: np.ndarray  # [B, S, Hkv, K]
    v: np.ndarray  # [B, S, Hkv, K]
    lengths: np.ndarray  # [B]
    k_scale: np.ndarray | None
    v_scale: np.ndarray | None
    window: int | None

    def args(self):
        return (jnp.asarray(self.q), jnp.asarray(self.k), jnp.asarray(self.v),
                jnp.asarray(self.lengths))

    def scales(self) -> dict:
        if self.k_scale is None:
            return {}
        return {"k_scale": jnp.asarray(self.k_scale), "v_scale": jnp.asarray(self.v_scale)}


def make_case(
    seed: int,
    *,
    batch: int = 2,
    seq_len: int = 80,
    q_heads: int = 8,
    kv_heads: int = 2,
    head_dim: int = 64,
    lengths: list[int] | None = None,
    q_dtype=jnp.bfloat16,
    cache_dtype=jnp.bfloat16,
    scales: str | None = None,  # None, "head" or "token"
    window: int | None = None,
    poison: bool = True,
) -> Case:
    rng = np.random.default_rng(seed)
    if lengths is None:
        lengths = rng.integers(1, seq_len + 1, size=batch).tolist()
    lengths = np.asarray(lengths, np.int32)
    q = rng.standard_normal((batch, q_heads, head_dim)).astype(q_dtype)
    kv_shape = (batch, seq_len, kv_heads, head_dim)
    fp8 = cache_dtype == jnp.float8_e4m3fn
    # fp8 values span the format's range (|x| up to ~448 times a small scale), as a quantised cache does.
    spread = 64.0 if fp8 else 1.0
    k = (spread * rng.standard_normal(kv_shape)).astype(cache_dtype)
    v = (spread * rng.standard_normal(kv_shape)).astype(cache_dtype)
    k_scale = v_scale = None
    if scales == "head":
        k_scale = rng.uniform(0.5, 2.0, kv_heads).astype(np.float32) / spread
        v_scale = rng.uniform(0.5, 2.0, kv_heads).astype(np.float32) / spread
    elif scales == "token":
        k_scale = rng.uniform(0.5, 2.0, kv_shape[:3]).astype(np.float32) / spread
        v_scale = rng.uniform(0.5, 2.0, kv_shape[:3]).astype(np.float32) / spread
    if poison:
        pos = np.arange(seq_len)[None, :]
        unread = pos >= np.minimum(lengths, seq_len)[:, None]  # [B, S]
        if window is not None:
            unread |= pos < lengths[:, None] - window
        k[unread] = np.nan
        v[unread] = np.nan
        if scales == "token":
            k_scale[unread] = np.nan
            v_scale[unread] = np.nan
    return Case(q, k, v, lengths, k_scale, v_scale, window)


def numpy_reference(case: Case, sm_scale: float | None = None) -> np.ndarray:
    """float64 attention over each sequence's readable positions only."""
    batch, q_heads, head_dim = case.q.shape
    seq_len, kv_heads = case.k.shape[1:3]
    group = q_heads // kv_heads
    sm_scale = head_dim**-0.5 if sm_scale is None else sm_scale
    q = case.q.astype(np.float64)
    k = case.k.astype(np.float64)
    v = case.v.astype(np.float64)
    if case.k_scale is not None:
        ks = case.k_scale.astype(np.float64)
        vs = case.v_scale.astype(np.float64)
        k = k * (ks[:, None] if ks.ndim == 1 else ks[..., None])
        v = v * (vs[:, None] if vs.ndim == 1 else vs[..., None])
    out = np.zeros((batch, q_heads, head_dim))
    for b in range(batch):
        hi = min(int(case.lengths[b]), seq_len)
        lo = 0 if case.window is None else max(hi - case.window, 0)
        if hi <= lo:
            continue
        for h in range(q_heads):
            kh = h // group
            logits = k[b, lo:hi, kh] @ q[b, h] * sm_scale  # [S']
            p = np.exp(logits - logits.max())
            out[b, h] = (p / p.sum()) @ v[b, lo:hi, kh]
    return out


class DecodeAttentionCases:
    """Cases every implementation must pass; subclasses set `implementation`."""

    implementation: str = "reference"
    # Small blocks and several splits so that interpret-mode grids exercise the split/combine path.
    config: DecodeAttentionConfig | None = DecodeAttentionConfig(block_s=16, num_splits=3)

    def run(self, case: Case, **kwargs) -> jax.Array:
        kwargs.setdefault("config", self.config)
        return decode_attention(*case.args(), **case.scales(), window=case.window,
                                implementation=self.implementation, **kwargs)

    def check(self, case: Case, **kwargs) -> jax.Array:
        out = self.run(case, **kwargs)
        assert out.shape == case.q.shape and out.dtype == case.q.dtype
        assert_close(out, numpy_reference(case, kwargs.get("sm_scale")))
        return out

    def test_mixed_lengths(self, seed):
        # 1, odd, S (75: not a multiple of any block size), and 0.
        case = make_case(seed, batch=4, seq_len=75, lengths=[1, 37, 75, 0])
        out = self.check(case)
        assert (np.asarray(out[3], np.float32) == 0).all(), "length 0 must give zeros"

    def test_all_lengths_zero_give_zeros(self, seed):
        out = self.run(make_case(seed, lengths=[0, 0]))
        assert (np.asarray(out, np.float32) == 0).all()

    def test_length_past_cache_reads_the_whole_cache(self, seed):
        case = make_case(seed, seq_len=40, lengths=[40, 40])
        beyond = dataclasses.replace(case, lengths=np.asarray([41, 1000], np.int32))
        assert_close(self.run(beyond), numpy_reference(case))

    @pytest.mark.parametrize("q_heads,kv_heads", [(4, 1), (8, 2), (16, 2), (2, 2), (6, 2)])
    def test_head_grouping(self, seed, q_heads, kv_heads):
        # MQA, GQA ratios 4 and 8, MHA, and a group (3) that is not a power of two.
        self.check(make_case(seed, q_heads=q_heads, kv_heads=kv_heads, seq_len=50))

    @pytest.mark.parametrize("head_dim", [64, 128, 256])
    def test_head_dims(self, seed, head_dim):
        self.check(make_case(seed, head_dim=head_dim, q_heads=4, kv_heads=1, seq_len=40))

    @pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
    def test_other_float_dtypes(self, seed, dtype):
        self.check(make_case(seed, q_dtype=dtype, cache_dtype=dtype, seq_len=50))

    def test_f32_query_on_bf16_cache(self, seed):
        self.check(make_case(seed, q_dtype=jnp.float32, seq_len=50))

    @pytest.mark.parametrize("scales", ["head", "token"])
    def test_fp8_cache(self, seed, scales):
        case = make_case(seed, cache_dtype=jnp.float8_e4m3fn, scales=scales, batch=3,
                         seq_len=70, lengths=[1, 45, 70])
        self.check(case)

    @pytest.mark.parametrize("window", [1, 20, 200])
    def test_sliding_window(self, seed, window):
        # Shorter than every length, mid-range, and longer than the cache.
        self.check(make_case(seed, batch=3, seq_len=60, lengths=[7, 33, 60], window=window))

    def test_fp8_cache_with_window(self, seed):
        case = make_case(seed, cache_dtype=jnp.float8_e4m3fn, scales="token", seq_len=60,
                         lengths=[30, 59], window=25)
        self.check(case)

    def test_sm_scale(self, seed):
        self.check(make_case(seed, seq_len=30), sm_scale=0.37)

    def test_under_jit_with_traced_lengths(self, seed):
        case = make_case(seed, seq_len=40)
        fn = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, implementation=self.implementation,
                                                         config=self.config))
        assert_close(fn(*case.args()), numpy_reference(case))

    def test_steps_over_the_first_sequences_of_a_larger_cache(self, seed):
        # q covers the cache's first 2 of 4 sequences; the others are poisoned and must not be read.
        case = make_case(seed, batch=4, seq_len=40, lengths=[12, 40, 40, 40], cache_dtype=jnp.float8_e4m3fn,
                         scales="token")
        case.k[2:], case.v[2:], case.k_scale[2:] = np.nan, np.nan, np.nan
        first = dataclasses.replace(case, q=case.q[:2], lengths=case.lengths[:2])
        out = decode_attention(first.q, case.k, case.v, first.lengths, **case.scales(),
                               implementation=self.implementation, config=self.config)
        front = dataclasses.replace(first, k=case.k[:2], v=case.v[:2], k_scale=case.k_scale[:2],
                                    v_scale=case.v_scale[:2])
        assert_close(out, numpy_reference(front))

    def test_poison_inside_the_length_reaches_the_output(self, seed):
        # Guards the poisoning above: a NaN at a position the result must read does show up.
        case = make_case(seed, seq_len=30, lengths=[30, 30])
        case.v[0, 29] = np.nan
        out = np.asarray(self.run(case), np.float32)
        assert np.isnan(out[0]).any() and np.isfinite(out[1]).all()


class TestReference(DecodeAttentionCases):
    implementation = "reference"


FP8 = jnp.float8_e4m3fn
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


class TestPallas(DecodeAttentionCases):
    implementation = "pallas"

    @pytest.mark.parametrize(
        "config",
        [DecodeAttentionConfig(block_s=16, num_splits=1),  # final output written by the kernel
         DecodeAttentionConfig(block_s=32, num_splits=8),  # more splits than blocks: empty splits
         DecodeAttentionConfig(block_s=64, num_splits=2, num_warps=8, num_stages=2)],
    )
    def test_configs(self, seed, config):
        self.check(make_case(seed, batch=3, seq_len=90, lengths=[90, 17, 64]), config=config)

    def test_default_config(self, seed):
        self.check(make_case(seed, seq_len=100), config=None)


@needs_triton
class TestTriton(TestPallas):
    """The kernel written in Triton (`triton_jit.py`): every case and config of the Pallas kernel."""

    implementation = "triton"


def test_default_implementation_on_cpu_is_the_reference():
    if jax.default_backend() == "gpu":
        pytest.skip("the default differs on GPU")
    case = make_case(1, seq_len=20)
    got = decode_attention(*case.args())
    want = decode_attention(*case.args(), implementation="reference")
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_default_config_fills_the_machine():
    cfg = default_config(batch=1, seq_len=16384, num_kv_heads=8, head_dim=128,
                         cache_dtype=jnp.bfloat16)
    assert cfg.num_splits > 1 and cfg.block_s & (cfg.block_s - 1) == 0
    big = default_config(batch=128, seq_len=16384, num_kv_heads=8, head_dim=128,
                         cache_dtype=jnp.bfloat16)
    assert big.num_splits == 1


def _good(**over):
    args = dict(
        q=jnp.zeros((2, 8, 64), jnp.bfloat16),
        k=jnp.zeros((2, 16, 2, 64), jnp.bfloat16),
        v=jnp.zeros((2, 16, 2, 64), jnp.bfloat16),
        lengths=jnp.ones((2,), jnp.int32),
    )
    args.update(over)
    return args


@pytest.mark.parametrize(
    "override,message",
    [
        (dict(q=jnp.zeros((2, 64), jnp.bfloat16)), "q must have rank 3"),
        (dict(k=jnp.zeros((2, 16, 64), jnp.bfloat16)), "k must have rank 4"),
        (dict(v=jnp.zeros((2, 8, 2, 64), jnp.bfloat16)), "v must have k's shape"),
        (dict(q=jnp.zeros((3, 8, 64), jnp.bfloat16)), "3 sequences but the cache only 2"),
        (dict(q=jnp.zeros((2, 8, 32), jnp.bfloat16)), "head dim"),
        (dict(q=jnp.zeros((2, 8, 96), jnp.bfloat16), k=jnp.zeros((2, 16, 2, 96), jnp.bfloat16),
              v=jnp.zeros((2, 16, 2, 96), jnp.bfloat16)), "head dim must be one of"),
        (dict(q=jnp.zeros((2, 5, 64), jnp.bfloat16)), "not a multiple of the 2 KV heads"),
        (dict(lengths=jnp.ones((3,), jnp.int32)), "lengths must be an int array"),
        (dict(lengths=jnp.ones((2,), jnp.float32)), "lengths must be an int array"),
        (dict(q=jnp.zeros((2, 8, 64), jnp.int8)), "q must be"),
        (dict(k=jnp.zeros((2, 16, 2, 64), jnp.int8), v=jnp.zeros((2, 16, 2, 64), jnp.int8)),
         "the cache must be"),
        (dict(v=jnp.zeros((2, 16, 2, 64), jnp.float16)), "k and v must share a dtype"),
        (dict(k=jnp.zeros((2, 16, 2, 64), FP8), v=jnp.zeros((2, 16, 2, 64), FP8)),
         "needs both k_scale and v_scale"),
        (dict(k=jnp.zeros((2, 16, 2, 64), FP8), v=jnp.zeros((2, 16, 2, 64), FP8),
              k_scale=jnp.ones((2,)), v_scale=jnp.ones((2, 16))), "v_scale must have shape"),
        (dict(k=jnp.zeros((2, 16, 2, 64), FP8), v=jnp.zeros((2, 16, 2, 64), FP8),
              k_scale=jnp.ones((2,)), v_scale=jnp.ones((2, 16, 2))), "share a layout"),
        (dict(k_scale=jnp.ones((2,)), v_scale=jnp.ones((2,))), "fp8 caches only"),
        (dict(window=0), "window must be a positive int"),
        (dict(window=2.5), "window must be a positive int"),
        (dict(sm_scale="big"), "sm_scale must be"),
        (dict(implementation="cuda"), "implementation must be one of"),
        (dict(config={"block_s": 16}), "config must be a DecodeAttentionConfig"),
        (dict(config=DecodeAttentionConfig(block_s=24)), "block_s must be a power of two"),
        (dict(config=DecodeAttentionConfig(num_splits=0)), "num_splits must be >= 1"),
    ],
)
def test_bad_input_raises_one_clear_error(override, message):
    with pytest.raises(ValueError, match=message):
        decode_attention(**_good(**override))


def mixtral_decode(cache: str, scales: str | None, splits: int | None):
    """Abstract arguments of Mixtral's decode attention (32 query, 8 KV heads, K = 128, 4 sequences of
    16K positions) and its default config, with `splits` replacing the default's when given."""
    dtype = {"bf16": jnp.bfloat16, "fp8": FP8, "f32": jnp.float32}[cache]
    batch, seq_len, kv_heads, head_dim = 4, 16384, 8, 128
    s = jax.ShapeDtypeStruct
    kv = s((batch, seq_len, kv_heads, head_dim), dtype)
    scale = {None: None, "head": s((kv_heads,), jnp.float32),
             "token": s((batch, seq_len, kv_heads), jnp.float32)}[scales]
    q = s((batch, 32, head_dim), jnp.float32 if cache == "f32" else jnp.bfloat16)
    config = default_config(batch, seq_len, kv_heads, head_dim, dtype)
    if splits is not None:
        config = dataclasses.replace(config, num_splits=splits)
    return (q, kv, kv, s((batch,), jnp.int32), scale, scale), config


@pytest.mark.parametrize(
    "cache,scales,splits,window",
    [("bf16", None, 1, None), ("bf16", None, 4, 4096), ("fp8", "token", 1, None),
     ("fp8", "token", 4, 100), ("fp8", "head", 2, None), ("f32", None, 2, None)],
)
def test_kernel_lowers_for_h100(cache, scales, splits, window, monkeypatch):
    """Mixtral decode shapes lower through Pallas to a Triton module that passes the MLIR verifier.

    Runs on the CPU: catches primitives or casts the Triton lowering lacks before a GPU run.
    """
    from pallas_kernels.decode_attention import triton as triton_backend

    verified = verify_triton_modules(monkeypatch)
    args, config = mixtral_decode(cache, scales, splits)

    def fn(q, k, v, lengths, k_scale, v_scale):
        return triton_backend.decode_attention(q, k, v, lengths, k_scale=k_scale, v_scale=v_scale,
                                               sm_scale=128**-0.5, window=window, config=config)

    text = lower_for_h100(fn, *args)
    assert "jaxfire_decode_attention" in text
    assert verified == [True]


@needs_triton
@pytest.mark.parametrize(
    "cache,scales,splits,window",
    [("bf16", None, None, None), ("fp8", "token", None, None), ("bf16", None, 1, 4096),
     ("fp8", "token", 4, 100), ("fp8", "head", 2, None), ("f32", None, 2, None)],
)
def test_triton_kernel_compiles_for_hopper(cache, scales, splits, window):
    """Mixtral decode shapes, with the default config (None) and others, compile with Triton for an H100
    (no GPU needed) within a program's shared memory; the dots run on tensor cores, except f32's, which
    are exact."""
    from pallas_kernels.decode_attention import triton_jit

    args, config = mixtral_decode(cache, scales, splits)
    compiled = triton_jit.compile_for_hopper(*args, sm_scale=128**-0.5, window=window, config=config)
    ptx = compiled.asm["ptx"]
    assert ".target sm_90" in ptx and len(compiled.asm["cubin"]) > 0
    assert compiled.metadata.shared <= 227 * 1024
    assert ("mma" in ptx) == (cache != "f32")


@needs_triton
@pytest.mark.parametrize("cache,scales,splits", [("bf16", None, None), ("fp8", "token", 4), ("fp8", "head", 1)])
def test_triton_kernel_lowers_to_xlas_triton_call(cache, scales, splits):
    """On a GPU the kernel written in Triton is XLA's own Triton custom call (the launch Pallas's
    Triton backend has), over the same grid as the Pallas kernel, with the split outputs then
    combined by XLA."""
    from pallas_kernels.decode_attention import triton_jit
    from tests.kernels.lowering import xla_triton_calls

    args, config = mixtral_decode(cache, scales, splits)
    q, k, v, lengths, k_scale, v_scale = args
    [c] = xla_triton_calls(lambda *a: triton_jit.decode_attention(*a[:4], k_scale=a[4], v_scale=a[5],
                                                                  sm_scale=128**-0.5, window=None, config=config), *args)
    assert c.name == "jaxfire_decode_attention_triton" and c.grid == (8, config.num_splits, 4)
    assert (c.num_warps, c.num_stages) == (config.num_warps, config.num_stages)
    assert c.results == 2 and c.pointer_params == c.operands + c.results and not c.aliased
