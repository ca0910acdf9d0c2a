# T rows (tokens x top-k, sorted by expert), K contraction, N output columns, E experts, F expert width.
"""Grouped expert matmul: TFLOP/s and weight TB/s of jaxfire's kernels beside XLA, JAX's Mosaic GPU
ragged dot, a dense matmul of equal FLOPs (compute ceiling) and the read bandwidth (memory ceiling).

    PYTHONPATH=. python3 bench/grouped_matmul.py --out-dir bench/results            # the grid
    PYTHONPATH=. python3 bench/grouped_matmul.py --study decode [--triton-jit]       # a decode step's problems
    PYTHONPATH=. python3 bench/grouped_matmul.py --study sweep --out-dir /tmp/sweep   # block sweeps
    PYTHONPATH=. python3 bench/grouped_matmul.py --study decode-sweep                # decode blocks, split-K
    PYTHONPATH=. python3 bench/grouped_matmul.py --study gemv-sweep                  # MMA vs multiply-add
    PYTHONPATH=. python3 bench/grouped_matmul.py --study decode-alt                  # a decode step's problems, other ways
    PYTHONPATH=. python3 bench/grouped_matmul.py --study decode-tiles                # wgmma tiles at decode sizes
    PYTHONPATH=. python3 bench/grouped_matmul.py --study chunk-sweep                 # wgmma tiles at chunk sizes

Every row carries the card's streaming read bandwidth measured in the same run ("read_tbs",
`bench.common.read_tbs`) and its weight bytes per second as a share of it ("of_read_bw"), beside the
read-plus-write copy figure of earlier rows ("copy_tbps", "pct_copy").

Mixtral expert shapes with 8 experts, weights stored K-major ([E, N, K], as jaxfire keeps them).
Bytes counted: the weights of the experts that own at least one row, each read once (the ideal;
lhs and output are small beside them at decode sizes). FLOPs: 2 * T * K * N. Times are means of
calls queued back to back (bench.common.time_fn with sync_each=False). Every jaxfire variant is
checked against the float32 reference on the GPU before it is timed. Random weights at full
geometry: the cost does not depend on their values. Rows of one invocation share a `run` id; all
studies append to bench/results/grouped_matmul.jsonl. The whole grid takes about ten minutes on an
H100 (compilation dominates); --shapes / --rows / --swiglu-rows split it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench import common, profile
from pallas_kernels.grouped_matmul import Config, api, mosaic, reference, tiling
from pallas_kernels.grouped_matmul.config import TASK_MAJOR, mosaic_config, triton_config
from pallas_kernels.grouped_matmul import grouped_matmul, grouped_matmul_swiglu

E = 8
SHAPES = {"w1_w3": (4096, 14336), "w2": (14336, 4096)}  # name: (K, N)
ROWS = (8, 32, 128, 1024, 4096, 16384)
FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0
MAX_REL_ERR = 2e-2


ROUTINGS = ("balanced", "skewed", "random")


def routing(kind: str, t: int) -> np.ndarray:
    """Rows per expert: 'balanced' spreads T evenly; 'skewed' sends half the rows to expert 0; 'random'
    is the top-2 of a random router over T / 2 tokens (seeded by T), as a prompt through a model's MoE
    layer gives them: groups of about T / 8, a few tiles' rows apart."""
    if kind == "random":
        logits = np.random.default_rng(t).normal(size=(-(-t // 2), E))  # [tokens, E]
        sizes = np.bincount(np.argsort(-logits, axis=1)[:, :2].ravel(), minlength=E).astype(np.int64)
        sizes[np.argmax(sizes)] -= sizes.sum() - t  # an odd T: one token routed once
    elif kind == "balanced":
        sizes = np.full(E, t // E)
        sizes[: t % E] += 1
    else:
        sizes = np.zeros(E, np.int64)
        sizes[0] = t - t // 2
        rest = t // 2
        sizes[1:] = rest // (E - 1)
        sizes[1 : 1 + rest % (E - 1)] += 1
    assert sizes.sum() == t
    return sizes.astype(np.int32)


def quantize(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """e4m3 values and the float32 scale that restores them, per slice along `axis`."""
    scale = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axis) / FP8_MAX
    scale = jnp.where(scale > 0, scale, 1.0)
    return (x / jnp.expand_dims(scale, axis).astype(x.dtype)).astype(FP8), scale


def rel_err(out: jax.Array, want: jax.Array) -> float:
    out, want = np.asarray(out.astype(jnp.float32)), np.asarray(want.astype(jnp.float32))
    if not np.isfinite(out).all():
        return float("inf")
    return float(np.linalg.norm(out - want) / max(np.linalg.norm(want), 1e-30))


class Bench:
    def __init__(self, iters: int, name: str, out_dir: str | None, run: str):
        self.iters = iters
        self.name, self.out_dir, self.run = name, out_dir, run
        self.rows: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.read_tbs = common.read_tbs()  # the memory ceiling every row is set against

    def add(self, row: dict[str, Any]) -> None:
        """Keeps a measured row, with the read ceiling and its weight bytes' share of it, and appends it
        to the results file at once (a cut-short run keeps it)."""
        row = dict(row, run=self.run, read_tbs=self.read_tbs)
        if "weight_tbps" in row:
            row["of_read_bw"] = row["weight_tbps"] / self.read_tbs
        self.rows.append(row)
        common.write_results(self.name, [row], self.out_dir)
        keys = ("shape", "t", "routing", "impl", "dtype", "config", "ms", "tflops", "tile_efficiency", "tile_tflops",
                "weight_tbps", "of_read_bw", "rel_err")
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        print("  ".join(f"{k}={fmt(row[k])}" for k in keys if k in row), flush=True)

    def time(self, fn: Callable, *args) -> float | None:
        try:
            return common.time_fn(fn, *args, warmup=2, iters=self.iters, sync_each=False)
        except Exception as e:  # a peer or variant that cannot run here is recorded, not fatal
            self.failures.append(f"{getattr(fn, '__name__', fn)}: {type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc(limit=2)
            return None

    def check(self, name: str, fn: Callable, args: tuple, want: jax.Array) -> float | None:
        try:
            err = rel_err(fn(*args), want)
        except Exception as e:
            self.failures.append(f"{name}: {type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc(limit=2)
            return None
        if not err <= MAX_REL_ERR:
            self.failures.append(f"{name}: relative error {err:.3g} > {MAX_REL_ERR}")
        return err

    def traced(self, tag: str, case: "DecodeCase", check: Callable[[], jax.Array], want: jax.Array,
               calls: list[Callable[[], Any]], copy_bw: float, **row: Any) -> None:
        """Checks one variant of a decode-size problem against `want`, times `calls` from a profiler
        trace, and adds its row: the live experts' weight bytes over that time."""
        err = self.check(tag, check, (), want)
        if err is None:
            return
        try:
            sec = profile.traced_seconds(calls)
        except Exception as ex:  # a variant that does not compile or run is recorded, not fatal
            self.failures.append(f"{tag}: {type(ex).__name__}: {str(ex)[:200]}")
            return
        self.add(dict(shape=case.name, k=case.k, n=case.n, e=case.e, t=case.t, routing=str(case.sizes), **row,
                      timing="profiler", weight_sets=case.copies, ms=sec * 1e3,
                      tflops=2.0 * case.t * case.k * case.n / sec / 1e12, weight_tbps=case.wbytes / sec / 1e12,
                      pct_copy=100 * case.wbytes / sec / copy_bw, rel_err=err, copy_tbps=copy_bw / 1e12))


def problem_inputs(k: int, n: int, t: int, key) -> dict[str, jax.Array]:
    ks = jax.random.split(key, 2)
    x = jax.random.normal(ks[0], (t, k), jnp.bfloat16)  # [T, K]
    w = (jax.random.normal(ks[1], (E, n, k), jnp.bfloat16) * 0.05).astype(jnp.bfloat16)  # [E, N, K]
    x8, xs = quantize(x, axis=1)  # [T, K], [T]
    w8, ws = quantize(w, axis=2)  # [E, N, K], [E, N]
    return dict(x=x, w=w, x8=x8, xs=xs, w8=w8, ws=ws)


def ours(implementation: str | None, swiglu: bool = False, config: Config | None = None):
    fn = grouped_matmul_swiglu if swiglu else grouped_matmul
    return jax.jit(functools.partial(fn, transpose_rhs=True, implementation=implementation, config=config))


def peers(k: int, n: int, t: int) -> dict[str, Callable]:
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((1,), (2,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0]
    )
    xla = jax.jit(lambda x, w, g: jax.lax.ragged_dot_general(x, w, g, dims, preferred_element_type=jnp.bfloat16))
    mgpu = {
        "bf16": dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1),
        "fp8": dict(block_m=128, block_n=128, block_k=128, max_concurrent_steps=4, grid_block_n=1),
    }
    out = {"xla_ragged_dot": xla}
    if t >= 1024:
        for tag, kw in mgpu.items():
            out[f"jax_ragged_dot_mgpu_{tag}"] = jax.jit(
                lambda x, w, g, kw=kw: ragged_dot_mgpu.ragged_dot(x, w, group_sizes=g, transpose_rhs=True, **kw)
            )
    return out


def run_grid(b: Bench, rows_list, shapes, copy_bw: float, swiglu_rows, routings=ROUTINGS) -> None:
    key = jax.random.key(0)
    for shape_name, (k, n) in shapes.items():
        for t in rows_list:
            key, sub = jax.random.split(key)
            inp = problem_inputs(k, n, t, sub)
            x, w, x8, xs, w8, ws = (inp[s] for s in ("x", "w", "x8", "xs", "w8", "ws"))
            variants = {  # name: (args, reference args)
                "bf16": ((x, w), dict()),
                "w8a16": ((x, w8), dict(rhs_scale=ws)),
                "fp8": ((x8, w8), dict(lhs_scale=xs, rhs_scale=ws)),
            }
            impls = [None] + (["pallas_mosaic", "pallas_triton"] if t <= 1024 else [])
            peer_fns = peers(k, n, t)
            ref = jax.jit(functools.partial(reference.grouped_matmul_f32, transpose_rhs=True))
            dense_bf16 = jax.jit(lambda a, bt: jnp.dot(a, bt.T, preferred_element_type=jnp.bfloat16))
            dense_fp8 = jax.jit(lambda a, bt: jax.lax.dot_general(
                a, bt, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16))
            for kind in routings:
                sizes = routing(kind, t)
                g = jnp.asarray(sizes)
                active = int((sizes > 0).sum())
                flops = 2.0 * t * k * n
                base = dict(study="grid", shape=shape_name, k=k, n=n, e=E, t=t, routing=kind,
                            group_sizes=sizes.tolist(), copy_tbps=copy_bw / 1e12)

                def record(impl: str, dtype: str, sec: float | None, itemsize: int, **extra):
                    if sec is None:
                        return
                    wbytes = active * n * k * itemsize
                    if "tile_efficiency" in extra:  # the rate over the rows the tiles compute, padding included
                        extra["tile_tflops"] = flops / sec / 1e12 / extra["tile_efficiency"]
                    b.add(dict(base, impl=impl, dtype=dtype, ms=sec * 1e3, tflops=flops / sec / 1e12,
                                       weight_tbps=wbytes / sec / 1e12,
                                       pct_copy=100 * wbytes / sec / copy_bw, **extra))

                for dtype, (args, scales) in variants.items():
                    want = ref(*args, g, **scales)
                    itemsize = args[1].dtype.itemsize
                    for impl in impls:
                        if impl == "pallas_mosaic" and dtype == "w8a16":
                            continue
                        fn = ours(impl)
                        label = "jaxfire" if impl is None else f"jaxfire_{impl}"
                        err = b.check(f"{label} {dtype} {shape_name} T={t} {kind}",
                                      lambda *a, fn=fn: fn(*a[:2], a[2], **scales), (*args, g), want)
                        if err is None:
                            continue
                        sec = b.time(lambda *a, fn=fn: fn(*a[:2], a[2], **scales), *args, g)
                        backend, cfg = api._pallas_backend(args[0], args[1], True, False, jnp.bfloat16, None, impl)
                        # each expert's last row tile is padded: the share of computed rows that are real
                        extra = dict(block_m=cfg.block_m, tile_efficiency=tiling.tile_efficiency(
                            sizes, t, cfg.block_m, mosaic.ROW_ALIGN if backend == "mosaic" else 1))
                        if impl is None:
                            extra["backend"] = backend
                        record(label, dtype, sec, itemsize, rel_err=err, **extra)
                # Peers: XLA's ragged dot in bf16 and e4m3, JAX's Mosaic GPU ragged dot.
                record("xla_ragged_dot", "bf16", b.time(peer_fns["xla_ragged_dot"], x, w, g), 2)
                record("xla_ragged_dot", "fp8_noscale", b.time(peer_fns["xla_ragged_dot"], x8, w8, g), 1)
                for tag, (a, bt) in (("bf16", (x, w)), ("fp8", (x8, w8))):
                    name = f"jax_ragged_dot_mgpu_{tag}"
                    if name in peer_fns:
                        record("jax_ragged_dot_mgpu", tag + ("_e4m3_out" if tag == "fp8" else ""),
                               b.time(peer_fns[name], a, bt, g), bt.dtype.itemsize)
                if t >= 1024 and kind == "balanced":
                    # Dense matmul of equal FLOPs: one [T, K] x [K, N] product (weights of expert 0).
                    record("dense_xla", "bf16", b.time(dense_bf16, x, w[0]), 2)
                    record("dense_xla", "fp8_nt", b.time(dense_fp8, x8, w8[0]), 1)
            del inp, x, w, x8, xs, w8, ws
    # The fused expert FFN first half against the unfused pair (matmul on 2F, then XLA's silu * up).
    for t in swiglu_rows:
        k, f = SHAPES["w1_w3"]
        key, sub = jax.random.split(key)
        inp = problem_inputs(k, 2 * f, t, sub)
        g = jnp.asarray(routing("balanced", t))
        flops = 2.0 * t * k * 2 * f
        for dtype, (args, scales) in {
            "bf16": ((inp["x"], inp["w"]), {}),
            "fp8": ((inp["x8"], inp["w8"]), dict(lhs_scale=inp["xs"], rhs_scale=inp["ws"])),
        }.items():
            fused = ours(None, swiglu=True)
            plain = ours(None)
            unfused = jax.jit(lambda x, w, g, plain=plain, scales=scales: (
                lambda h: jax.nn.silu(h[:, :f]) * h[:, f:])(plain(x, w, g, **scales)))
            want = jax.jit(functools.partial(reference.grouped_matmul_swiglu, transpose_rhs=True,
                                             preferred_element_type=jnp.float32))(*args, g, **scales)
            err = b.check(f"swiglu {dtype} T={t}", lambda *a: fused(*a[:2], a[2], **scales), (*args, g), want)
            wbytes = E * 2 * f * k * args[1].dtype.itemsize
            for label, fn in (("jaxfire_swiglu", lambda *a: fused(*a[:2], a[2], **scales)),
                              ("jaxfire_unfused_swiglu", unfused)):
                sec = b.time(fn, *args, g)
                if sec is not None:
                    b.add(dict(study="swiglu", shape="w1_w3_fused", k=k, n=2 * f, e=E, t=t,
                                       routing="balanced", impl=label, dtype=dtype, ms=sec * 1e3,
                                       tflops=flops / sec / 1e12, weight_tbps=wbytes / sec / 1e12,
                                       pct_copy=100 * wbytes / sec / copy_bw, rel_err=err,
                                       copy_tbps=copy_bw / 1e12))
        del inp


def run_sweep(b: Bench, copy_bw: float, impls: tuple[str, ...]) -> None:
    """Block sweeps: wgmma prefill at T=4096 and the decode kernel at T=32."""
    key = jax.random.key(1)
    for shape_name, (k, n) in SHAPES.items():
        for t, impl, dtypes, configs in (
            (4096, "pallas_mosaic", ("bf16", "fp8"), [
                Config(block_m=128, block_n=128, block_k=bk, num_stages=s, grid_tile_width=w)
                for s in (4, 3) for w in (1, 4, 8, 16) for bk in (64, 128)]),
            (4096, "pallas_triton", ("w8a16",), [
                Config(block_m=bm, block_n=bn, block_k=bk, num_stages=s, num_warps=nw)
                for bm, bn, bk, s, nw in ((64, 64, 256, 4, 4), (128, 128, 64, 3, 8), (128, 256, 64, 3, 8),
                                          (128, 128, 128, 3, 8))]),
            (32, "pallas_triton", ("bf16", "w8a16", "fp8"), [
                Config(block_m=bm, block_n=bn, block_k=bk, num_stages=s, num_warps=nw, swap_ab=sw)
                for bm, bn, bk, s, nw, sw in (
                    (32, 128, 128, 4, 8, False), (16, 128, 128, 4, 8, False), (16, 128, 128, 4, 4, True),
                    (16, 128, 256, 3, 4, True), (16, 64, 256, 4, 4, True), (16, 256, 128, 3, 8, True),
                    (16, 128, 128, 4, 8, True), (32, 128, 128, 4, 4, True))]),
        ):
            if impl not in impls:
                continue
            key, sub = jax.random.split(key)
            inp = problem_inputs(k, n, t, sub)
            g = jnp.asarray(routing("balanced", t))
            for dtype, (args, scales) in {
                "bf16": ((inp["x"], inp["w"]), {}),
                "w8a16": ((inp["x"], inp["w8"]), dict(rhs_scale=inp["ws"])),
                "fp8": ((inp["x8"], inp["w8"]), dict(lhs_scale=inp["xs"], rhs_scale=inp["ws"])),
            }.items():
                if dtype not in dtypes:
                    continue
                want = jax.jit(functools.partial(reference.grouped_matmul_f32, transpose_rhs=True))(*args, g, **scales)
                for config in configs:
                    if impl == "pallas_mosaic" and config.block_k * args[0].dtype.itemsize != 128:
                        continue
                    _sweep_point(b, copy_bw, "sweep", shape_name, impl, dtype, config, args, g, scales, want,
                                 "balanced")
            del inp


def _sweep_point(b: Bench, copy_bw: float, study: str, shape: str, impl: str, dtype: str, config: Config,
                 args: tuple[jax.Array, jax.Array], g: jax.Array, scales: dict[str, jax.Array], want: jax.Array,
                 routing_kind: str, label: str | None = None) -> None:
    """One kernel config on one problem: checked against the reference, then timed and recorded (the
    weight bytes: every expert that owns a row, read once)."""
    (t, k), n = args[0].shape, args[1].shape[1]
    fn = ours(impl, config=config)
    call = lambda *a, fn=fn: fn(*a[:2], a[2], **scales)  # noqa: E731
    err = b.check(f"{study} {impl} {dtype} {shape} {routing_kind} {label or config}", call, (*args, g), want)
    if err is None:
        return
    sec = b.time(call, *args, g)
    if sec is None:
        return
    wbytes = int(np.count_nonzero(np.asarray(g))) * n * k * args[1].dtype.itemsize
    b.add(dict(study=study, shape=shape, k=k, n=n, e=E, t=t, routing=routing_kind, impl=f"jaxfire_{impl}",
               dtype=dtype, config=(f"{label}: " if label else "") + str(config), ms=sec * 1e3,
               tflops=2.0 * t * k * n / sec / 1e12, weight_tbps=wbytes / sec / 1e12,
               pct_copy=100 * wbytes / sec / copy_bw, rel_err=err, copy_tbps=copy_bw / 1e12))


# The prefill chunks of a token-budget step (study "chunk-sweep"): FP8 x FP8 rows on the wgmma kernel
# at the sizes a step's chunk gives the experts (128 / 256 / 512 tokens at top-2) and a whole 1024-token
# prompt, under each of `--routings`, the default tiles against narrower ones (64-row tiles pad each
# expert's last tile less: `tiling.tile_efficiency`): (name, K, N, rows).
CHUNK_PROBLEMS = tuple((f"{shape}_t{t}", k, n, t) for shape, (k, n) in SHAPES.items()
                       for t in (256, 512, 1024, 2048))
CHUNK_CONFIGS = tuple(Config(block_m=bm, block_n=bn, block_k=128, num_stages=4, grid_tile_width=8)
                      for bm in (64, 128) for bn in (64, 128))


def run_chunk_sweep(b: Bench, copy_bw: float, problems: str, routings=ROUTINGS) -> None:
    """The default wgmma config and every one of `CHUNK_CONFIGS` on each of `CHUNK_PROBLEMS`."""
    wanted = set(filter(None, problems.split(",")))
    key = jax.random.key(3)
    for name, k, n, t in CHUNK_PROBLEMS:
        if wanted and name not in wanted:
            continue
        key, sub = jax.random.split(key)
        inp = problem_inputs(k, n, t, sub)
        args, scales = (inp["x8"], inp["w8"]), dict(lhs_scale=inp["xs"], rhs_scale=inp["ws"])
        for kind in routings:
            g = jnp.asarray(routing(kind, t))
            want = jax.jit(functools.partial(reference.grouped_matmul_f32, transpose_rhs=True))(*args, g, **scales)
            default = mosaic_config(t, k, n, itemsize=1, swiglu=False)
            for config, label in [(default, "default")] + [(c, None) for c in CHUNK_CONFIGS if c != default]:
                _sweep_point(b, copy_bw, "chunk-sweep", name, "pallas_mosaic", "fp8", config, args, g, scales, want,
                             kind, label)
        del inp


# The weight-only FP8 problems a decode step runs: (name, K, N, experts, group sizes, swiglu). Batch 1
# routes one token to two experts; the attention projections are one-group problems.
DECODE_PROBLEMS = (
    ("gate_up_b1", 4096, 2 * 14336, E, (1, 1) + (0,) * (E - 2), True),
    ("down_b1", 14336, 4096, E, (1, 1) + (0,) * (E - 2), False),
    ("q_b1", 4096, 4096, 1, (1,), False),
    ("kv_b1", 4096, 1024, 1, (1,), False),
    ("gate_up_b32", 4096, 2 * 14336, E, (8,) * E, True),
    ("down_b32", 14336, 4096, E, (8,) * E, False),
    ("q_b32", 4096, 4096, 1, (32,), False),
)


def decode_problem(key, k: int, n: int, e: int, sizes, swiglu: bool, copies: int = 1, rows: int | None = None):
    """Random bf16 rows [T, K] (T `rows`, past the group sizes' sum as a padded bucket; default that sum); `copies` FP8 weight sets stacked on the expert axis ([copies*E, N, K]
    values, [copies*E, N] scales); group sizes over all of them with the first set's experts live; the
    float32 reference output."""
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, (rows or sum(sizes), k), jnp.bfloat16)
    w8, ws = quantize((jax.random.normal(k2, (copies * e, n, k), jnp.bfloat16) * 0.05).astype(jnp.bfloat16), axis=2)
    g = jnp.asarray(tuple(sizes) + (0,) * ((copies - 1) * e), jnp.int32)
    ref = reference.grouped_matmul_swiglu if swiglu else reference.grouped_matmul
    return x, w8, ws, g, ref(x, w8, g, rhs_scale=ws, transpose_rhs=True, preferred_element_type=jnp.float32)


@dataclasses.dataclass
class DecodeCase:
    """One decode-size problem ready to time: `copies` weight sets stacked on the expert axis that
    together overflow the L2, and the group sizes that make each set's experts live."""

    name: str
    k: int
    n: int
    e: int
    sizes: tuple[int, ...]
    swiglu: bool
    x: jax.Array  # [T, K] bf16
    w8: jax.Array  # [copies E, N, K] e4m3
    ws: jax.Array  # [copies E, N] f32
    g: jax.Array  # [copies E] int32: the first set's experts live
    want: jax.Array  # the float32 reference for the first set
    sets: list[jax.Array]  # group sizes that make set j's experts live

    @property
    def t(self) -> int:
        return sum(self.sizes)

    @property
    def wbytes(self) -> int:
        """The live experts' weight bytes: what one call must read."""
        return sum(1 for s_ in self.sizes if s_) * self.n * self.k

    @property
    def copies(self) -> int:
        return len(self.sets)


def decode_cases(table, problems: str, seed: int):
    """The `table` problems named in `problems` (all when empty) as `DecodeCase`s, built one at a time."""
    key = jax.random.key(seed)
    for name, k, n, e, sizes, swiglu, *rows in table:
        if problems and name not in problems.split(","):
            continue
        wbytes = sum(1 for s_ in sizes if s_) * n * k
        key, sub = jax.random.split(key)
        copies = -(-L2_OVERFLOW_BYTES // wbytes)
        x, w8, ws, g, want = decode_problem(sub, k, n, e, sizes, swiglu, copies=copies, rows=rows[0] if rows else None)
        yield DecodeCase(name, k, n, e, tuple(sizes), swiglu, x, w8, ws, g, want,
                         [jnp.roll(g, j * e) for j in range(copies)])


def run_decode_sweep(b: Bench, copy_bw: float) -> None:
    """The Triton kernel's decode blocks and K split on the problems of a decode step (weight-only FP8),
    beside the heuristic default (config None)."""
    configs = [None] + [Config(block_m=16, block_n=bn, block_k=bk, num_stages=4, num_warps=8, split_k=sk)
                        for bn in (64, 128) for bk in (128, 256) for sk in (1, 2, 4, 8)]
    key = jax.random.key(2)
    for name, k, n, e, sizes, swiglu in DECODE_PROBLEMS:
        t = sum(sizes)
        key, sub = jax.random.split(key)
        x, w8, ws, g, want = decode_problem(sub, k, n, e, sizes, swiglu)
        wbytes = sum(1 for s_ in sizes if s_) * n * k
        for config in configs:
            fn = ours("pallas_triton", swiglu=swiglu, config=config)
            call = lambda x_, w_, g_, fn=fn: fn(x_, w_, g_, rhs_scale=ws)  # noqa: E731
            err = b.check(f"decode-sweep {name} {config}", call, (x, w8, g), want)
            if err is None:
                continue
            sec = b.time(call, x, w8, g)
            if sec is None:
                continue
            b.add(dict(study="decode-sweep", shape=name, k=k, n=n, e=e, t=t, routing=str(sizes), impl="jaxfire_triton",
                       dtype="w8a16", config=str(config or "default"), ms=sec * 1e3,
                       tflops=2.0 * t * k * n / sec / 1e12,
                       weight_tbps=wbytes / sec / 1e12, pct_copy=100 * wbytes / sec / copy_bw, rel_err=err,
                       copy_tbps=copy_bw / 1e12))


# Small decode steps, one and two GPUs (tensor parallelism halves the expert width F and the attention
# heads): (name, K, N, experts, group sizes, swiglu). qkv is the fused query/key/value projection.
GEMV_PROBLEMS = (
    ("gate_up_b1", 4096, 2 * 14336, E, (1, 1) + (0,) * (E - 2), True),
    ("down_b1", 14336, 4096, E, (1, 1) + (0,) * (E - 2), False),
    ("gate_up_b1_tp2", 4096, 14336, E, (1, 1) + (0,) * (E - 2), True),
    ("down_b1_tp2", 7168, 4096, E, (1, 1) + (0,) * (E - 2), False),
    ("gate_up_b2", 4096, 2 * 14336, E, (2, 1, 1) + (0,) * (E - 3), True),
    ("qkv_b1", 4096, 6144, 1, (1,), False),
    ("o_b1", 4096, 4096, 1, (1,), False),
    ("qkv_b4", 4096, 6144, 1, (4,), False),
)


L2_OVERFLOW_BYTES = 256 << 20  # several times an H100's (50 MB) or H200's L2


def run_gemv_sweep(b: Bench, copy_bw: float, iters: int, problems: str) -> None:
    """Small decode problems (weight-only FP8): the MMA kernel's heuristic config against the multiply-add
    (`Config.gemv`) kernel over blocks, warps and K splits, each config's kernels (with the XLA ops
    around them: a K split's reduction, the task table) timed from a profiler trace.

    A model's layers each read their own weights, so a step's weights must not sit in the L2: the calls
    rotate through enough weight sets to overflow it several times. The sets are stacked on the expert
    axis and each call makes another set's experts live, so one kernel (one compile) serves them all;
    the trace-time task count depends on the rows, not the experts, for steps this small. (Timed
    instead as a loop inside one program minus the loop alone, one config moved by up to 40% between
    runs on an H200: the loop's own per-step cost dwarfs a 10-80 us kernel.) The trace counts kernel
    time, not the gap before each launch, so a split config's reduction is charged its run time only:
    inside a step's CUDA graph each kernel also costs about a microsecond of gap. Narrow 16-column
    bands unsplit are in the sweep because they need no reduction at all."""
    for c in decode_cases(GEMV_PROBLEMS, problems, 3):
        rows = max(c.sizes) if c.e > 1 else c.t
        bm = 1 if rows == 1 else 2 if rows == 2 else 4
        n_out = c.n // 2 if c.swiglu else c.n
        heuristic = dict(swiglu=c.swiglu, num_groups=c.e, weight_itemsize=1)
        named = {"mma-default": triton_config(c.t, c.k, n_out, gemv=False, **heuristic)}
        if (default := triton_config(c.t, c.k, n_out, **heuristic)) != named["mma-default"]:
            named["default"] = default
        configs = list(named.items()) + [(None, cfg) for cfg in [
            Config(block_m=bm, block_n=bn, block_k=bk, num_stages=3, num_warps=4, split_k=sk, gemv=True)
            for bn, bk in ((16, 256), (32, 256), (64, 128), (64, 256), (128, 128)) for sk in (1, 2, 4, 8)] + [
            Config(block_m=bm, block_n=64, block_k=bk, num_stages=4, num_warps=8, split_k=sk, gemv=True)
            for bk, sk in ((128, 2), (256, 1), (256, 2))] if cfg not in named.values()]
        for label, config in configs:
            fn = ours("pallas_triton", swiglu=c.swiglu, config=config)
            b.traced(f"gemv-sweep {c.name} {config}", c, lambda fn=fn: fn(c.x, c.w8, c.g, rhs_scale=c.ws), c.want,
                     [functools.partial(fn, c.x, c.w8, rolled, rhs_scale=c.ws) for rolled in c.sets] * iters,
                     copy_bw, study="gemv-sweep", impl="jaxfire_triton", dtype="w8a16",
                     config=f"{label}: {config}" if label else str(config))


def _balanced(t: int) -> tuple[int, ...]:
    return tuple(int(s) for s in routing("balanced", t))


# The weight-only FP8 problems of a decode step as the model runs them: one token through its two
# experts, 8-64 rows over all experts (batches 4-32 at top-2), the attention projections (q/k/v fused)
# of one token and of 32: (name, K, N, experts, group sizes, swiglu).
DECODE_STEP_PROBLEMS = (
    ("gate_up_b1", 4096, 2 * 14336, E, (1, 1) + (0,) * (E - 2), True),
    ("down_b1", 14336, 4096, E, (1, 1) + (0,) * (E - 2), False),
    *((f"gate_up_t{t}", 4096, 2 * 14336, E, _balanced(t), True) for t in (8, 16, 32, 64)),
    *((f"down_t{t}", 14336, 4096, E, _balanced(t), False) for t in (8, 16, 32, 64)),
    ("qkv_b1", 4096, 6144, 1, (1,), False),
    ("o_b1", 4096, 4096, 1, (1,), False),
    ("qkv_b32", 4096, 6144, 1, (32,), False),
    ("o_b32", 4096, 4096, 1, (32,), False),
)


def run_decode(b: Bench, copy_bw: float, iters: int, problems: str, triton_jit: bool = False) -> None:
    """A decode step's expert and projection problems through the public entry points with their
    defaults (the kernel and config the model gets), checked against the reference, then timed from a
    profiler trace (the kernels and the XLA ops around them) over weight sets that overflow the L2, as
    `run_gemv_sweep` does: each layer of a model reads its own weights. The weight bytes of the live
    experts over that time, against the read ceiling, is how close each problem is to the memory. With
    `triton_jit`, each problem's Triton kernel also runs written in Triton itself (the same config),
    launched as XLA's Triton custom call ("triton-jit", implementation="triton") and through jax-triton
    ("jax-triton"), timed beside it."""
    for c in decode_cases(DECODE_STEP_PROBLEMS, problems, 4):
        backend, config = api._pallas_backend(c.x, c.w8, True, c.swiglu, jnp.bfloat16, None, None)
        written_in_triton = [("triton-jit", "triton"), ("jax-triton", "jax_triton")]
        impls = [("jaxfire", None)] + (written_in_triton if triton_jit and backend == "triton" else [])
        for label, implementation in impls:
            fn = ours(implementation, swiglu=c.swiglu)
            b.traced(f"decode {c.name} {label}", c, lambda fn=fn: fn(c.x, c.w8, c.g, rhs_scale=c.ws), c.want,
                     [functools.partial(fn, c.x, c.w8, rolled, rhs_scale=c.ws) for rolled in c.sets] * iters,
                     copy_bw, study="decode", impl=label, dtype="w8a16", backend=backend, config=str(config))


# The problems of a decode step run other ways (study "decode-alt"): the projections' one-group
# problems on Triton blocks whose single row task holds every row (the default cuts 32 rows into two
# tasks that each read the weight), the same problems with FP8 activations through XLA (cuBLAS, as the
# model runs 64 tokens and more), and the experts' problems with FP8 activations on the Mosaic wgmma
# kernel: (name, K, N, experts, group sizes, swiglu).
ALT_PROBLEMS = (
    *((f"qkv_t{t}", 4096, 6144, 1, (t,), False) for t in (8, 32, 64)),
    *((f"o_t{t}", 4096, 4096, 1, (t,), False) for t in (8, 32, 64)),
    *((f"gate_up_t{t}", 4096, 2 * 14336, E, _balanced(t), True) for t in (8, 32, 64)),
    *((f"down_t{t}", 14336, 4096, E, _balanced(t), False) for t in (8, 32, 64)),
)


def _alt_configs(t: int, k: int, n: int, e: int, swiglu: bool) -> list[tuple[str, str | None, Config | None, bool]]:
    """(label, implementation, config, fp8 activations) of each variant of one problem."""
    variants: list[tuple[str, str | None, Config | None, bool]] = [("default", None, None, False)]
    if e == 1:
        bm = max(16, 1 << (t - 1).bit_length())  # one row task for every row
        for bn, bk, sk, warps in ((32, 256, 1, 4), (32, 256, 2, 4), (64, 128, 1, 4), (64, 128, 2, 4),
                                  (64, 256, 1, 4), (64, 256, 2, 4), (64, 128, 4, 4), (128, 128, 1, 8),
                                  (128, 128, 2, 8), (32, 128, 1, 4), (32, 128, 2, 4), (16, 256, 1, 4)):
            variants.append((f"single-task bm{bm}", "pallas_triton",
                             Config(block_m=bm, block_n=bn, block_k=bk, num_stages=4, num_warps=warps, split_k=sk),
                             False))
        variants.append(("xla fp8 x fp8", "xla", None, True))
        variants.append(("xla w8a16 upcast", "xla", None, False))
    else:
        for bn, stages in ((64, 4), (128, 4), (64, 3)):
            bm = 128 if swiglu else 64
            variants.append(("mosaic fp8 x fp8", "pallas_mosaic",
                             Config(block_m=bm, block_n=bn, block_k=128, num_stages=stages), True))
        for bn, bk, sk, stages in ((64, 128, 1, 5), (64, 256, 1, 4), (128, 128, 1, 5), (32, 256, 1, 4)):
            variants.append(("triton", "pallas_triton",
                             Config(block_m=16, block_n=bn, block_k=bk, num_stages=stages, num_warps=4 if bn < 128 else 8,
                                    split_k=sk), False))
    return variants


def _xla_dense(fp8_acts: bool):
    """One-group problems as XLA runs them: FP8 activations (cuBLAS e4m3 x e4m3) or the weight upcast."""
    def fn(x, w8, ws):
        # x: [T, K], w8: [N, K] -> [T, N]
        if fp8_acts:
            xq, xs = quantize(x, axis=1)
            y = jnp.einsum("tk,nk->tn", xq, w8, preferred_element_type=jnp.float32)
            return (y * xs[:, None] * ws).astype(jnp.bfloat16)
        y = jnp.einsum("tk,nk->tn", x, w8.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        return (y * ws).astype(jnp.bfloat16)
    return jax.jit(fn)


# The wgmma kernel's tiles at decode sizes (study "decode-tiles", FP8 activations): 128-row swiglu tiles
# (the warpgroups split the rows) against 64-row ones (they split the columns of F, loading half the lhs
# bytes a step), pipeline depths, the down projection's column widths and depths, and the order of the
# persistent loop (bands of 8 column tiles, or task-major: each row task's tiles in turn). One token's
# gate/up (two rows, two experts) is there for the batch-1 step, and the rows of a prefill chunk's step
# (256 or 512 tokens at top-2, "r": routed as a seeded multinomial draw, not evenly) for the row count
# where 128-row tiles take over; "b": those rows in a padded bucket, as `bench/profile.py --ragged
# decode=16,chunk=256` builds a step (a 256-token chunk and 16 decode rows in a 512-token bucket: 544 of
# 1024 rows; 512 and 32: 1088 of 2048): (name, K, N, experts, group sizes, swiglu[, rows]).
def _drawn(t: int) -> tuple[int, ...]:
    return tuple(int(s) for s in np.random.default_rng(t).multinomial(t, np.full(E, 1 / E)))


TILE_PROBLEMS = (("gate_up_t2", 4096, 2 * 14336, E, (1, 1) + (0,) * (E - 2), True),
                 *(p for p in ALT_PROBLEMS if p[0].startswith(("gate_up", "down"))),
                 *((f"{name}_t{t}r", k, n, E, _drawn(t), swiglu) for t in (128, 512, 1024)
                   for name, k, n, swiglu in (("gate_up", 4096, 2 * 14336, True), ("down", 14336, 4096, False))),
                 *((f"{name}_t{t}b{rows}", k, n, E, _drawn(t), swiglu, rows) for t, rows in ((544, 1024), (1088, 2048))
                   for name, k, n, swiglu in (("gate_up", 4096, 2 * 14336, True), ("down", 14336, 4096, False))))


def _tile_configs(t: int, k: int, n: int, e: int, swiglu: bool) -> list[tuple[str, str | None, Config | None, bool]]:
    if swiglu:
        blocks = ((128, 128, 4, 8), (128, 128, 4, TASK_MAJOR), (64, 64, 5, 8), (64, 64, 5, TASK_MAJOR))
    else:  # (64 x 256 tiles took minutes to compile; 128 x 64 swiglu tiles lost everywhere, run S4)
        blocks = ((64, 128, 4, 8), (64, 128, 4, TASK_MAJOR), (128, 128, 4, 8), (128, 128, 4, TASK_MAJOR))
    default = mosaic_config(t, k, n // 2 if swiglu else n, itemsize=1, swiglu=swiglu)
    variants = [("default", None, None, False), ("mosaic default", "pallas_mosaic", default, True)]
    for bm, bn, stages, width in blocks:
        config = Config(block_m=bm, block_n=bn, block_k=128, num_stages=stages, grid_tile_width=width)
        if config != default:
            label = "mosaic task-major" if width == TASK_MAJOR else "mosaic fp8 x fp8"
            variants.append((label, "pallas_mosaic", config, True))
    return variants


def run_decode_alt(b: Bench, copy_bw: float, iters: int, problems: str, study: str = "decode-alt") -> None:
    """Every variant of `_alt_configs` (or `_tile_configs` for study "decode-tiles") on the problems of
    `ALT_PROBLEMS` (`TILE_PROBLEMS`), checked against the float32 reference and timed from a profiler
    trace over weight sets that overflow the L2 (as `run_decode`)."""
    table, variants = (TILE_PROBLEMS, _tile_configs) if study == "decode-tiles" else (ALT_PROBLEMS, _alt_configs)
    for c in decode_cases(table, problems, 5):
        x8, xs = quantize(c.x, axis=1)
        # FP8 activations are checked against the reference over the rows they quantize to
        ref = reference.grouped_matmul_swiglu if c.swiglu else reference.grouped_matmul
        want8 = ref(x8.astype(jnp.float32) * xs[:, None], c.w8, c.g, rhs_scale=c.ws, transpose_rhs=True,
                    preferred_element_type=jnp.float32)
        for label, impl, config, fp8_acts in variants(c.x.shape[0], c.k, c.n, c.e, c.swiglu):
            if impl == "xla":
                fn = _xla_dense(fp8_acts)
                check = lambda fn=fn: fn(c.x, c.w8[0], c.ws[0])  # noqa: E731
                calls = [functools.partial(fn, c.x, c.w8[j], c.ws[j]) for j in range(c.copies)] * iters
            else:
                fn = ours(impl, swiglu=c.swiglu, config=config)
                lhs = dict(lhs_scale=xs) if fp8_acts else {}
                xin = x8 if fp8_acts else c.x
                check = lambda fn=fn, xin=xin, lhs=lhs: fn(xin, c.w8, c.g, rhs_scale=c.ws, **lhs)  # noqa: E731
                calls = [functools.partial(fn, xin, c.w8, rolled, rhs_scale=c.ws, **lhs) for rolled in c.sets] * iters
            if impl is None:
                config = api._pallas_backend(c.x, c.w8, True, c.swiglu, jnp.bfloat16, None, None)[1]
            b.traced(f"{study} {c.name} {label} {config}", c, check, want8 if fp8_acts else c.want, calls,
                     copy_bw, study=study, impl=label, dtype="w8a8" if fp8_acts else "w8a16",
                     config=str(config))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", choices=("grid", "decode", "sweep", "decode-sweep", "gemv-sweep", "decode-alt",
                                       "decode-tiles", "chunk-sweep"), default="grid")
    p.add_argument("--rows", default=",".join(map(str, ROWS)), help="T values of the grid")
    p.add_argument("--shapes", default=",".join(SHAPES), help="expert shapes of the grid")
    p.add_argument("--routings", type=lambda s: tuple(s.split(",")), default=ROUTINGS,
                   help=f"grid and chunk-sweep: rows per expert, of {','.join(ROUTINGS)} (see `routing`)")
    p.add_argument("--swiglu-rows", default="32,4096")
    p.add_argument("--sweep-impls", default="pallas_mosaic,pallas_triton", help="kernels the sweep tunes")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--triton-jit", action="store_true",
                   help="decode: also time each Triton kernel written in Triton itself, on both launchers "
                        "(implementation='triton', 'jax_triton')")
    p.add_argument("--problems", default="",
                   help="decode, gemv-sweep, decode-alt, decode-tiles, chunk-sweep: problem names to run (all when empty)")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    known = {"decode": DECODE_STEP_PROBLEMS, "gemv-sweep": GEMV_PROBLEMS, "decode-alt": ALT_PROBLEMS,
             "decode-tiles": TILE_PROBLEMS, "chunk-sweep": CHUNK_PROBLEMS}.get(args.study, ())
    unknown = set(filter(None, args.problems.split(","))) - {prob[0] for prob in known}
    if unknown:
        p.error(f"--problems: {', '.join(sorted(unknown))} not among the {args.study} study's problems "
                f"({', '.join(prob[0] for prob in known) or 'it takes none'})")
    if not args.routings or set(args.routings) - set(ROUTINGS):
        p.error(f"--routings takes names of {', '.join(ROUTINGS)}, got {','.join(args.routings)!r}")

    name = "grouped_matmul"
    # Rows of one invocation share a run id, so each figure can be read beside its peers and ceiling.
    run = f"{args.study}-{common.device_info()['date']}"
    b = Bench(args.iters, name, args.out_dir, run)
    copy_bw = common.copy_bandwidth()
    print(f"{common.device_info()}\nread bandwidth {b.read_tbs:.2f} TB/s, copy bandwidth (read + write): "
          f"{copy_bw / 1e12:.2f} TB/s", flush=True)
    if args.study == "decode":
        run_decode(b, copy_bw, args.iters, args.problems, args.triton_jit)
    elif args.study == "sweep":
        run_sweep(b, copy_bw, tuple(args.sweep_impls.split(",")))
    elif args.study == "decode-sweep":
        run_decode_sweep(b, copy_bw)
    elif args.study == "gemv-sweep":
        run_gemv_sweep(b, copy_bw, args.iters, args.problems)
    elif args.study in ("decode-alt", "decode-tiles"):
        run_decode_alt(b, copy_bw, args.iters, args.problems, args.study)
    elif args.study == "chunk-sweep":
        run_chunk_sweep(b, copy_bw, args.problems, args.routings)
    else:
        rows = [int(v) for v in args.rows.split(",") if v]
        shapes = {s: SHAPES[s] for s in args.shapes.split(",") if s}
        swiglu_rows = [int(v) for v in args.swiglu_rows.split(",") if v]
        run_grid(b, rows, shapes, copy_bw, swiglu_rows, args.routings)
    path = common.RESULTS_DIR if args.out_dir is None else args.out_dir
    cols = ["study", "shape", "t", "routing", "impl", "dtype", "config", "backend", "ms", "tflops", "tile_efficiency",
            "tile_tflops", "weight_tbps", "of_read_bw", "pct_copy", "rel_err"]
    common.print_table(b.rows, [c for c in cols if any(c in r for r in b.rows)])
    print(f"wrote {len(b.rows)} rows to {path}/{name}.jsonl")
    if b.failures:
        print(f"{len(b.failures)} FAILURES:")
        for f in b.failures:
            print("  " + f)
    return b.rows


if __name__ == "__main__":
    main()
