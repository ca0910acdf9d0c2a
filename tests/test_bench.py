"""The GPU benchmarks run end to end on the CPU at a tiny size, so a device run does not fail on a
bug a CPU could have caught; their figures are not checked here (speed is measured, never asserted)."""

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import common, decode, profile
from bench.common import parse_mesh
from jaxfire import model as M
from jaxfire import sharding as S
from jaxfire.config import Config
from jaxfire.params import init_params

TINY = ["--preset", "tiny", "--layers", "2", "--context", "16", "--steps", "1"]


def one_layer_model(mesh: str = ""):
    """A one-layer tiny model in float32 on XLA's ops, placed on the mesh `mesh` names (none when empty)."""
    c = Config.preset("tiny").replace(num_layers=1)
    m = parse_mesh(mesh)
    params = init_params(c, jax.random.key(0), jnp.float32, sharding_fn=S.param_sharding_fn(m))
    return c, params, M.Runtime(mesh=m, decode_attention="xla", grouped_matmul="xla")


@pytest.mark.parametrize("mesh", ["expert=2,tensor=2,data=2", "tensor=8"])
def test_decode_bench_on_a_mesh_writes_rows_with_communication(tmp_path, mesh):
    rows = decode.main(TINY + ["--mesh", mesh, "--variants", "fp8", "--batches", "2", "--prefill-tokens", "32",
                               "--mixed-batches", "2", "--out-dir", str(tmp_path)])
    assert [r["job"] for r in rows] == ["decode", "prefill", "mixed"]
    written = [json.loads(line) for line in (tmp_path / "decode.jsonl").read_text().splitlines()]
    assert len(written) == 3 and all(r["devices"] == 8 for r in written)
    assert all(r["comm_ms"] > 0 for r in written[:2])
    assert all(np.isfinite(r["ms"]) and r["ms"] > 0 for r in written)
    assert written[0]["device_ms"] > 0 and "device_ms" not in written[1]  # decode also timed in one program
    assert 3 <= len(written[0]["warmup_ms"]) <= decode.WARMUP_CALLS[1] and min(written[0]["warmup_ms"]) > 0
    assert written[2]["apart_ms"] == pytest.approx(written[0]["ms"] + written[1]["ms"])
    # the read ceiling of the same run on every row; a decode step's bytes as a share of it
    assert all(r["read_tbs"] == common.read_tbs() > 0 for r in written)
    assert written[0]["of_read_bw"] == pytest.approx(written[0]["tbs"] / written[0]["read_tbs"] / 8)


def test_read_ceiling_sums_the_whole_buffer_once_per_process(monkeypatch):
    """read_tbs times its sum over a buffer of exactly the bytes it is given and, called again for the
    same size, returns its first figure without measuring again (every benchmark of a run calls it)."""
    timed = []
    real = common.time_fn
    monkeypatch.setattr(common, "time_fn", lambda fn, *a, **kw: timed.append(a[0].nbytes) or real(fn, *a, **kw))
    common.read_tbs.cache_clear()
    try:
        first = common.read_tbs(32 << 20)
        assert common.read_tbs(32 << 20) == first and timed == [32 << 20]
        common.read_tbs(64 << 20)
        assert timed == [32 << 20, 64 << 20] and np.isfinite(first) and first > 0
    finally:
        common.read_tbs.cache_clear()


@pytest.mark.parametrize("flags", [["--prefill-tokens", "-1"], ["--steps", "0"]])
def test_decode_bench_refuses_bad_counts(flags, capsys):
    with pytest.raises(SystemExit):
        decode.main(TINY + flags)
    assert "--prefill-tokens must be >= 0 and --steps >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("mesh", ["", "tensor=2"])
def test_decode_loop_compiles_once_before_its_timed_call(mesh, monkeypatch):
    """The in-program timing compiles its loop once, outside the timed call, for a runtime not seen
    before (fresh inputs are placed unlike the loop's outputs; a second compile inside the timed call
    made earlier figures count compile time)."""
    c, params, runtime = one_layer_model(mesh)
    sizes = []
    real = decode.decode_loop

    def counted(*args):
        out = real(*args)
        sizes.append(real._cache_size())
        return out

    monkeypatch.setattr(decode, "decode_loop", counted)
    decode.time_decode_loop(params, c, runtime, 2, 8, jnp.float32, 2)
    assert sizes[-1] == sizes[-2], f"the timed (last) call compiled: loop cache sizes after each call {sizes}"


