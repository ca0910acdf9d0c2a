# T token rows, S sequences, M pages per sequence, P pages, Z page size, Hq query heads, Hkv key/value
# heads, K head dim.
"""paged_attention against a float64 NumPy computation, for every implementation.

`PagedAttentionCases` holds the cases; each implementation subclasses it (the Pallas kernel and the
kernel written in Triton itself run in interpret mode on a CPU, natively with a GPU). Every case draws
fresh inputs from its own seed: pages handed out in a random order, rows of several sequences (decode
rows, prompt chunks that continue a sequence, whole prompts, padding rows) in a random order, and every
slot of the pool that no row may read (the null page, free pages, page tails past a sequence's length,
before a window) holding NaN: values and per-token scales alike.

Tolerances as in tests/kernels/test_decode_attention.py: elementwise |out - ref| <= atol + rtol |ref|
and ||out - ref|| / ||ref|| <= rel.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention import DecodeConfig, PagedAttentionConfig, append, default_config, paged_attention
from tests.kernels.checks import assert_close, seed  # noqa: F401 (seed: a fixture)
from tests.kernels.lowering import lower_for_h100, verify_triton_modules

FP8 = jnp.float8_e4m3fn
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


@dataclasses.dataclass
class Case:
    q: np.ndarray  # [T, Hq, K]
    k: np.ndarray  # [P, Z, Hkv, K]
    v: np.ndarray  # [P, Z, Hkv, K]
    page_table: np.ndarray  # [S, M]
    seq_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    context_lens: np.ndarray  # [S]
    k_scale: np.ndarray | None  # [P, Z, Hkv]
    v_scale: np.ndarray | None
    window: int | None

    def args(self):
        return tuple(jnp.asarray(a) for a in (self.q, self.k, self.v, self.page_table, self.seq_ids,
                                               self.positions, self.context_lens))

    def scales(self) -> dict:
        if self.k_scale is None:
            return {}
        return {"k_scale": jnp.asarray(self.k_scale), "v_scale": jnp.asarray(self.v_scale)}


def make_case(seed: int, *, steps: list[tuple[int, int]] | None = None, padding: int = 3, page_size: int = 16,
              pages_per_seq: int = 5, q_heads: int = 8, kv_heads: int = 2, head_dim: int = 64,
              q_dtype=jnp.bfloat16, cache_dtype=jnp.bfloat16, window: int | None = None,
              shuffle: bool = True) -> Case:
    """steps[s] = (length after the step, rows of the step) of sequence s: (n, 1) a decode row, (n, n)
    a whole prompt, (n, c) a chunk continuing one, (0, 0) an unused page-table row."""
    rng = np.random.default_rng(seed)
    if steps is None:
        steps = [(37, 1), (16, 16), (70, 21), (0, 0), (5, 2), (48, 1)]
    num_seqs, z = len(steps), page_size
    needed = [-(-n // z) for n, _ in steps]
    assert max(needed) <= pages_per_seq
    num_pages = 1 + sum(needed) + 3  # the null page, the sequences' pages, three free pages
    handed = rng.permutation(np.arange(1, num_pages))  # pages out of order
    page_table = np.zeros((num_seqs, pages_per_seq), np.int32)
    at = 0
    for s, n in enumerate(needed):
        page_table[s, :n] = handed[at:at + n]
        at += n
    fp8 = cache_dtype == FP8
    spread = 64.0 if fp8 else 1.0  # fp8 values span the format's range, as a quantized cache's do
    shape = (num_pages, z, kv_heads, head_dim)
    k = (spread * rng.standard_normal(shape)).astype(np.float32)
    v = (spread * rng.standard_normal(shape)).astype(np.float32)
    k_scale = v_scale = None
    if fp8:
        k_scale = rng.uniform(0.5, 2.0, shape[:3]).astype(np.float32) / spread
        v_scale = rng.uniform(0.5, 2.0, shape[:3]).astype(np.float32) / spread
    seq_ids, positions = [], []
    for s, (n, c) in enumerate(steps):
        seq_ids += [s] * c
        positions += list(range(n - c, n))
    seq_ids += [-1] * padding
    positions += [0] * padding
    seq_ids, positions = np.array(seq_ids, np.int32), np.array(positions, np.int32)
    if shuffle:
        order = rng.permutation(len(seq_ids))
        seq_ids, positions = seq_ids[order], positions[order]
    context_lens = np.array([n for n, _ in steps], np.int32)
    # Poison every slot no row may read: all but each sequence's positions (after the window's start).
    readable = np.zeros(shape[:2], bool)
    for s, (n, c) in enumerate(steps):
        first = 0 if window is None or c == 0 else max(n - c - window + 1, 0)
        for p in range(first, n):
            readable[page_table[s, p // z], p % z] = True
    for a in (k, v) + ((k_scale, v_scale) if fp8 else ()):
        a[~readable] = np.nan
    q = rng.standard_normal((len(seq_ids), q_heads, head_dim)).astype(q_dtype)
    return Case(q, k.astype(cache_dtype), v.astype(cache_dtype), page_table, seq_ids, positions, context_lens,
                k_scale, v_scale, window)


def numpy_reference(case: Case, sm_scale: float | None = None) -> np.ndarray:
    """float64 attention of each row over its own sequence's readable positions, gathered page by page."""
    rows, q_heads, head_dim = case.q.shape
    z, kv_heads = case.k.shape[1:3]
    group = q_heads // kv_heads
    sm_scale = head_dim**-0.5 if sm_scale is None else sm_scale
    k, v = case.k.astype(np.float64), case.v.astype(np.float64)
    if case.k_scale is not None:
        k, v = k * case.k_scale[..., None], v * case.v_scale[..., None]
    out = np.zeros((rows, q_heads, head_dim))
    for t in range(rows):
        s, pos = int(case.seq_ids[t]), int(case.positions[t])
        if s < 0:
            continue
        hi = min(pos + 1, int(case.context_lens[s]))
        lo = 0 if case.window is None else max(pos - case.window + 1, 0)
        at = [(case.page_table[s, p // z], p % z) for p in range(lo, hi)]
        if not at:
            continue
        pages, offsets = np.array(at).T
        for h in range(q_heads):
            logits = k[pages, offsets, h // group] @ case.q[t, h].astype(np.float64) * sm_scale
            p = np.exp(logits - logits.max())
            out[t, h] = (p / p.sum()) @ v[pages, offsets, h // group]
    return out


class PagedAttentionCases:
    """Cases every implementation must pass; subclasses set `implementation` (and a small config)."""

    implementation: str = "reference"
    config: PagedAttentionConfig | None = None

    def run(self, case: Case, **kwargs) -> jax.Array:
        if self.config is not None:
            kwargs.setdefault("config", self.config)
        return paged_attention(*case.args(), **case.scales(), window=case.window,
                               implementation=self.implementation, **kwargs)

    def check(self, case: Case, **kwargs) -> jax.Array:
        out = self.run(case, **kwargs)
        assert out.shape == case.q.shape and out.dtype == case.q.dtype
        assert_close(out, numpy_reference(case, kwargs.get("sm_scale")))
        return out

    def test_decode_rows_chunks_and_prompts_in_one_call(self, seed):
        # Rows in a random order; lengths that do not divide the page, a chunk crossing pages, an
        # unused page-table row, padding rows.
        case = make_case(seed)
        out = self.check(case)
        assert (np.asarray(out, np.float32)[case.seq_ids < 0] == 0).all(), "padding rows must give zeros"

    def test_mqa_fp8_pages_with_window(self, seed):
        case = make_case(seed, q_heads=4, kv_heads=1, cache_dtype=FP8, window=12, steps=[(70, 25), (31, 1), (9, 9)])
        self.check(case, sm_scale=0.37)

    def test_odd_group_float32_larger_pages_and_window_one(self, seed):
        # A group of 3 query heads (not a power of two), 32-position pages, head dim 128, rows in order.
        case = make_case(seed, q_heads=6, kv_heads=2, q_dtype=jnp.float32, cache_dtype=jnp.float32, page_size=32,
                         head_dim=128, pages_per_seq=3, window=1, shuffle=False, steps=[(70, 5), (33, 33), (1, 1)])
        self.check(case)


    def test_decode_step_over_idle_page_table_rows_and_empty_rows(self, seed):
        # A serving step: few live decode rows among many page-table rows, one row of a sequence with no
        # positions yet (it sees nothing: zeros), a length that fills its last page exactly, padding.
        case = make_case(seed, steps=[(0, 0), (100, 1), (0, 0), (0, 1), (17, 1), (0, 0), (0, 0), (144, 1), (0, 0)],
                         pages_per_seq=9, padding=5)
        out = np.asarray(self.check(case), np.float32)
        assert (out[(case.seq_ids == 3)] == 0).all(), "a row that sees no position must give zeros"

    def test_fp8_decode_rows_beside_a_two_row_sequence_with_window(self, seed):
        # MQA over fp8 pages, decode rows whose window starts inside a page, beside a sequence of two rows.
        case = make_case(seed, q_heads=4, kv_heads=1, cache_dtype=FP8, window=20, pages_per_seq=6,
                         steps=[(70, 1), (33, 1), (5, 1), (64, 2), (90, 1)])
        self.check(case)

    def test_group_wider_than_the_smallest_tile(self, seed):
        # 32 query heads on one KV head: a decode row's heads alone fill more than the 16-row tile.
        case = make_case(seed, q_heads=32, kv_heads=1, q_dtype=jnp.float16, steps=[(40, 1), (23, 3), (64, 1)],
                         padding=1)
        self.check(case)


class TestReference(PagedAttentionCases):
    implementation = "reference"

    def test_only_padding_rows_give_zeros(self, seed):
        case = make_case(seed, steps=[(9, 0), (0, 0)], padding=5)
        assert (np.asarray(self.run(case), np.float32) == 0).all()

    def test_poison_inside_the_span_reaches_the_output(self, seed):
        # Guards the poisoning: a NaN at a position a row must read does show up, in that sequence only.
        case = make_case(seed, steps=[(20, 1), (20, 1)], padding=0, shuffle=False)
        case.v[case.page_table[0, 0], 3] = np.nan
        out = np.asarray(self.run(case), np.float32)
        assert np.isnan(out[0]).any() and np.isfinite(out[1]).all()


class TestPallas(PagedAttentionCases):
    implementation = "pallas"
    # Small row blocks, two splits and two pages a step, so that the interpret-mode grids cut chunks
    # into several blocks and exercise the split/combine path and the gather of several pages.
    config = PagedAttentionConfig(block_q=4, num_splits=2, pages_per_step=2)

    def test_widened_block_and_empty_splits(self, seed):
        # A block the kernel widens to a 16-row tile, more splits than pages, one page a step.
        case = make_case(seed, steps=[(50, 17), (12, 1), (0, 0)])
        self.check(case, config=PagedAttentionConfig(block_q=1, num_splits=5))


class TestPallasDecodeLaunch(PagedAttentionCases):
    implementation = "pallas"
    # Decode rows through their own launch, cut into up to four items over 16-position steps (half a page
    # of the 32-position pages; a small wave, so that few rows still split); the rest through the block
    # launch with slot-by-slot reads.
    config = PagedAttentionConfig(block_q=4, num_splits=2, pages_per_step=2, gather="rows",
                                  decode=DecodeConfig(num_splits=4, block_kv=16, wave=16))

    def test_long_rows_split_into_many_items(self, seed):
        # A wave large enough that each row takes its most items: eight for the long rows, fewer for a
        # row of few steps (a split of under two steps is not worth its partials).
        case = make_case(seed, steps=[(150, 1), (37, 1), (160, 1), (20, 20)], pages_per_seq=10, padding=2)
        self.check(case, config=dataclasses.replace(self.config, decode=DecodeConfig(num_splits=8, block_kv=16,
                                                                                     wave=4096)))

    def test_one_row_has_no_block_launch(self, seed):
        case = make_case(seed, steps=[(45, 1)], padding=0)
        self.check(case)


def check_against_reference(case: Case, config: PagedAttentionConfig, **kwargs) -> None:
    out = paged_attention(*case.args(), **case.scales(), window=case.window, implementation="pallas", config=config,
                          **kwargs)
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    assert_close(out, numpy_reference(case, kwargs.get("sm_scale")))


class TestMosaicDecodeLaunch:
    """The decode launch on Mosaic GPU (opt-in: `DecodeConfig(kernel="mosaic")`), the block launch on
    Triton beside it. It takes bf16, f16 and FP8 pools; every case poisons the slots no row may read."""

    @staticmethod
    def config(block_kv: int = 64, stages: int = 3, splits: int = 4, wave: int = 16) -> PagedAttentionConfig:
        return PagedAttentionConfig(block_q=4, gather="rows", decode=DecodeConfig(
            num_splits=splits, block_kv=block_kv, num_stages=stages, wave=wave, kernel="mosaic"))

    def check(self, case: Case, config: PagedAttentionConfig, **kwargs) -> None:
        check_against_reference(case, config, **kwargs)

    def test_decode_rows_split_into_items_beside_chunks(self, seed):
        # Steps of half a page (128-position pages), rows cut into several items (a ring deeper than some
        # items' steps), a row that sees nothing, chunks and padding through the block launch.
        case = make_case(seed, page_size=128, pages_per_seq=3, padding=2,
                         steps=[(300, 1), (37, 1), (0, 1), (20, 20), (64, 1), (0, 0)])
        self.check(case, self.config())

    def test_several_pages_a_step_mqa_f16_window(self, seed):
        # Four 16-position pages a step, one query head per KV head (the tile's rows past it belong to
        # other rows), a window starting inside a page, head dim 128.
        case = make_case(seed, q_heads=2, kv_heads=2, head_dim=128, q_dtype=jnp.float16, cache_dtype=jnp.float16,
                         window=45, pages_per_seq=9, steps=[(130, 1), (70, 1), (9, 1)], padding=1)
        self.check(case, self.config(block_kv=64, stages=2), sm_scale=0.21)

    def test_wide_group(self, seed):
        # 32 query heads on one KV head: half the wgmma tile is the row's own heads.
        case = make_case(seed, q_heads=32, kv_heads=1, steps=[(40, 1), (64, 1), (5, 1)], padding=0)
        self.check(case, self.config(splits=2))

    def test_fp8_pool_steps_of_several_pages_window(self, seed):
        # e4m3 pages with their per-token scales (poisoned past the spans like the values): four pages a
        # step, rows cut into items, a window starting inside a page, a row that sees nothing.
        case = make_case(seed, q_heads=16, kv_heads=8, head_dim=128, cache_dtype=FP8, window=50, pages_per_seq=9,
                         steps=[(130, 1), (70, 1), (0, 1), (9, 1), (20, 20)], padding=1)
        self.check(case, self.config(block_kv=64, stages=2), sm_scale=0.19)

    def test_fp8_pool_half_page_steps_f16_queries(self, seed):
        case = make_case(seed, q_heads=8, kv_heads=8, head_dim=128, page_size=128, cache_dtype=FP8,
                         q_dtype=jnp.float16, pages_per_seq=3, steps=[(300, 1), (37, 1), (64, 1)], padding=0)
        self.check(case, self.config(block_kv=64, stages=3, splits=3))

    def test_refuses_pools_it_cannot_read(self, seed):
        case = make_case(seed, cache_dtype=jnp.float32, steps=[(20, 1), (9, 1)])
        with pytest.raises(ValueError, match="bf16, f16 or float8_e4m3fn pools"):
            self.check(case, self.config())
        case = make_case(seed, cache_dtype=FP8, kv_heads=2, head_dim=128, steps=[(20, 1), (9, 1)])
        with pytest.raises(ValueError, match="a multiple of 8 heads"):
            self.check(case, self.config())
        case = make_case(seed, cache_dtype=FP8, kv_heads=8, steps=[(20, 1), (9, 1)])
        with pytest.raises(ValueError, match="head_dim=64 rows of float8_e4m3fn"):
            self.check(case, self.config())
        case = make_case(seed, q_dtype=jnp.float32, steps=[(20, 1), (9, 1)])
        with pytest.raises(ValueError, match="float32 queries"):
            self.check(case, self.config())
        case = make_case(seed, steps=[(20, 1), (9, 1)], head_dim=128)
        with pytest.raises(ValueError, match="do not fit in shared memory"):
            self.check(case, self.config(block_kv=128, stages=4))
        with pytest.raises(ValueError, match="steps of 32 positions are not whole 64-row register tiles"):
            self.check(case, self.config(block_kv=32, stages=4))
        with pytest.raises(ValueError, match="config.decode.kernel must be one of"):
            self.check(case, PagedAttentionConfig(decode=DecodeConfig(kernel="cuda")))


class TestMosaicBlockLaunch:
    """The block launch on Mosaic GPU (opt-in: `PagedAttentionConfig(kernel="mosaic")`): each block's
    query rows as one 64-row tile, each row masked at its own position; alone (decode rows in blocks
    too) and beside the Mosaic decode launch (no Triton kernel at all)."""

    @staticmethod
    def config(block_q: int = 4, pages_per_step: int = 4, stages: int = 2, splits: int = 1,
               decode: bool = False) -> PagedAttentionConfig:
        return PagedAttentionConfig(block_q=block_q, num_splits=splits, pages_per_step=pages_per_step,
                                    num_stages=stages, kernel="mosaic", decode=TestMosaicDecodeLaunch.config(
                                        stages=stages).decode if decode else None)

    def test_prompts_chunks_and_decode_rows(self, seed):
        # Whole prompts, chunks continuing a sequence (blocks of 4 tokens x 4 heads = 16 tile rows, the
        # last block of a sequence partial), decode rows, an unused table row, padding.
        case = make_case(seed, steps=[(37, 1), (16, 16), (70, 21), (0, 0), (5, 2), (48, 1)])
        check_against_reference(case, self.config())

    def test_splits_several_pages_a_step_window_f16(self, seed):
        case = make_case(seed, q_heads=4, kv_heads=2, q_dtype=jnp.float16, cache_dtype=jnp.float16, window=40,
                         pages_per_seq=8, steps=[(120, 33), (64, 64), (9, 1), (75, 2)], padding=1)
        check_against_reference(case, self.config(block_q=32, pages_per_step=4, splits=3), sm_scale=0.3)

    def test_fp8_pool_beside_the_mosaic_decode_launch(self, seed):
        case = make_case(seed, q_heads=16, kv_heads=8, head_dim=128, cache_dtype=FP8, page_size=32,
                         pages_per_seq=6, steps=[(150, 40), (37, 1), (64, 1), (90, 90)], padding=2)
        check_against_reference(case, self.config(block_q=16, pages_per_step=2, splits=2, decode=True))

    def test_pallas_mosaic_takes_the_default_config_on_mosaic(self, seed, monkeypatch):
        # implementation="pallas_mosaic": the default config with both launches on Mosaic GPU, at
        # Mixtral's head geometry on an FP8 pool (a 24-row step: decode rows take the decode launch).
        from pallas_kernels.paged_attention import mosaic

        launched = []
        for name in ("decode_launch", "block_launch"):
            launch = getattr(mosaic, name)
            monkeypatch.setattr(mosaic, name, lambda *a, _f=launch, _n=name, **k: launched.append(_n) or _f(*a, **k))
        case = make_case(seed, q_heads=32, kv_heads=8, head_dim=128, cache_dtype=FP8, pages_per_seq=6,
                         steps=[(70, 20), (37, 1), (64, 1), (5, 1), (81, 1)], padding=0)
        out = paged_attention(*case.args(), **case.scales(), implementation="pallas_mosaic")
        assert_close(out, numpy_reference(case))
        assert sorted(launched) == ["block_launch", "decode_launch"]

    def test_refuses_tiles_past_64_rows(self, seed):
        case = make_case(seed, steps=[(20, 20)])
        with pytest.raises(ValueError, match="block_q=32 rows of 4 query heads"):
            check_against_reference(case, self.config(block_q=32))
        with pytest.raises(ValueError, match="config.kernel must be one of"):
            check_against_reference(case, PagedAttentionConfig(kernel="cuda"))


@pytest.mark.parametrize("page_size,block_kv,stages", [(16, 64, 3), (64, 128, 2)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, FP8], ids=["bf16", "fp8"])
@pytest.mark.parametrize("rows", [32, 256], ids=["decode", "chunk"])
def test_mosaic_launches_lower_for_h100(page_size, block_kv, stages, dtype, rows):
    """Steps of 32 and 256 rows at Mixtral's shapes lower through Mosaic GPU (its layout inference and
    shared-memory plan) for an H100, on the CPU: the decode launch and the block launch, no Triton."""
    from pallas_kernels.paged_attention import triton as triton_backend

    s, i32 = jax.ShapeDtypeStruct, jnp.int32
    head_dim = 128
    pool = s((1000, page_size, 8, head_dim), dtype)
    scales = [s((1000, page_size, 8), jnp.float32)] * 2 if dtype == FP8 else [None, None]
    decode = TestMosaicDecodeLaunch.config(block_kv=block_kv, stages=stages, splits=16, wave=132).decode
    config = PagedAttentionConfig(block_q=16, num_splits=2, pages_per_step=block_kv // page_size or 1,
                                  num_stages=stages, kernel="mosaic", decode=decode)

    def fn(q, k, v, page_table, seq_ids, positions, context_lens, k_scale, v_scale):
        return triton_backend.paged_attention(q, k, v, page_table, seq_ids, positions, context_lens, k_scale=k_scale,
                                              v_scale=v_scale, sm_scale=head_dim**-0.5, window=None, config=config)

    text = lower_for_h100(fn, s((rows, 32, head_dim), jnp.bfloat16), pool, pool, s((rows, 64), i32), s((rows,), i32),
                          s((rows,), i32), s((rows,), i32), *scales)
    assert "jaxfire_paged_attention_decode_mosaic" in text
    assert "jaxfire_paged_attention_block_mosaic" in text and "triton" not in text.lower()


class TestPallasDefaultConfig(PagedAttentionCases):
    """The kernel with the default config of each case's shapes (the one the model runs)."""

    implementation = "pallas"


# The kernel written in Triton itself (`triton_jit.py`; Triton's interpreter on a CPU) on the same cases
# and configs as the Pallas kernel: both gathers, splits, the decode launch, the default configs.


@needs_triton
class TestTriton(TestPallas):
    implementation = "triton"


@needs_triton
class TestTritonDecodeLaunch(TestPallasDecodeLaunch):
    implementation = "triton"


@needs_triton
class TestTritonDefaultConfig(TestPallasDefaultConfig):
    implementation = "triton"


def _mixtral_step(dtype) -> tuple[tuple, PagedAttentionConfig]:
    """Abstract arguments of a 256-row step at Mixtral's heads (32 query heads, 8 KV heads, head dim 128)
    over pools of pages of 16, 32 sequences of up to 64 pages, and the step's default config."""
    s, i32 = jax.ShapeDtypeStruct, jnp.int32
    rows, seqs, pages_per_seq, page_size, head_dim = 256, 32, 64, 16, 128
    pool = s((2048, page_size, 8, head_dim), dtype)
    scale = s(pool.shape[:3], jnp.float32) if dtype == FP8 else None
    config = default_config(4, page_size, rows, seqs, pages_per_seq, kv_heads=8, head_dim=head_dim,
                            itemsize=pool.dtype.itemsize)
    return (s((rows, 32, head_dim), jnp.bfloat16), pool, pool, s((seqs, pages_per_seq), i32), s((rows,), i32),
            s((rows,), i32), s((seqs,), i32), scale, scale), config


def _with_config(paged_attention, config: PagedAttentionConfig):
    """`paged_attention` taking `_mixtral_step`'s arguments positionally, with `config`."""
    return lambda *a: paged_attention(*a[:7], k_scale=a[7], v_scale=a[8], sm_scale=128**-0.5, window=None,
                                      config=config)


@needs_triton
@pytest.mark.parametrize("dtype", [jnp.bfloat16, FP8], ids=["bf16", "fp8"])
def test_triton_launches_compile_for_hopper(dtype, monkeypatch):
    """Both launches of the Triton kernel, with the default config of a 256-row step at Mixtral's heads (32
    query heads, 8 KV heads, head dim 128, pages of 16), compile with Triton for sm_90 on the CPU: each
    launch as the jitted wrapper hands it to jax-triton (kernel, operands, constexprs, warps, stages), its
    key and value loads pipelined (cp.async into shared memory) as the Pallas kernel's are."""
    from pallas_kernels import triton_call
    from pallas_kernels.paged_attention import triton_jit

    launches = []

    def record(kernel, *args, out_shape, grid, num_warps, num_stages, interpret, launcher, name, **constexprs):
        assert launcher == "xla"
        operands = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
        launches.append((name, kernel, operands, out_shape, dict(num_warps=num_warps, num_stages=num_stages),
                         constexprs))
        return [jnp.zeros(o.shape, o.dtype) for o in out_shape]

    args, config = _mixtral_step(dtype)
    assert config.gather == "pages" and config.pages_per_step == 4 and config.decode is not None
    monkeypatch.setattr(triton_call, "call", record)
    triton_jit.paged_attention.clear_cache()  # trace afresh, through the recorder
    try:
        jax.eval_shape(_with_config(triton_jit.paged_attention, config), *args)
    finally:
        triton_jit.paged_attention.clear_cache()
    assert [launch[0] for launch in launches] == ["jaxfire_paged_attention", "jaxfire_paged_attention_decode"]
    for name, kernel, operands, out_shape, launch, constexprs in launches:
        assert constexprs["INTERPRET"] is False and constexprs["FP8"] == (dtype == FP8)
        compiled = triton_call.compile_for(kernel, *operands, out_shape=out_shape, **launch, **constexprs)
        assert ".target sm_90" in compiled.asm["ptx"] and len(compiled.asm["cubin"]) > 0, name
        assert "async_copy_global_to_local" in compiled.asm["ttgir"], name


@needs_triton
@pytest.mark.parametrize("dtype", [jnp.bfloat16, FP8], ids=["bf16", "fp8"])
def test_triton_launches_lower_to_xlas_triton_calls(dtype):
    """On a GPU both launches of the kernel written in Triton are XLA's own Triton custom calls (a
    256-row step at Mixtral's heads, pages of 16), each taking one pointer per operand and result."""
    from pallas_kernels.paged_attention import triton_jit
    from tests.kernels.lowering import xla_triton_calls

    args, config = _mixtral_step(dtype)
    calls = xla_triton_calls(_with_config(triton_jit.paged_attention, config), *args)
    assert [c.name for c in calls] == ["jaxfire_paged_attention", "jaxfire_paged_attention_decode"]
    assert calls[0].grid[1] == 8 and calls[1].grid[0] == 8  # (N, Hkv, J) and (Hkv, I)
    for c in calls:
        assert c.pointer_params == c.operands + c.results, c.name


def _items(live: int, steps: list[int], **kw) -> dict:
    from pallas_kernels.paged_attention.plan import decode_items

    rows = len(steps)
    span = 16
    decode = dict(hi=jnp.asarray([n * span for n in steps], jnp.int32), lo=jnp.zeros((rows,), jnp.int32),
                  seq=jnp.arange(rows, dtype=jnp.int32), row0=jnp.arange(rows, dtype=jnp.int32),
                  live=jnp.int32(live))
    kw = dict(dict(num_splits=16, wave=132, kv_heads=8, span=span), **kw)
    kw.setdefault("num_items", min(rows * kw["num_splits"], rows + -(-kw["wave"] // kw["kv_heads"])))
    return {name: np.asarray(a) for name, a in decode_items(decode, **kw).items()}


def test_decode_splits_fill_whole_waves_of_the_rows_present():
    """Splits per decode row as the contiguous kernel picks them for a batch, here from the live rows: with
    Mixtral's 8 KV heads one row takes 16 (128 of 132 programs), two rows 8, eight rows 2, 32 rows 1; a
    row of few steps takes no more than half its steps; items past the last have no parts."""
    assert _items(1, [256] * 32)["row_parts"][:2].tolist() == [16, 0]
    assert _items(8, [256] * 32)["row_parts"][:9].tolist() == [2] * 8 + [0]
    assert (_items(32, [256] * 32)["row_parts"] == 1).all()
    few = _items(2, [256, 5] + [0] * 6)
    assert few["row_parts"].tolist() == [8, 2] + [0] * 6 and (few["parts"] > 0).sum() == 10
    items = _items(3, [4, 4, 4] + [0] * 13)
    assert items["row_parts"][:4].tolist() == [2, 2, 2, 0] and (items["parts"] > 0).sum() == 6
    # Each live item names its row and its share, a row's items adjacent.
    live = items["parts"] > 0
    assert items["row0"][live].tolist() == [0, 0, 1, 1, 2, 2] and items["part"][live].tolist() == [0, 1] * 3


def test_decode_items_never_outgrow_the_grid():
    # 40 live rows of Mixtral's heads overfill one wave; the grid holds rows + one wave's worth of items.
    items = _items(40, [256] * 40)
    assert (items["parts"] > 0).sum() <= items["parts"].shape[0] == 40 + 17


def test_default_implementation_on_cpu_is_the_reference():
    if jax.default_backend() == "gpu":
        pytest.skip("the default differs on GPU")
    case = make_case(1, steps=[(20, 3)])
    got = paged_attention(*case.args())
    want = paged_attention(*case.args(), implementation="reference")
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_default_config_splits_only_steps_of_few_sequences():
    # Mixtral's group of 4 query heads: 16 rows x 4 heads per program.
    one = default_config(4, 64, rows=1, seqs=1, pages_per_seq=256, kv_heads=8)
    assert one.block_q == 16 and one.num_splits > 1
    assert default_config(4, 64, rows=128, seqs=128, pages_per_seq=64, kv_heads=8).num_splits == 1
    assert default_config(4, 64, rows=1, seqs=1, pages_per_seq=2, kv_heads=8).num_splits == 1  # too few pages
    assert default_config(4, 16).pages_per_step == 4 and default_config(4, 128).pages_per_step == 1


def test_default_config_takes_the_decode_launch_from_eight_rows():
    """Measured faster from batch 8, slower at batch 1 (see DECODE_LAUNCH_MIN_ROWS)."""
    from pallas_kernels.paged_attention.config import DECODE_LAUNCH_MIN_ROWS

    assert DECODE_LAUNCH_MIN_ROWS == 8
    assert default_config(4, 16, rows=4, seqs=32, pages_per_seq=64, kv_heads=8).decode is None
    assert default_config(4, 16, rows=8, seqs=32, pages_per_seq=64, kv_heads=8).decode is not None
    assert default_config(4, 16).decode is not None  # without the shapes: the launch serving steps of 8+ take


@pytest.mark.parametrize("fp8", [False, True])
def test_append_writes_each_row_at_its_slot_and_drops_the_rest(fp8):
    rng = np.random.default_rng(3)
    dtype = FP8 if fp8 else jnp.bfloat16
    pool = rng.standard_normal((4, 16, 2, 64)).astype(dtype)
    new = rng.standard_normal((5, 2, 64)).astype(dtype)
    slots = np.array([17, -1, 63, 64, 5], np.int32)  # 64 is past the pool: dropped, as is -1
    scales = {}
    if fp8:
        pool_scale, new_scale = rng.uniform(size=(4, 16, 2)).astype(np.float32), rng.uniform(size=(5, 2)).astype(
            np.float32)
        scales = dict(k_scale=pool_scale, v_scale=pool_scale, k_new_scale=new_scale, v_new_scale=new_scale)
    out = append(jnp.asarray(pool), jnp.asarray(pool), jnp.asarray(new), jnp.asarray(new), jnp.asarray(slots),
                 **{name: jnp.asarray(a) for name, a in scales.items()})
    want = pool.reshape(64, 2, 64).copy()
    want[[17, 63, 5]] = new[[0, 2, 4]]
    for got in out[:2]:
        np.testing.assert_array_equal(np.asarray(got, np.float32).reshape(64, 2, 64), want.astype(np.float32))
    if fp8:
        want_scale = pool_scale.reshape(64, 2).copy()
        want_scale[[17, 63, 5]] = new_scale[[0, 2, 4]]
        np.testing.assert_array_equal(np.asarray(out[2]).reshape(64, 2), want_scale)


def _good(**over):
    args = dict(q=jnp.zeros((4, 8, 64), jnp.bfloat16), k_pages=jnp.zeros((3, 16, 2, 64), jnp.bfloat16),
                v_pages=jnp.zeros((3, 16, 2, 64), jnp.bfloat16), page_table=jnp.zeros((2, 2), jnp.int32),
                seq_ids=jnp.zeros((4,), jnp.int32), positions=jnp.zeros((4,), jnp.int32),
                context_lens=jnp.ones((2,), jnp.int32))
    args.update(over)
    return args


@pytest.mark.parametrize("override,message", [
    (dict(q=jnp.zeros((4, 64), jnp.bfloat16)), "q must have rank 3"),
    (dict(k_pages=jnp.zeros((3, 16, 64), jnp.bfloat16)), "k_pages must have rank 4"),
    (dict(v_pages=jnp.zeros((3, 16, 2, 64), jnp.float32)), "v_pages must match k_pages"),
    (dict(q=jnp.zeros((4, 8, 32), jnp.bfloat16)), "disagree on the head dim"),
    (dict(q=jnp.zeros((4, 5, 64), jnp.bfloat16)), "multiple of the pages' 2 KV heads"),
    (dict(page_table=jnp.zeros((2,), jnp.int32)), "page_table must be an int array"),
    (dict(seq_ids=jnp.zeros((3,), jnp.int32)), "seq_ids must be an int array of shape"),
    (dict(positions=jnp.zeros((4,), jnp.float32)), "positions must be an int array"),
    (dict(context_lens=jnp.zeros((3,), jnp.int32)), "context_lens must be an int array of shape"),
    (dict(k_pages=jnp.zeros((3, 16, 2, 64), FP8), v_pages=jnp.zeros((3, 16, 2, 64), FP8)), "need both k_scale"),
    (dict(k_scale=jnp.ones((3, 16, 2)), v_scale=jnp.ones((3, 16, 2))), "only fp8 pages take them"),
    (dict(window=0), "window must be a positive int"),
    (dict(implementation="cuda"), "implementation must be one of"),
    (dict(k_pages=jnp.zeros((3, 24, 2, 64), jnp.bfloat16), v_pages=jnp.zeros((3, 24, 2, 64), jnp.bfloat16),
          implementation="pallas"), "page size must be a power of two of at least 16 positions, got 24"),
    (dict(config=PagedAttentionConfig(block_q=3), implementation="pallas"), "block_q must be a power of two"),
    (dict(config=PagedAttentionConfig(pages_per_step=3), implementation="pallas"),
     "pages_per_step must be a power of two"),
    (dict(config=PagedAttentionConfig(gather="slots"), implementation="pallas"), "gather must be one of"),
    (dict(config=PagedAttentionConfig(decode=DecodeConfig(block_kv=8)), implementation="pallas"),
     "decode.block_kv must be a power of two >= 16"),
    (dict(config=PagedAttentionConfig(decode=DecodeConfig(wave=0)), implementation="pallas"), "decode.wave must be"),
])
def test_bad_input_raises_one_clear_error(override, message):
    with pytest.raises(ValueError, match=message):
        paged_attention(**_good(**override))


@pytest.mark.parametrize("cache,splits,window,decode", [("bf16", 1, None, False), ("fp8", 2, 4096, False),
                                                        ("bf16", 4, 100, False), ("bf16", 1, None, True),
                                                        ("fp8", 2, 4096, True)])
def test_kernel_lowers_for_h100(cache, splits, window, decode, monkeypatch):
    """Mixtral shapes (a 256-row step over 64-position pages) lower through Pallas to Triton modules that
    pass the MLIR verifier: catches what the Triton lowering lacks before a GPU run. With a decode config
    the block launch reads slot by slot and the decode launch is a second module."""
    from pallas_kernels.paged_attention import triton as triton_backend

    verified = verify_triton_modules(monkeypatch)
    dtype = {"bf16": jnp.bfloat16, "fp8": FP8}[cache]
    rows, pages, page_size, kv_heads, head_dim, seqs, per_seq = 256, 1000, 64, 8, 128, 32, 64
    s = jax.ShapeDtypeStruct
    pool = s((pages, page_size, kv_heads, head_dim), dtype)
    scale = s((pages, page_size, kv_heads), jnp.float32) if cache == "fp8" else None
    config = PagedAttentionConfig(block_q=16, num_splits=splits, pages_per_step=2 if splits > 1 else 1)
    if decode:
        config = dataclasses.replace(config, gather="rows", decode=default_config(4, page_size).decode)

    def fn(q, k, v, page_table, seq_ids, positions, context_lens, k_scale, v_scale):
        return triton_backend.paged_attention(q, k, v, page_table, seq_ids, positions, context_lens, k_scale=k_scale,
                                              v_scale=v_scale, sm_scale=head_dim**-0.5, window=window, config=config)

    i32 = jnp.int32
    text = lower_for_h100(fn, s((rows, 32, head_dim), jnp.bfloat16), pool, pool, s((seqs, per_seq), i32),
                          s((rows,), i32), s((rows,), i32), s((seqs,), i32), scale, scale)
    assert "jaxfire_paged_attention" in text
    assert verified == [True, True] if decode else [True]
