"""Grouped matmul: every implementation against a float64 NumPy oracle, on the same cases.

One test base; each implementation subclasses it. On a CPU backend the kernels run in interpret
mode (small shapes keep the grids to a few dozen programs); on a GPU the same classes run them
natively. A cross-lowering test compiles both Pallas kernels for an H100 from the CPU, so the
Pallas -> Triton / Mosaic GPU lowering of the production shapes is checked without a GPU; another
compiles the kernel written in Triton (`triton_jit.py`, implementation "triton") for sm_90.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import grouped_matmul, grouped_matmul_swiglu
from pallas_kernels.grouped_matmul import Config, mosaic, triton
from pallas_kernels.grouped_matmul.tiling import max_row_tasks, row_tasks
from tests.kernels.lowering import lower_for_h100, verify_triton_modules

BF16, FP8, F32 = jnp.bfloat16, jnp.float8_e4m3fn, jnp.float32
# The kernel written in Triton runs through Triton's interpreter (on torch tensors) off the GPU.
needs_triton = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("triton", "torch")),
                                  reason="implementation='triton' needs triton (and torch for its interpreter)")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    t: int
    group_sizes: tuple[int, ...]
    k: int = 128
    n: int = 128
    lhs_dtype: object = BF16
    rhs_dtype: object = BF16
    lhs_scale: bool = False
    rhs_scale: bool = False
    out_dtype: object = BF16


CASES = [
    Case("random_sizes_with_empty", t=150, group_sizes=(40, 0, 77, 0, 33)),
    Case("one_group_all_rows", t=96, group_sizes=(0, 96, 0)),
    Case("rows_past_sum", t=133, group_sizes=(20, 5, 0, 60)),
    Case("single_row", t=1, group_sizes=(0, 1, 0, 0)),
    Case("odd_rows_f32_out", t=37, group_sizes=(9, 17, 11), out_dtype=F32),
    Case("bf16_with_scales", t=70, group_sizes=(30, 0, 40), lhs_scale=True, rhs_scale=True),
    Case("weight_only_fp8", t=90, group_sizes=(25, 50, 0, 15), rhs_dtype=FP8, rhs_scale=True),
    Case("fp8_x_fp8", t=150, group_sizes=(64, 0, 59, 20), k=256, lhs_dtype=FP8, rhs_dtype=FP8,
         lhs_scale=True, rhs_scale=True),
    Case("fp8_x_fp8_decode", t=5, group_sizes=(2, 0, 3, 0), k=256, lhs_dtype=FP8, rhs_dtype=FP8,
         lhs_scale=True, rhs_scale=True),
]
SWIGLU_CASES = [
    Case("swiglu_bf16", t=150, group_sizes=(40, 0, 77, 20)),
    Case("swiglu_fp8", t=100, group_sizes=(0, 64, 30), k=256, lhs_dtype=FP8, rhs_dtype=FP8,
         lhs_scale=True, rhs_scale=True),
    Case("swiglu_weight_only_fp8", t=3, group_sizes=(1, 0, 2), rhs_dtype=FP8, rhs_scale=True),
]


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) % 10_000


def make_inputs(case: Case, transpose_rhs: bool, seed: int):
    """Fresh random inputs (never zeros); fp8 values drawn wide enough to use many exponents."""
    e = len(case.group_sizes)
    ks = jax.random.split(jax.random.key(seed), 4)
    lhs = (2.0 * jax.random.normal(ks[0], (case.t, case.k), F32)).astype(case.lhs_dtype)
    shape = (e, case.n, case.k) if transpose_rhs else (e, case.k, case.n)
    rhs = (2.0 * jax.random.normal(ks[1], shape, F32)).astype(case.rhs_dtype)
    lhs_scale = jax.random.uniform(ks[2], (case.t,), F32, 0.01, 0.1) if case.lhs_scale else None
    rhs_scale = jax.random.uniform(ks[3], (e, case.n), F32, 0.01, 0.1) if case.rhs_scale else None
    return lhs, rhs, jnp.asarray(case.group_sizes, jnp.int32), lhs_scale, rhs_scale


def oracle(lhs, rhs, group_sizes, lhs_scale, rhs_scale, transpose_rhs, swiglu):
    """float64 NumPy: per expert, scaled rows times scaled weights; zeros past sum(group_sizes)."""
    x = np.asarray(lhs.astype(F32), np.float64)
    w = np.asarray(rhs.astype(F32), np.float64)
    if transpose_rhs:
        w = w.transpose(0, 2, 1)  # [E, K, N]
    if lhs_scale is not None:
        x = x * np.asarray(lhs_scale, np.float64)[:, None]
    if rhs_scale is not None:
        w = w * np.asarray(rhs_scale, np.float64)[:, None, :]
    out = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for g, size in enumerate(np.asarray(group_sizes)):
        out[start : start + size] = x[start : start + size] @ w[g]
        start += size
    if swiglu:
        f = out.shape[1] // 2
        gate, up = out[:, :f], out[:, f:]
        out = gate / (1.0 + np.exp(-gate)) * up
    return out


def assert_matches(out, want, out_dtype, total_rows):
    out = np.asarray(out.astype(F32), np.float64)
    assert out.shape == want.shape
    assert np.isfinite(out).all(), "non-finite outputs (an unwritten tile?)"
    np.testing.assert_array_equal(out[total_rows:], 0.0, err_msg="rows past sum(group_sizes) must be zero")
    # bf16 output rounding (2^-8 relative) dominates; f32 output is limited by the f32 accumulation.
    tol = 1e-2 if jnp.dtype(out_dtype).itemsize == 2 else 1e-4
    scale = max(np.abs(want).max(), 1e-30)
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol * scale)
    assert np.linalg.norm(out - want) <= 0.5 * tol * np.linalg.norm(want)


class GroupedMatmulTestBase:
    """The cases every implementation must pass; subclasses set `implementation`."""

    implementation: str | None = None

    def config(self, case: Case, swiglu: bool) -> Config | None:
        return None

    def expected_error(self, case: Case, transpose_rhs: bool) -> str | None:
        """A ValueError fragment for problems this implementation refuses, else None."""
        return None

    def run_case(self, case: Case, transpose_rhs: bool, swiglu: bool, seed: int):
        lhs, rhs, gs, ls, rs = make_inputs(case, transpose_rhs, seed)
        fn = grouped_matmul_swiglu if swiglu else grouped_matmul
        call = lambda: fn(  # noqa: E731
            lhs, rhs, gs, lhs_scale=ls, rhs_scale=rs, transpose_rhs=transpose_rhs,
            preferred_element_type=case.out_dtype, implementation=self.implementation,
            config=self.config(case, swiglu),
        )
        if (err := self.expected_error(case, transpose_rhs)) is not None:
            with pytest.raises(ValueError, match=err):
                call()
            return
        out = call()
        assert out.dtype == jnp.dtype(case.out_dtype)
        want = oracle(lhs, rhs, gs, ls, rs, transpose_rhs, swiglu)
        assert_matches(out, want, case.out_dtype, min(sum(case.group_sizes), case.t))

    @pytest.mark.parametrize("transpose_rhs", [True, False], ids=["k_major", "n_major"])
    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
    def test_grouped_matmul(self, case, transpose_rhs):
        self.run_case(case, transpose_rhs, swiglu=False, seed=_seed(case.name, transpose_rhs))

    @pytest.mark.parametrize("transpose_rhs", [True, False], ids=["k_major", "n_major"])
    @pytest.mark.parametrize("case", SWIGLU_CASES, ids=lambda c: c.name)
    def test_swiglu(self, case, transpose_rhs):
        self.run_case(case, transpose_rhs, swiglu=True, seed=_seed(case.name, transpose_rhs, "swiglu"))

    def test_jit_and_fresh_group_sizes(self):
        """One compiled function serves any group sizes: they are data, not shapes."""
        case = CASES[0]
        lhs, rhs, _, _, _ = make_inputs(case, True, seed=7)
        fn = jax.jit(lambda x, w, g: grouped_matmul(
            x, w, g, transpose_rhs=True, implementation=self.implementation, config=self.config(case, False)))
        for sizes in [(150, 0, 0, 0, 0), (0, 0, 0, 0, 149), (30, 30, 30, 30, 30), (1, 2, 3, 4, 5)]:
            gs = jnp.asarray(sizes, jnp.int32)
            want = oracle(lhs, rhs, gs, None, None, True, False)
            assert_matches(fn(lhs, rhs, gs), want, BF16, min(sum(sizes), case.t))


class TestReference(GroupedMatmulTestBase):
    implementation = "reference"


class TestDefault(GroupedMatmulTestBase):
    implementation = None


class TestPallasTriton(GroupedMatmulTestBase):
    implementation = "pallas_triton"

    def config(self, case, swiglu):
        # Small blocks: several row tasks and column tiles per case even at these sizes; the
        # decode-sized cases take the swapped (weights-as-M) product.
        return Config(block_m=16, block_n=32, block_k=64, num_stages=2, swap_ab=case.t < 64)

    def test_ragged_n_and_k(self):
        """Column and depth masks: N and K that no block divides."""
        case = Case("ragged_nk", t=45, group_sizes=(20, 0, 25), k=80, n=96, rhs_dtype=FP8, rhs_scale=True)
        self.run_case(case, transpose_rhs=True, swiglu=False, seed=3)
        self.run_case(case, transpose_rhs=False, swiglu=True, seed=4)
        self.run_case(dataclasses.replace(case, t=30, group_sizes=(10, 0, 20)), transpose_rhs=False, swiglu=False,
                      seed=5)


class TestPallasTritonSplitK(GroupedMatmulTestBase):
    """K split three ways over 4 or 8 steps: uneven shares, one of them empty at K=128."""

    implementation = "pallas_triton"

    def config(self, case, swiglu):
        return Config(block_m=16, block_n=32, block_k=32, num_stages=2, split_k=3, swap_ab=case.t < 64)


GEMV_CASES = [CASES[3], CASES[-1], Case("weight_only_fp8_decode", t=5, group_sizes=(2, 0, 3, 0), rhs_dtype=FP8,
                                         rhs_scale=True, out_dtype=F32)]


class TestPallasTritonGemv(GroupedMatmulTestBase):
    """The multiply-add kernel: one to three rows a task (several tasks for an expert with more rows),
    K split three ways with an empty share, and without a split."""

    implementation = "pallas_triton"

    def config(self, case, swiglu):
        rows = 1 if case.t == 1 else 3 if swiglu else 2
        return Config(block_m=rows, block_n=32, block_k=32, num_stages=2, split_k=3 if case.k > 128 else 1,
                      gemv=True)

    @pytest.mark.parametrize("transpose_rhs", [True, False], ids=["k_major", "n_major"])
    @pytest.mark.parametrize("case", GEMV_CASES, ids=lambda c: c.name)
    def test_grouped_matmul(self, case, transpose_rhs):
        self.run_case(case, transpose_rhs, swiglu=False, seed=_seed(case.name, transpose_rhs, "gemv"))

    @pytest.mark.parametrize("transpose_rhs", [True, False], ids=["k_major", "n_major"])
    @pytest.mark.parametrize("case", SWIGLU_CASES[2:], ids=lambda c: c.name)
    def test_swiglu(self, case, transpose_rhs):
        self.run_case(case, transpose_rhs, swiglu=True, seed=_seed(case.name, transpose_rhs, "gemv-swiglu"))

    def test_jit_and_fresh_group_sizes(self):
        case = GEMV_CASES[2]
        lhs, rhs, _, _, rs = make_inputs(case, True, seed=8)
        fn = jax.jit(lambda x, w, g, s: grouped_matmul(
            x, w, g, rhs_scale=s, transpose_rhs=True, preferred_element_type=F32, implementation=self.implementation,
            config=self.config(case, False)))
        for sizes in [(5, 0, 0, 0), (0, 0, 0, 4), (1, 1, 1, 1), (0, 2, 0, 1)]:
            gs = jnp.asarray(sizes, jnp.int32)
            want = oracle(lhs, rhs, gs, None, rs, True, False)
            assert_matches(fn(lhs, rhs, gs, rs), want, F32, min(sum(sizes), case.t))


@needs_triton
class TestTriton(TestPallasTriton):
    """The Pallas Triton kernel's cases, blocks and masks on the kernel written in Triton."""

    implementation = "triton"

    def test_no_rows_give_an_empty_result(self):
        lhs, rhs, gs, _, _ = make_inputs(Case("no_rows", t=0, group_sizes=(0, 0, 0)), True, seed=6)
        out = grouped_matmul(lhs, rhs, gs, transpose_rhs=True, implementation=self.implementation,
                             config=Config(block_m=16, block_n=32, block_k=64, num_stages=2))
        assert out.shape == (0, 128)

    @pytest.mark.parametrize("config, message", [
        (Config(block_m=16, block_n=48, block_k=64), "block_n=48 is not a power of two"),
        (Config(block_m=16, block_n=32, block_k=8), "at least 16 of K a step"),
    ])
    def test_refuses_blocks_it_cannot_tile(self, config, message):
        lhs, rhs, gs, _, _ = make_inputs(CASES[3], True, seed=6)
        with pytest.raises(ValueError, match=f"implementation='triton' cannot run this problem: .*{message}"):
            grouped_matmul(lhs, rhs, gs, transpose_rhs=True, implementation=self.implementation, config=config)