def test_decode_timing_stops_its_clock_before_the_finiteness_check(monkeypatch):
    """The per-call decode timing waits for the last step, then checks the logits outside its timed
    region: the check compiles for each new logits shape (inside, it made every batch size of the
    first variant in a process read 2-50x slower). A check made slow here must not show up."""
    c, params, runtime = one_layer_model()
    real = jnp.isfinite

    def slow_isfinite(x):
        time.sleep(1.0)
        return real(x)

    monkeypatch.setattr(jnp, "isfinite", slow_isfinite)
    sec, _, warmup_ms = decode.time_decode(params, c, runtime, 2, 8, jnp.float32, 2)
    assert sec < 0.25, f"{sec:.3f} s a step: the check's second is inside the timed region"
    assert len(warmup_ms) >= decode.WARMUP_CALLS[0]


def test_traced_seconds_counts_the_work_of_each_call():
    """The trace-based timer the kernel sweep uses counts the device (here: XLA thunk) time of each
    call, so a call with 64 times the multiply-adds reads as far longer."""
    mm = jax.jit(lambda a: a @ a)
    small, big = (jax.random.normal(jax.random.key(0), (n, n), jnp.float32) for n in (128, 512))
    t_small = profile.traced_seconds([lambda: mm(small)] * 4)
    t_big = profile.traced_seconds([lambda: mm(big)] * 4)
    assert 0 < t_small and 4 * t_small < t_big, (t_small, t_big)


def test_profile_bench_books_decode_and_prefill_stages(tmp_path):
    rows = profile.main(TINY + ["--variant", "bf16", "--batches", "2", "--prefill-tokens", "32",
                                "--out-dir", str(tmp_path)])
    assert [r["job"] for r in rows] == ["decode", "prefill"]
    for r in rows:
        assert r["matched_share"] > 0.5, r
        stages = r["stages_ms"]
        assert any(s.startswith("moe/") for s in stages) and any(s.startswith("attention") for s in stages)
    step = rows[0]
    assert step["kernels_per_layer"] == pytest.approx(step["kernels_per_step"] / 2)
    assert step["bytes"] == decode.step_bytes(Config.preset("tiny").replace(num_layers=2), 2, 2, 16, 2.0, 2.0)
    assert step["of_read_bw"] == pytest.approx(step["bytes"] / step["wall_ms"] / 1e9 / step["read_tbs"])


def test_profile_bench_books_ragged_steps_beside_the_decode_step(tmp_path):
    """Paged engine steps of one decode row unpadded and padded to 16 rows, and decode rows beside a
    prompt chunk, profiled in the run that profiles the contiguous decode step at batch 1."""
    rows = profile.main(TINY + ["--variant", "bf16", "--batches", "1", "--prefill-tokens", "0", "--slots", "4",
                                "--ragged", "decode=1,bucket=1", "decode=1,bucket=16", "decode=2,chunk=8,at=16",
                                "--out-dir", str(tmp_path)])
    assert [r["job"] for r in rows] == ["decode", "ragged", "ragged", "ragged"]
    assert [r["bucket"] for r in rows[1:]] == [1, 16, 16] and {r["slots"] for r in rows[1:]} == {4}
    for r in rows:
        assert r["matched_share"] > 0.5, r
        stages = r["stages_ms"]
        assert any(s.startswith("moe/") for s in stages) and any(s.startswith("attention") for s in stages)
        assert r["kernels_per_layer"] == pytest.approx(r["kernels_per_step"] / 2)
    # one decode row reads what the contiguous step at batch 1 reads, padded or not
    assert rows[1]["bytes"] == rows[2]["bytes"] == rows[0]["bytes"]
    # ten rows routed; two decode rows read their 16 cached positions, the chunk its prompt's 24
    assert rows[3]["bytes"] == decode.step_bytes(Config.preset("tiny").replace(num_layers=2), 2, 10, 16, 2.0, 2.0,
                                                 cached=2 * 16 + 24)
    written = [json.loads(line) for line in (tmp_path / "profile.jsonl").read_text().splitlines()]
    assert [r.get("spec") for r in written] == [None, "decode=1,bucket=1", "decode=1,bucket=16",
                                                "decode=2,chunk=8,at=16,bucket=16"]


def test_profile_ragged_batch_is_the_one_the_paged_engine_builds():
    """The profiled step's rows, padding and page table are the ones `Runner` builds for the same
    decode rows and chunk, with the pages the profiler gave each sequence."""
    from jaxfire.api import Model
    from jaxfire.engine.runner import Runner
    from jaxfire.engine.scheduler import Chunk, StepPlan

    c, params, runtime = one_layer_model()
    job = profile.RaggedJob.parse("decode=3,chunk=20,at=8")
    pages, got = profile.ragged_batch(job, 40, 6, 128, 16, c.vocab_size)
    runner = Runner(Model(c, params, None, runtime=runtime), 6, 128, 16, pages.num_pages, 64)
    held = lambda row: tuple(int(p) for p in pages.table[row] if p)  # noqa: E731
    chunks = [Chunk(None, row, 40, [int(got.tokens[row])], held(row), True) for row in range(3)]
    chunks.append(Chunk(None, 3, 8, [int(t) for t in got.tokens[3:23]], held(3), True))
    want, _, _ = runner._batch(StepPlan(chunks, []))
    assert job.rows == 32 and got.tokens.shape == (32,) and pages.table.shape == (6, 8)
    assert [len(held(row)) for row in range(6)] == [3, 3, 3, 2, 0, 0]
    for name in ("tokens", "positions", "seq_ids", "page_table", "context_lens", "logit_rows"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


@pytest.mark.parametrize("spec, says", [("decode=8,bucket=4", "holds fewer"), ("decode=x", "key=integer"),
                                         ("rows=3", "'rows' is not one of"), ("decode=0", "at least one"),
                                         ("decode=1,at=4", "there is none")])
def test_profile_ragged_spec_refuses_a_step_that_cannot_be(spec, says):
    with pytest.raises(ValueError, match=says):
        profile.RaggedJob.parse(spec)


def test_gemv_sweep_checks_and_times_every_config(tmp_path, monkeypatch):
    """The multiply-add sweep on a tiny two-expert problem: each config is checked against the reference,
    timed from a profiler trace over weight sets stacked on the expert axis (one compile), and written
    at once."""
    from bench import grouped_matmul as G

    monkeypatch.setattr(G, "GEMV_PROBLEMS", (("tiny_gate_up", 64, 128, 4, (1, 1, 0, 0), True),))
    monkeypatch.setattr(G, "L2_OVERFLOW_BYTES", 3 * 64 * 128)  # two weight sets
    b = G.Bench(1, "grouped_matmul", tmp_path, "test")
    G.run_gemv_sweep(b, 1e12, 1, "")
    assert not b.failures
    configs = [r["config"] for r in b.rows]
    assert configs[0].startswith("mma-default: ") and "gemv=False" in configs[0]
    assert all("gemv=True" in c for c in configs[1:]) and len(set(configs)) == len(configs)
    assert {r["weight_sets"] for r in b.rows} == {2} and {r["timing"] for r in b.rows} == {"profiler"}
    written = [json.loads(line) for line in (tmp_path / "grouped_matmul.jsonl").read_text().splitlines()]
    assert len(written) == len(b.rows) and all(r["ms"] > 0 and r["rel_err"] < G.MAX_REL_ERR for r in written)


def test_grid_rows_carry_the_share_of_computed_rows_that_are_real(tmp_path, monkeypatch):
    """Each kernel row of the grid carries its row tiles' efficiency (each expert's last tile padded to
    block_m rows, as the kernel's row tasks cut them) and its rate over the rows computed."""
    from bench import grouped_matmul as G
    from pallas_kernels.grouped_matmul.tiling import tile_efficiency

    monkeypatch.setattr(G, "SHAPES", {"tiny": (128, 256)})
    # every implementation as the reference (the kernels have interpret-mode tests of their own): what
    # is checked is each row's bookkeeping, the tiles as the implementation's config cuts them
    monkeypatch.setattr(G, "ours", lambda implementation, **kw: jax.jit(functools.partial(
        G.grouped_matmul, transpose_rhs=True, implementation="reference")))
    rows = G.main(["--study", "grid", "--rows", "40", "--shapes", "tiny", "--swiglu-rows", "", "--out-dir",
                   str(tmp_path)])
    ours = [r for r in rows if r["impl"].startswith("jaxfire")]
    assert {r["impl"] for r in ours} == {"jaxfire", "jaxfire_pallas_mosaic", "jaxfire_pallas_triton"}
    for r in ours:
        align = 8 if r["impl"] == "jaxfire_pallas_mosaic" or r.get("backend") == "mosaic" else 1
        assert r["tile_efficiency"] == tile_efficiency(r["group_sizes"], 40, r["block_m"], align) <= 1
        assert r["tile_tflops"] == pytest.approx(r["tflops"] / r["tile_efficiency"])
    assert {r["routing"] for r in ours} == {"balanced", "skewed", "random"}
    random = next(r for r in ours if r["routing"] == "random")["group_sizes"]
    assert sum(random) == 40 and random == G.routing("random", 40).tolist() and min(random) > 0
    with pytest.raises(SystemExit):
        G.main(["--study", "grid", "--routings", "uniform"])
    assert all("tile_efficiency" not in r for r in rows if not r["impl"].startswith("jaxfire"))  # the peers


def test_decode_study_checks_and_times_each_problem_against_the_read_ceiling(tmp_path, monkeypatch):
    """The decode-size problems run through the public entry points with their defaults, checked
    against the reference and timed from a profiler trace; each row carries the read ceiling and its
    weight bytes' share of it."""
    from bench import grouped_matmul as G

    monkeypatch.setattr(G, "DECODE_STEP_PROBLEMS", (("tiny_gate_up_b1", 64, 128, 4, (1, 1, 0, 0), True),
                                                    ("tiny_down_t8", 64, 32, 4, (2, 2, 2, 2), False)))
    monkeypatch.setattr(G, "L2_OVERFLOW_BYTES", 3 * 64 * 128)
    rows = G.main(["--study", "decode", "--iters", "1", "--out-dir", str(tmp_path)])
    assert [r["shape"] for r in rows] == ["tiny_gate_up_b1", "tiny_down_t8"]
    for r in rows:
        assert r["rel_err"] < G.MAX_REL_ERR and r["ms"] > 0 and r["read_tbs"] == common.read_tbs()
        assert r["of_read_bw"] == pytest.approx(r["weight_tbps"] / r["read_tbs"])
    assert [r["weight_sets"] for r in rows] == [2, 3]  # enough weight sets to pass the (patched) L2 size
    with pytest.raises(SystemExit):
        G.main(["--study", "decode", "--problems", "gate_up_b7"])
    # --triton-jit: each Triton problem also runs written in Triton itself (both launchers), checked and
    # timed beside it
    rows = G.main(["--study", "decode", "--iters", "1", "--triton-jit", "--out-dir", str(tmp_path)])
    assert [(r["shape"], r["impl"]) for r in rows] == [(shape, impl) for shape in ("tiny_gate_up_b1", "tiny_down_t8")
                                                       for impl in ("jaxfire", "triton-jit", "jax-triton")]
    assert all(r["rel_err"] < G.MAX_REL_ERR and r["backend"] == "triton" for r in rows)


def test_decode_alt_study_runs_every_variant_against_the_reference(tmp_path, monkeypatch):
    """The other ways to run a decode step's problems (single-task Triton blocks and XLA for one-group
    projections, FP8 activations on the Mosaic kernel for experts) are each checked against the
    reference before they are timed, and every one yields a row."""
    from bench import grouped_matmul as G

    monkeypatch.setattr(G, "ALT_PROBLEMS", (("tiny_qkv_t8", 256, 128, 1, (8,), False),
                                            ("tiny_gate_up_t4", 512, 256, 2, (2, 2), True)))
    monkeypatch.setattr(G, "L2_OVERFLOW_BYTES", 256 * 128)
    rows = G.main(["--study", "decode-alt", "--iters", "1", "--out-dir", str(tmp_path)])
    want = {name: len(G._alt_configs(sum(s), k, n, e, sw)) for name, k, n, e, s, sw in G.ALT_PROBLEMS}
    assert {name: sum(r["shape"] == name for r in rows) for name in want} == want
    assert all(r["rel_err"] < G.MAX_REL_ERR and r["of_read_bw"] > 0 for r in rows)
    assert {r["dtype"] for r in rows if r["impl"].startswith(("xla fp8", "mosaic"))} == {"w8a8"}
    # the tile study's variants: the model's default path, the kernel's default tiles, then the others
    # (the kernel's default tiles are timed once, not again among the others)
    for swiglu in (True, False):
        variants = G._tile_configs(8, 4096, 2 * 14336, 8, swiglu)
        assert [v[0] for v in variants[:2]] == ["default", "mosaic default"]
        assert len(set(map(str, variants))) == len(variants) == 5
        others = [config for _, _, config, _ in variants[2:]]
        assert variants[1][2] not in others
        assert {c.grid_tile_width for c in others} == {8, G.TASK_MAJOR}
        assert [v[0] == "mosaic task-major" for v in variants[2:]] == [c.grid_tile_width == G.TASK_MAJOR
                                                                       for c in others]


def test_chunk_sweep_checks_and_times_each_config_under_both_routings(tmp_path, monkeypatch):
    """The prefill-chunk sweep: the default wgmma config (labelled) and each other config, checked
    against the reference and timed with balanced and skewed routing; weight bytes count the experts
    that own rows."""
    from bench import grouped_matmul as G

    monkeypatch.setattr(G, "CHUNK_PROBLEMS", (("tiny_t16", 256, 256, 16),))
    monkeypatch.setattr(G, "CHUNK_CONFIGS", (G.Config(block_m=64, block_n=128, block_k=128, num_stages=2),))
    rows = G.main(["--study", "chunk-sweep", "--iters", "1", "--routings", "balanced,skewed", "--out-dir",
                   str(tmp_path)])
    assert [(r["routing"], r["config"].startswith("default: ")) for r in rows] == [
        ("balanced", True), ("balanced", False), ("skewed", True), ("skewed", False)]
    assert all(r["rel_err"] < G.MAX_REL_ERR and r["dtype"] == "fp8" and r["of_read_bw"] > 0 for r in rows)
    experts = int(np.count_nonzero(G.routing("skewed", 16)))
    assert rows[2]["weight_tbps"] == pytest.approx(experts * 256 * 256 / (rows[2]["ms"] / 1e3) / 1e12)
    with pytest.raises(SystemExit):
        G.main(["--study", "chunk-sweep", "--problems", "w2_t7"])


@pytest.fixture
def tiny_attention(monkeypatch):
    """bench/decode_attention.py at a tiny size: 8 query heads on 2 KV heads of 64, one input set."""
    from bench import decode_attention

    for name, value in (("HQ", 8), ("HKV", 2), ("HEAD_DIM", 64), ("ROTATE_BYTES", 1)):
        monkeypatch.setattr(decode_attention, name, value)
    return decode_attention


def test_paged_sweep_checks_and_times_each_config_beside_the_contiguous_kernel(tmp_path, tiny_attention):
    """The paged sweep's first tier (the default and the kernel as first written) on bf16 and fp8 caches,
    as one batch and as a serving step (4 page-table rows, the rows padded to a bucket of 16): each config
    checked against the reference, timed, and written with the contiguous kernel and the read ceiling of
    the same run."""
    D = tiny_attention
    rows = D.main(["--study", "paged-sweep", "--batches", "2", "--seqs", "64", "--page-sizes", "16", "--copies", "1",
                   "--sweep-iters", "1", "--tiers", "0", "--slots", "4", "--out-dir", str(tmp_path)])
    # two rows keep the first kernel by default (the same config as "old", timed once), so the decode
    # launch is a variant of its own there
    variants = {None: ("default", "decode-launch"), 4: ("default", "old")}
    assert [(r["cache"], r["slots"], r["variant"]) for r in rows] == [
        (cache, slots, variant) for slots in (None, 4) for variant in variants[slots] for cache in ("bf16", "fp8")]
    written = [json.loads(line) for line in (tmp_path / "decode_attention.jsonl").read_text().splitlines()]
    assert len(written) == len(rows) and all(r["study"] == "paged-sweep" and "error" not in r for r in written)
    for r in written:
        assert r["rel_err"] < 2e-2 and r["time_us"] > 0 and r["read_tbs"] == common.read_tbs() > 0
        assert r["vs_contiguous"] == pytest.approx(r["contiguous_us"] / r["time_us"])
        assert r["of_read"] == pytest.approx(r["tbps"] / r["read_tbs"])
        assert r["default"] == (r["variant"] == "default") and r["rows"] == (16 if r["slots"] else 2)
    assert all(bool(r["config"]["decode"]) == (r["rows"] >= 8) for r in written if r["default"])
    assert all(r["config"]["decode"] for r in written if r["variant"] == "decode-launch")
    assert not any(r["config"]["decode"] for r in written if r["variant"] == "old")


def test_paged_sweep_times_the_mosaic_decode_launch(tmp_path, tiny_attention, monkeypatch):
    """The sweep's Mosaic GPU variants (tier 1) run the Mosaic decode launch on bf16 and FP8 pools,
    checked against the reference before they are timed (8 KV heads of 128: FP8 pools' geometry);
    --variants picks them by name within the tiers (the default is tier 0: not run)."""
    D = tiny_attention
    for name, value in (("HQ", 16), ("HKV", 8), ("HEAD_DIM", 128)):
        monkeypatch.setattr(D, name, value)
    configs = D.paged_sweep_configs
    for itemsize in (1, 2):
        names = [name for _, name, _ in configs(2, 2, 2, 48, 16, itemsize)]
        assert [n for n in names if "mosaic" in n] == ["mosaic-kv64-stages3", "mosaic-kv128-stages2",
                                                       "mosaic-kv64-stages2"]
    rows = D.main(["--study", "paged-sweep", "--batches", "2", "--seqs", "48", "--page-sizes", "16", "--copies", "1",
                   "--sweep-iters", "1", "--tiers", "1", "--variants", "default,mosaic-kv64-stages3",
                   "--out-dir", str(tmp_path)])
    assert [(r["cache"], r["variant"]) for r in rows] == [(cache, "mosaic-kv64-stages3") for cache in ("bf16", "fp8")]
    for row in rows:
        assert "error" not in row and row["rel_err"] < 2e-2 and row["config"]["decode"]["kernel"] == "mosaic"


def test_paged_sweep_records_a_failing_config_and_goes_on(tmp_path, tiny_attention, monkeypatch, capsys):
    from pallas_kernels.paged_attention import PagedAttentionConfig

    D = tiny_attention
    monkeypatch.setattr(D, "paged_sweep_configs", lambda *a: [(0, "broken", PagedAttentionConfig(block_q=3)),
                                                              (0, "first", PagedAttentionConfig())])
    args = ["--study", "paged-sweep", "--batches", "1", "--seqs", "32", "--page-sizes", "16", "--dtypes", "bf16",
            "--copies", "1", "--sweep-iters", "1", "--out-dir", str(tmp_path)]
    broken, first = D.main(args)
    assert "block_q must be a power of two" in broken["error"] and "time_us" not in broken
    assert first["time_us"] > 0 and "error" not in first
    # A spent budget starts no config, and says so.
    assert D.main(args + ["--budget-s", "0"]) == []
    assert "2 of 2 configs not run" in capsys.readouterr().out


def test_append_study_checks_each_backend_against_the_first_and_times_it(tmp_path, tiny_attention, monkeypatch):
    """The cache append on the Pallas Triton, Mosaic GPU, Triton-language and XLA paths (interpret mode
    here), bf16 and fp8: every row written, equal to the Pallas Triton kernel's write (the Triton-language
    kernel's fp8 scales divide where XLA's multiply: within a step of e4m3), timed against it."""
    D = tiny_attention
    monkeypatch.setattr(D, "HKV", 4)  # an fp8 cache's scale row on Mosaic GPU: Hkv % 4 == 0
    rows = D.main(["--study", "append", "--batches", "2", "--seqs", "32", "--copies", "2", "--sweep-iters", "1",
                   "--out-dir", str(tmp_path)])
    assert [(r["cache"], r["impl"]) for r in rows] == [
        (c, i) for c in ("bf16", "fp8") for i in ("triton", "mosaic", "triton-jit", "jax-triton", "xla")]
    written = [json.loads(line) for line in (tmp_path / "decode_attention.jsonl").read_text().splitlines()]
    assert len(written) == 10 and all("error" not in r for r in written)
    assert all(r["max_abs_diff"] == 0 for r in written
               if r["cache"] == "bf16" or r["impl"] not in ("triton-jit", "jax-triton"))
    for r in written:
        assert r["time_us"] > 0 and r["vs_triton"] == pytest.approx(written[0 if r["cache"] == "bf16" else 5]
                                                                     ["time_us"] / r["time_us"])


def test_grid_times_each_implementation_beside_the_first(tmp_path, tiny_attention):
    """--implementations: every implementation checked against the reference and timed on the same inputs;
    the first carries the peers, each later one its time against the first's."""
    D = tiny_attention
    rows = D.main(["--study", "grid", "--batches", "2", "--seqs", "32", "--dtypes", "bf16", "--copies", "1",
                   "--implementations", "pallas,triton", "--out-dir", str(tmp_path)])
    assert [r["impl"] for r in rows] == ["pallas", "triton"]
    first, later = rows
    assert all("error" not in r and r["rel_err"] < 2e-2 and r["time_us"] > 0 for r in rows)
    assert "xla_tbps" in first and "vs_pallas" not in first and "xla_tbps" not in later
    assert later["vs_pallas"] == pytest.approx(first["time_us"] / later["time_us"])