@needs_triton
class TestTritonSplitK(TestPallasTritonSplitK):
    implementation = "triton"


@needs_triton
class TestTritonGemv(TestPallasTritonGemv):
    implementation = "triton"


def test_gemv_heuristic_takes_one_token():
    from pallas_kernels.grouped_matmul.config import SM_COUNT, gemv_config, triton_config

    # One token, top-2 and top-3: the multiply-add kernel, with enough programs to fill the GPU.
    for rows, k, n, swiglu in ((2, 4096, 14336, True), (2, 4096, 7168, True), (3, 14336, 4096, False),
                               (2, 7168, 4096, False)):
        config = triton_config(rows, k, n, swiglu=swiglu, num_groups=8, weight_itemsize=1)
        assert config.gemv and config.block_m == 1 and config.split_k >= 2
        assert -(-n // config.block_n) * rows * config.split_k >= 6 * SM_COUNT or k // config.block_k < 8 * 2
    # The measured optima: the full-width gate/up on 32x256 tiles split 2, its tensor-parallel half
    # on 64x256 split 4, the down projection split 4.
    full, half = (gemv_config(2, 4096, n, num_groups=8, swiglu=True) for n in (14336, 7168))
    assert (full.block_n, full.block_k, full.split_k) == (32, 256, 2)
    assert (half.block_n, half.block_k, half.split_k) == (64, 256, 4)
    assert gemv_config(2, 14336, 4096, num_groups=8).split_k == 4
    # One token through a projection: one row, so the weight is read once.
    qkv = gemv_config(1, 4096, 6144, num_groups=1)
    assert qkv.gemv and qkv.block_m == 1 and qkv.split_k >= 2
    # Two tokens through the experts, two rows of a projection, or the MMA kernel asked for: no
    # multiply-add kernel.
    assert gemv_config(4, 4096, 14336, num_groups=8) is None
    assert gemv_config(2, 4096, 6144, num_groups=1) is None
    assert not triton_config(2, 4096, 14336, swiglu=True, num_groups=8, gemv=False).gemv
    with pytest.raises(ValueError, match="one to four rows"):
        Config(block_m=16, block_n=32, block_k=32, gemv=True)


def test_pallas_mma_never_takes_the_multiply_add_kernel(monkeypatch):
    """implementation="pallas_mma" runs one-token steps on the MMA kernel, "pallas" on the multiply-add one."""
    seen = []
    real = triton.grouped_matmul

    def spy(*args, config, **kwargs):
        seen.append(config.gemv)
        return real(*args, config=config, **kwargs)

    monkeypatch.setattr(triton, "grouped_matmul", spy)
    case = Case("one_token_top2", t=2, group_sizes=(1, 0, 1, 0), rhs_dtype=FP8, rhs_scale=True)
    lhs, rhs, gs, _, rs = make_inputs(case, True, seed=9)
    want = oracle(lhs, rhs, gs, None, rs, True, False)
    for implementation in ("pallas", "pallas_mma"):
        out = grouped_matmul(lhs, rhs, gs, rhs_scale=rs, transpose_rhs=True, implementation=implementation)
        assert_matches(out, want, BF16, 2)
    assert seen == [True, False]


@pytest.mark.parametrize("implementation", ["pallas_triton", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("rows, gemv", [(1, True), (2, False)])
def test_projection_of_one_token_takes_the_multiply_add_kernel(rows, gemv, implementation, monkeypatch):
    """A one-group problem (an attention projection) of one row runs on the multiply-add kernel's
    heuristic blocks, of two rows on the MMA kernel; both match the reference."""
    if implementation == "triton":
        from pallas_kernels.grouped_matmul import triton_jit as module
    else:
        module = triton
    seen = []
    real = module.grouped_matmul

    def spy(*args, config, **kwargs):
        seen.append(config)
        return real(*args, config=config, **kwargs)

    monkeypatch.setattr(module, "grouped_matmul", spy)
    case = Case(f"projection_{rows}", t=rows, group_sizes=(rows,), rhs_dtype=FP8, rhs_scale=True, k=512, n=96)
    lhs, rhs, gs, _, rs = make_inputs(case, True, seed=10 + rows)
    out = grouped_matmul(lhs, rhs, gs, rhs_scale=rs, transpose_rhs=True, implementation=implementation)
    assert_matches(out, oracle(lhs, rhs, gs, None, rs, True, False), BF16, rows)
    assert [c.gemv for c in seen] == [gemv]


def test_decode_heuristic_splits_only_starved_problems():
    from pallas_kernels.grouped_matmul.config import triton_config

    # One token through a 1024-wide projection: 8 bands of 128 columns would leave most SMs idle.
    assert triton_config(1, 4096, 1024, swiglu=False, num_groups=1, weight_itemsize=1).split_k > 1
    # Down projection at batch 1 (2 live experts of 8).
    assert triton_config(2, 14336, 4096, swiglu=False, num_groups=8, weight_itemsize=1).split_k > 1
    assert triton_config(2, 4096, 14336, swiglu=True, num_groups=8, weight_itemsize=1).split_k > 1
    # Batch 32 over 8 experts already fills the GPU.
    assert triton_config(64, 14336, 4096, swiglu=False, num_groups=8, weight_itemsize=1).split_k == 1
    assert triton_config(64, 4096, 14336, swiglu=True, num_groups=8, weight_itemsize=1).split_k == 1
    # Partial sums must stay small next to the weights: 32 rows of a 4096x4096 projection split little.
    assert triton_config(32, 4096, 4096, swiglu=False, num_groups=1, weight_itemsize=1).split_k <= 4


class TestPallasMosaic(GroupedMatmulTestBase):
    implementation = "pallas_mosaic"

    def config(self, case, swiglu):
        itemsize = jnp.dtype(case.lhs_dtype).itemsize
        return Config(block_m=128, block_n=64, block_k=128 // itemsize, num_stages=2)

    def expected_error(self, case, transpose_rhs):
        if jnp.dtype(case.lhs_dtype) != jnp.dtype(case.rhs_dtype):
            return "one dtype"
        if jnp.dtype(case.lhs_dtype).itemsize == 1 and not transpose_rhs:
            return "K-major"
        return None


class TestPallasMosaic64(TestPallasMosaic):
    """64-row tiles (decode): plain products on one warpgroup's rows, swiglu with the warpgroups
    splitting the columns of F instead of the rows."""

    def config(self, case, swiglu):
        itemsize = jnp.dtype(case.lhs_dtype).itemsize
        return Config(block_m=64, block_n=64, block_k=128 // itemsize, num_stages=3)

    @pytest.mark.parametrize("case", [CASES[0], CASES[7], CASES[8]], ids=lambda c: c.name)
    def test_grouped_matmul(self, case):
        self.run_case(case, True, swiglu=False, seed=_seed(case.name, "mosaic64"))

    # F = 128: two warpgroups of 64 columns
    @pytest.mark.parametrize("case", [dataclasses.replace(c, n=256) for c in SWIGLU_CASES[:2]] + [
        Case("swiglu_fp8_decode", t=9, group_sizes=(0, 4, 0, 5), k=256, n=256, lhs_dtype=FP8, rhs_dtype=FP8,
             lhs_scale=True, rhs_scale=True)], ids=lambda c: c.name)
    def test_swiglu(self, case):
        self.run_case(case, True, swiglu=True, seed=_seed(case.name, "mosaic64", "swiglu"))


class TestPallas(GroupedMatmulTestBase):
    """The generic "pallas" switch picks a kernel that can run each case."""

    implementation = "pallas"

    @pytest.mark.parametrize("case", CASES[:1] + CASES[6:8], ids=lambda c: c.name)
    def test_grouped_matmul(self, case):
        self.run_case(case, True, swiglu=False, seed=11)

    @pytest.mark.parametrize("case", SWIGLU_CASES[:1], ids=lambda c: c.name)
    def test_swiglu(self, case):
        self.run_case(case, True, swiglu=True, seed=12)


def test_row_tasks_cover_every_row_once():
    sizes = jnp.asarray([0, 17, 0, 40, 3, 0], jnp.int32)
    for block_m, align in [(16, 1), (32, 8), (8, 8)]:
        tasks = jax.tree.map(np.asarray, row_tasks(sizes, 70, block_m, align=align))
        owner = np.full(70, -1)
        for g, s, o, n in zip(tasks.group, tasks.start, tasks.offset, tasks.size):
            if n:
                assert s % align == 0 and o + n <= block_m
                rows = np.arange(s + o, s + o + n)
                assert (owner[rows] == -1).all(), "a row computed twice"
                owner[rows] = g
        want = np.repeat(np.arange(7), [0, 17, 0, 40, 3, 0, 10])
        np.testing.assert_array_equal(owner, want)


@pytest.mark.parametrize("seed", range(4))
def test_row_tasks_bound_holds_for_few_rows(seed):
    """Random small steps (fewer rows than experts, as in decode): the trace-time task count keeps
    every row, and one-row tiles need no more tasks than rows."""
    rng = np.random.default_rng(seed)
    for _ in range(20):
        e, t = int(rng.integers(1, 12)), int(rng.integers(1, 40))
        block_m, align = [(1, 1), (2, 1), (4, 1), (16, 1), (32, 8), (8, 8)][int(rng.integers(6))]
        sizes = rng.multinomial(int(rng.integers(0, t + 1)), np.ones(e) / e).astype(np.int32)
        tasks = jax.tree.map(np.asarray, row_tasks(jnp.asarray(sizes), t, block_m, align=align))
        covered = np.zeros(t, int)
        for s, o, n in zip(tasks.start, tasks.offset, tasks.size):
            covered[s + o:s + o + n] += 1
        np.testing.assert_array_equal(covered, 1, err_msg=f"sizes={sizes} t={t} bm={block_m} align={align}")
    assert max_row_tasks(2, 8, 1) == 2 and max_row_tasks(3, 8, 4) == 3
    assert max_row_tasks(64, 8, 16) == 4 + 8  # past E rows the old bound holds


def test_task_major_order_spreads_a_decode_steps_tiles_over_the_sms():
    """The down projection of 32 rows over 8 experts on 64-row tiles: 10 row tasks at trace time, the
    last 2 padding, 16 column tiles, 132 SMs each taking every 132nd step. In bands of 8 column tiles
    some SMs get two real tiles while others get none; task-major order gives each at most one. Both
    orders visit every (task, tile) once."""
    num_tasks, n_tiles, sms = max_row_tasks(32, 8, 64, 8), 16, 132
    assert num_tasks == 10
    steps = np.arange(num_tasks * n_tiles)
    for width, most in ((8, 2), (1 << 12, 1)):
        task, tile = jax.vmap(lambda i, w=width: mosaic.tile_order(i, num_tasks, n_tiles, w))(jnp.asarray(steps))
        task, tile = np.asarray(task), np.asarray(tile)
        assert sorted(zip(task.tolist(), tile.tolist())) == [(a, b) for a in range(num_tasks) for b in range(n_tiles)]
        real_per_sm = np.bincount(steps[task < 8] % sms, minlength=sms)
        assert real_per_sm.max() == most, width


@pytest.mark.parametrize("sizes, rows, tasks", [
    ((57, 63, 67, 50, 65, 73, 69, 68), 512, 12),  # the engine's 256-token step at top-2
    ((57, 63, 67, 50, 65, 73, 69, 100), 1024, 16),  # 544 rows in a padded 1024-row bucket (the study's)
])
def test_task_major_order_balances_a_chunk_steps_expert_tiles(sizes, rows, tasks):
    """A prefill chunk's step on 128 x 128 tiles: the trace-time bound holds more row tasks than the 8
    real ones (a padding group's tasks only write zeros). Task-major order gives every SM at most the
    two real tiles of the down projection (32 column tiles; 256 over 132 SMs) and the seven of the
    fused gate/up (112), where bands give some SMs three and eight. `mosaic_config` picks task-major
    there, and bands again at 2048 rows, where lhs reuse in the L2 counts."""
    from pallas_kernels.grouped_matmul.config import TASK_MAJOR, mosaic_config

    t = row_tasks(jnp.asarray(sizes, jnp.int32), rows, 128)
    real = np.asarray((t.group < 8) & (t.size > 0))
    assert real.shape[0] == tasks and real.sum() == 8
    for n_tiles, fewest in ((32, 2), (112, 7)):
        steps = np.arange(tasks * n_tiles)
        most = {}
        for width in (8, TASK_MAJOR):
            task, _ = jax.vmap(lambda i, w=width: mosaic.tile_order(i, tasks, n_tiles, w))(jnp.asarray(steps))
            most[width] = np.bincount(steps[real[np.asarray(task)]] % 132, minlength=132).max()
        assert most[TASK_MAJOR] == fewest and most[8] == fewest + 1, (n_tiles, most)
    for swiglu in (False, True):
        assert mosaic_config(rows, 4096, 4096, itemsize=1, swiglu=swiglu).grid_tile_width == TASK_MAJOR
        assert mosaic_config(2048, 4096, 4096, itemsize=1, swiglu=swiglu).grid_tile_width == 8
    assert mosaic_config(rows, 4096, 4096, itemsize=2, swiglu=False).grid_tile_width == 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rhs=jnp.ones((4, 64, 32), FP8)), "needs rhs_scale"),
        (dict(lhs=jnp.ones((8, 32), FP8), rhs=jnp.ones((4, 64, 32), FP8), rhs_scale=jnp.ones((4, 64))),
         "needs lhs_scale"),
        (dict(lhs=jnp.ones((8, 32), FP8), lhs_scale=jnp.ones((8,))), "fp8 lhs needs fp8 rhs"),
        (dict(lhs=jnp.ones((8, 48), BF16)), "K=48"),
        (dict(group_sizes=jnp.ones((3,), jnp.int32)), "length E=4"),
        (dict(group_sizes=jnp.ones((4,), jnp.float32)), "integer vector"),
        (dict(rhs_scale=jnp.ones((4, 32))), r"rhs_scale must be \[E, N\]"),
        (dict(lhs_scale=jnp.ones((9,))), r"lhs_scale must be \[T\]"),
        (dict(lhs=jnp.ones((8, 32), F32)), "bfloat16 or float8_e4m3fn"),
        (dict(preferred_element_type=jnp.int8), "preferred_element_type"),
        (dict(implementation="cuda"), "implementation must be one of"),
        (dict(config=dict(block_m=16)), "config must be"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_errors_name_the_problem(kwargs, message):
    args = dict(lhs=jnp.ones((8, 32), BF16), rhs=jnp.ones((4, 64, 32), BF16),
                group_sizes=jnp.asarray([2, 2, 2, 2], jnp.int32))
    args.update(kwargs)
    lhs, rhs, gs = args.pop("lhs"), args.pop("rhs"), args.pop("group_sizes")
    with pytest.raises(ValueError, match=message):
        grouped_matmul(lhs, rhs, gs, transpose_rhs=True, **args)


def test_swiglu_rejects_odd_width():
    with pytest.raises(ValueError, match="odd N=63"):
        grouped_matmul_swiglu(jnp.ones((4, 32), BF16), jnp.ones((2, 63, 32), BF16), jnp.asarray([2, 2]),
                              transpose_rhs=True)


def test_config_rejects_non_positive_blocks():
    with pytest.raises(ValueError, match="block_n must be a positive int"):
        Config(block_m=64, block_n=0, block_k=64)


@pytest.mark.parametrize("t", [4096, 37], ids=["T4096", "T37"])
@pytest.mark.parametrize("swiglu", [False, True], ids=["matmul", "swiglu"])
@pytest.mark.parametrize("dtype", [BF16, FP8], ids=["bf16", "fp8"])
def test_production_shapes_lower_for_h100(dtype, swiglu, t, monkeypatch):
    """Mixtral-size problems lower through Pallas to Triton and Mosaic GPU for an H100, on the CPU.

    See tests/kernels/lowering.py.
    """
    verified = verify_triton_modules(monkeypatch)
    k, n, e = 4096, 2 * 14336 if swiglu else 14336, 8
    s = jax.ShapeDtypeStruct
    args = (s((t, k), dtype), s((e, n, k), dtype), s((e,), jnp.int32),
            s((t,), F32) if dtype == FP8 else None, s((e, n), F32) if dtype == FP8 else None)
    from pallas_kernels.grouped_matmul import config as cfg

    n_out = n // 2 if swiglu else n
    kernels = [
        (mosaic.grouped_matmul, cfg.mosaic_config(t, k, n_out, itemsize=jnp.dtype(dtype).itemsize, swiglu=swiglu)),
        (triton.grouped_matmul, cfg.triton_config(32, k, n_out, swiglu=swiglu)),
        (triton.grouped_matmul, dataclasses.replace(cfg.triton_config(32, k, n_out, swiglu=swiglu), split_k=4)),
        (triton.grouped_matmul, cfg.triton_config(2, k, n_out, swiglu=swiglu, num_groups=e)),  # multiply-add
    ]
    for kernel, config in kernels:
        text = lower_for_h100(
            lambda *a: kernel(*a, transpose_rhs=True, swiglu=swiglu, out_dtype=BF16, config=config), *args)
        assert "custom_call" in text
    assert verified == [True] * (len(kernels) - 1)  # the Mosaic GPU kernel is not a Triton module


@needs_triton
@pytest.mark.parametrize("swiglu", [True, False], ids=["gate_up", "down"])
def test_triton_default_configs_compile_for_hopper(swiglu):
    """The kernel written in Triton compiles for sm_90 at Mixtral's expert shapes (fp8 K-major
    weights, bf16 or fp8 rows) with each decode size's default config: the multiply-add kernel for
    one token's rows, the MMA kernel from 8 rows, its loads staged in shared memory by cp.async
    within the 227 KB a block may take."""
    from pallas_kernels.grouped_matmul import config as cfg, triton_jit

    e, s = 8, jax.ShapeDtypeStruct
    k, n = (4096, 2 * 14336) if swiglu else (14336, 4096)
    for rows in (1, 2, 8, 64):
        for dtype in (BF16, FP8):
            config = cfg.triton_config(rows, k, n // 2 if swiglu else n, swiglu=swiglu, num_groups=e, weight_itemsize=1)
            compiled = triton_jit.compile_for(
                s((rows, k), dtype), s((e, n, k), FP8), s((e,), jnp.int32), s((rows,), F32) if dtype == FP8 else None,
                s((e, n), F32), transpose_rhs=True, swiglu=swiglu, out_dtype=BF16, config=config)
            ptx = compiled.asm["ptx"]
            assert ".target sm_90" in ptx and len(compiled.asm["cubin"]) > 0
            assert config.gemv == (rows <= 2), (rows, config)
            assert ("mma.sync" in ptx) == ("cp.async" in ptx) == (not config.gemv), (rows, config)
            assert compiled.metadata.shared <= 227 * 1024


@needs_triton
@pytest.mark.parametrize("swiglu", [True, False], ids=["gate_up", "down"])
def test_triton_kernel_lowers_to_xlas_triton_call(swiglu):
    """On a GPU the kernel written in Triton is XLA's own Triton custom call at each decode size of
    Mixtral's experts (the multiply-add kernel for one token, the MMA kernel from 8 rows)."""
    from pallas_kernels.grouped_matmul import config as cfg, triton_jit
    from tests.kernels.lowering import xla_triton_calls

    e, s = 8, jax.ShapeDtypeStruct
    k, n = (4096, 2 * 14336) if swiglu else (14336, 4096)
    for rows, dtype in ((1, BF16), (8, FP8), (64, BF16)):
        config = cfg.triton_config(rows, k, n // 2 if swiglu else n, swiglu=swiglu, num_groups=e, weight_itemsize=1)
        lhs_scale = s((rows,), F32) if dtype == FP8 else None
        [c] = xla_triton_calls(
            lambda lhs, rhs, sizes, ls, rs: triton_jit.grouped_matmul(
                lhs, rhs, sizes, ls, rs, transpose_rhs=True, swiglu=swiglu, out_dtype=BF16, config=config),
            s((rows, k), dtype), s((e, n, k), FP8), s((e,), jnp.int32), lhs_scale, s((e, n), F32))
        assert c.name == ("grouped_matmul_swiglu_triton_jit" if swiglu else "grouped_matmul_triton_jit"), rows
        assert c.pointer_params == c.operands + c.results and c.num_warps == config.num_warps, (rows, c)
