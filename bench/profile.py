"""Where a step's time goes: a profiler trace of whole-model decode steps, of paged engine steps and of a
prompt prefill at full Mixtral geometry (random weights), each device kernel attributed to the named
scope it was traced in (attention/qkv, attention/attend, moe/route, moe/dispatch, moe/experts,
moe/combine, lm_head, ...), beside the time the device sat idle between kernels (host dispatch,
launch gaps).

    PYTHONPATH=. python bench/profile.py --layers 8 --batches 1,32  # the fp8 variant: what the engine serves
    PYTHONPATH=. python bench/profile.py --mesh expert=2 --variant fp8-wa --out-dir /tmp/prof
    PYTHONPATH=. python bench/profile.py --batches 1,8 --prefill-tokens 0 \
        --ragged decode=1 decode=8 decode=16,chunk=240  # the last: a step of the engine at its 256-token budget

Jobs: "decode", `model.decode_step` over the contiguous cache at each of `--batches`; "ragged", one
`model.ragged_step` over the paged cache as `jaxfire.PagedEngine` runs it, per `--ragged` spec
(`decode=N` rows of one token, each at position `--context` of its own sequence; `chunk=C` tokens of
one prompt from position `at=A`, default 0; `bucket=T` token rows, default the smallest power of two
holding them, the rest padding rows of seq_id -1); "prefill", `model.prefill` of `--prefill-tokens`.
A ragged step's page table has the engine's shape, `--slots` rows of ceil(`--max-len` / `--page-size`)
entries, the live sequences in the first rows holding pages in a shuffled order, the other rows
none; the cache pool holds just the live sequences' pages. A decode-only spec and `--batches` of the
same size put the two engines' steps side by side, as the third line above does. What the engine's
step adds is not traced: its pending decode tokens taken from the last samples (one gather) and
the sampling, a program of its own.

Kernels are matched to the compiled program's HLO instructions (through the profiler's `hlo_op`
annotation, or the kernel's own name for XLA's fusions), and each instruction to the innermost
`jax.named_scope` path in its metadata. Collectives (all_to_all, all-reduce, ...) form a stage of
their own, "communication". One row per measured job goes to bench/results/profile.jsonl: wall time
per step, device busy time, idle time, kernels per step and per layer, the stages and the ten
costliest kernels, and the idle gaps between kernels summed by the kernel that ended them and the one
before ("idle_before": a gap between the same two kernels every time is a launch); decode and ragged rows also carry the bytes the step must read (`bench/decode.py`'s
count: the experts its token rows can reach, the cached positions its rows read) over its wall time
("tbs") as a share of the card's read bandwidth measured in the same run ("read_tbs", "of_read_bw").

While the profiler traces, XLA runs programs without CUDA graphs (its default), so a traced step's
idle time includes launch gaps that the same step run untraced does not have: compare `wall_ms` with
bench/decode.py's figures, or pass --command-buffers to keep the graphs under the profiler (XLA's
xla_enable_command_buffers_during_profiling).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import os
import re
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import parse_mesh, print_table, read_tbs, write_results  # noqa: E402

COLLECTIVES = ("all-to-all", "all-reduce", "all-gather", "reduce-scatter", "collective-permute",
               "all-reduce-start", "all-gather-start", "collective-permute-start", "ragged-all-to-all")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\([^=]*?\)|\S+)\s+([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=\{?([^}\s,]+(?:,\s*%?[\w.\-]+)*)\}?")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_NOISE = re.compile(r"^(jit|pjit|shard_map|checkpoint|remat|jvp|transpose|vmap|cond|while|body|branch|eval_jaxpr)\b"
                    r"|^\W")


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    opcode: str
    scope: str  # the named-scope path, or "unscoped:<op name>" (e.g. a relayout of a parameter)


def parse_hlo(text: str) -> dict[str, Instruction]:
    """Every instruction of an HLO module's text by name, with the named-scope path it was traced in.

    An instruction without metadata of its own (a fusion, a custom call's wrapper) takes the scope of
    the computation it calls (its fused root first).
    """
    raw: dict[str, tuple[str, str, list[str]]] = {}
    computations: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        head = _COMPUTATION.match(line)
        if head and "=" not in line.split("{")[0]:
            current = computations.setdefault(head.group(1), [])
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, opcode = m.groups()
        op_name = _OP_NAME.search(line)
        calls = [c.strip().lstrip("%") for g in _CALLS.findall(line) for c in g.split(",")]
        raw[name] = (opcode, op_name.group(1) if op_name else "", calls)
        if current is not None:
            (current.insert(0, name) if line.lstrip().startswith("ROOT") else current.append(name))

    def scope_of(name: str, seen: frozenset = frozenset()) -> str:
        opcode, op_name, calls = raw[name]
        s = scope_path(op_name)
        if s or name in seen:
            return s
        for comp in calls:
            for inner in computations.get(comp, []):
                s = scope_of(inner, seen | {name})
                if s:
                    return s
        return ""

    def label(name: str) -> str:
        return scope_of(name) or "unscoped:" + re.split(r"[./\[]", raw[name][1] or raw[name][0])[0]

    return {name: Instruction(name, raw[name][0], label(name)) for name in raw}


def scope_path(op_name: str) -> str:
    """The named scopes of a jax op_name, without transformation wrappers and the op itself:
    "jit(decode_step)/layer_3/moe/experts/dot_general" -> "layer_3/moe/experts"."""
    parts = [p for p in op_name.split("/")[:-1] if p and not _NOISE.match(p) and "->" not in p]
    return "/".join(parts)


def stage_of(inst: Instruction | None, kernel: str) -> str:
    """The stage a kernel's time is booked to: its scope without the layer index, or "communication"."""
    low = kernel.lower()
    # All-reduce kernels XLA emits itself (not NCCL's) carry the name of the psum they implement.
    if (inst is not None and inst.opcode in COLLECTIVES) or re.search(r"nccl|all_to_all|^psum|all_reduce", low):
        return "communication"
    if inst is None:  # a kernel the trace did not tie to an instruction: named by its family
        for pattern, family in _FAMILIES:
            if re.search(pattern, low):
                return f"unattributed: {family}"
        return "unattributed"
    parts = [p for p in inst.scope.split("/") if not re.fullmatch(r"layer_\d+", p)]
    return "/".join(parts) or "other"


# Kernel-name families of kernels without an HLO match (Pallas kernels carry their pallas_call name).
_FAMILIES = ((r"grouped_matmul_swiglu", "experts gate/up (Pallas)"),
             (r"grouped_matmul", "experts down or projections (Pallas)"),
             (r"decode_attention", "decode attention (Pallas)"),
             (r"paged_attention", "paged attention (Pallas)"),
             (r"cache_append", "cache append (Pallas)"),
             (r"sdpa|flash|fmha", "prompt attention (cuDNN)"),
             (r"nvjet|gemm|cutlass|sm90_xmma", "matmul (cuBLAS)"),
             (r"memcpy|memset", "copies"))


@dataclasses.dataclass(frozen=True)
class Event:
    name: str
    start_ns: float
    duration_ns: float
    hlo_op: str | None


def device_events(xspace_path: str) -> dict[str, list[Event]]:
    """Per device plane, the kernels (and on the CPU the XLA thunks) the trace recorded."""
    from jax.profiler import ProfileData

    planes: dict[str, list[Event]] = {}
    warnings.filterwarnings("ignore", message="builtin type event_stats", category=DeprecationWarning)
    for plane in ProfileData.from_file(xspace_path).planes:
        gpu = plane.name.startswith("/device:GPU")
        if not (gpu or plane.name.startswith("/host:CPU")):
            continue
        events = []
        for line in plane.lines:
            for e in line.events:
                stats = {k: v for k, v in e.stats}
                hlo_op = stats.get("hlo_op") or _annotated_op(stats)
                if gpu or hlo_op:  # host lines also carry python and thread-pool events
                    events.append(Event(e.name, e.start_ns, e.duration_ns, hlo_op))
        if events:
            planes[plane.name] = events
    return planes


def _annotated_op(stats: dict[str, Any]) -> str | None:
    for v in stats.values():
        if isinstance(v, str) and "hlo_op=" in v:
            return v.split("hlo_op=", 1)[1].split(",")[0].split("#")[0]
    return None


def _busy_ns(events: list[Event]) -> float:
    """Time covered by at least one event (kernels on several streams may overlap)."""
    total, end = 0.0, -1.0
    for e in sorted(events, key=lambda e: e.start_ns):
        lo, hi = e.start_ns, e.start_ns + e.duration_ns
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def summarize(events: list[Event], program: dict[str, Instruction], steps: int, wall_s: float,
              top: int = 10) -> dict[str, Any]:
    """Per-step figures of one device's events: busy and idle time, time per stage, the `top` costliest
    kernels."""
    by_kernel_name = {n.replace(".", "_").replace("-", "_"): inst for n, inst in program.items()}
    stages: dict[str, float] = collections.defaultdict(float)
    kernels: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    matched = 0
    for e in events:
        inst = _instruction(e, program, by_kernel_name)
        matched += inst is not None
        stage = stage_of(inst, e.name)
        stages[stage] += e.duration_ns
        k = kernels[(e.name[:80], stage)]
        k[0] += e.duration_ns
        k[1] += 1
    per_step = lambda ns: ns / steps / 1e6  # noqa: E731 (ns over the run -> ms per step)
    wall_ms = wall_s / steps * 1e3
    busy_ms = per_step(_busy_ns(events))
    costliest = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    gaps = sorted(idle_gaps(events, program, by_kernel_name).items(), key=lambda kv: -kv[1][0])[:top]
    return dict(wall_ms=wall_ms, busy_ms=busy_ms, idle_ms=max(wall_ms - busy_ms, 0.0),
                kernels_per_step=len(events) / steps, matched_share=matched / max(len(events), 1),
                stages_ms={s: per_step(ns) for s, ns in sorted(stages.items(), key=lambda kv: -kv[1])},
                top_kernels=[dict(kernel=n, stage=s, ms=per_step(t), calls_per_step=c / steps)
                             for (n, s), (t, c) in costliest],
                idle_before=[dict(kernel=n, stage=s, after=p, ms=per_step(t), gaps_per_step=c / steps)
                             for (n, s, p), (t, c) in gaps])


def _instruction(e: Event, program: dict[str, Instruction], by_kernel_name: dict[str, Instruction]):
    """The HLO instruction a kernel ran for (None when the trace names none the program has)."""
    return program.get(e.hlo_op or "") or program.get(e.name) or by_kernel_name.get(e.name.split(".")[0])


def idle_gaps(events: list[Event], program: dict[str, Instruction],
              by_kernel_name: dict[str, Instruction]) -> dict[tuple[str, str, str], list[float]]:
    """The device's idle time between kernels, by the kernel that ended each gap and the one before it:
    (next name, next stage, previous name) -> [idle ns, gaps]. A gap that comes between the same two
    kernels every time points at a launch (host set-up, a synchronisation); idle spread thinly over
    small kernels is dispatch."""
    out: dict[tuple[str, str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    end, last = None, ""
    for e in sorted(events, key=lambda e: e.start_ns):
        if end is not None and e.start_ns > end:
            inst = _instruction(e, program, by_kernel_name)
            g = out[(e.name[:80], stage_of(inst, e.name), last[:80])]
            g[0] += e.start_ns - end
            g[1] += 1
        if end is None or e.start_ns + e.duration_ns >= end:
            end, last = e.start_ns + e.duration_ns, e.name
    return out


def _traced_planes(run: Callable[[], Any], trace_dir: str | None = None) -> tuple[Any, dict[str, list[Event]]]:
    """Runs `run()` under the profiler; its return value and each device plane's events."""
    trace_dir = trace_dir or tempfile.mkdtemp(prefix="jaxfire-trace-")
    jax.profiler.start_trace(trace_dir)
    try:
        result = run()
    finally:
        jax.profiler.stop_trace()
    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise RuntimeError(f"the profiler wrote no trace under {trace_dir}")
    path = max(paths, key=os.path.getmtime)
    planes = device_events(path)
    if not planes:
        raise RuntimeError(f"the trace {path} holds no device events")
    return result, planes


def profile(fn: Callable[[], Any], compiled_text: str, steps: int, trace_dir: str | None = None,
            top: int = 10) -> dict[str, Any]:
    """Traces `steps` calls of fn (already compiled and warm) and summarises each device's kernels."""
    jax.block_until_ready(fn())

    def run() -> float:
        t0 = time.perf_counter()
        out = None
        for _ in range(steps):
            out = fn()
        jax.block_until_ready(out)
        return time.perf_counter() - t0

    wall, planes = _traced_planes(run, trace_dir)
    program = parse_hlo(compiled_text)
    per_device = {name: summarize(ev, program, steps, wall, top) for name, ev in sorted(planes.items())}
    first = next(iter(per_device.values()))
    return dict(first, devices_traced=len(per_device),
                busy_ms_per_device=[d["busy_ms"] for d in per_device.values()])


def traced_seconds(calls: list[Callable[[], Any]]) -> float:
    """Device time per call over one traced pass of `calls` (each run once untraced first): the time
    covered by the kernels the trace recorded (on the CPU, by XLA's thunks, which nest), free of host
    dispatch and of any timing loop's own overhead."""
    jax.block_until_ready([call() for call in calls])
    _, planes = _traced_planes(lambda: [jax.block_until_ready(call()) for call in calls])
    gpu = [events for name, events in planes.items() if name.startswith("/device:GPU")]
    events = [e for plane in (gpu or list(planes.values())) for e in plane]
    return _busy_ns(events) / len(calls) / 1e9


@dataclasses.dataclass(frozen=True)
class RaggedJob:
    """One paged engine step: `decode` rows of one token, a prompt chunk of `chunk` tokens from position
    `at`, padded to `bucket` token rows."""

    decode: int = 0
    chunk: int = 0
    at: int = 0
    bucket: int = 0  # 0: the smallest power of two holding the rows, as the engine pads

    @classmethod
    def parse(cls, spec: str) -> "RaggedJob":
        """From "decode=8,chunk=256,bucket=512"; ValueError naming what does not fit."""
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            given = {k.strip(): int(v) for k, v in (part.split("=") for part in spec.split(",") if part)}
        except ValueError:
            raise ValueError(f"{spec!r} is not a list of key=integer, e.g. decode=8,chunk=256,bucket=512") from None
        unknown = sorted(given.keys() - fields)
        if unknown:
            raise ValueError(f"{spec!r}: {unknown[0]!r} is not one of {', '.join(sorted(fields))}")
        job = cls(**given)
        if min(given.values(), default=0) < 0 or job.tokens < 1:
            raise ValueError(f"{spec!r} needs at least one token row and no negative counts")
        if job.bucket and job.bucket < job.tokens:
            raise ValueError(f"{spec!r}: bucket {job.bucket} holds fewer than its {job.tokens} token rows")
        if job.at and not job.chunk:
            raise ValueError(f"{spec!r}: at= places a chunk, and there is none")
        return job

    @property
    def tokens(self) -> int:
        return self.decode + self.chunk

    @property
    def rows(self) -> int:
        """Token rows of the step, padding included."""
        return self.bucket or 1 << (self.tokens - 1).bit_length()

    @property
    def sequences(self) -> int:
        return self.decode + (self.chunk > 0)

    def __str__(self) -> str:
        chunk = [f"chunk={self.chunk}"] * (self.chunk > 0) + [f"at={self.at}"] * (self.at > 0)
        return ",".join([f"decode={self.decode}", *chunk, f"bucket={self.rows}"])


def ragged_batch(job: RaggedJob, context: int, slots: int, max_len: int, page_size: int, vocab_size: int):
    """The job's step as the paged engine lays it out (`jaxfire.engine.runner.Runner._batch`): decode
    rows first, sequence i in page-table row i, then the chunk; padding rows of seq_id -1 up to the
    bucket; a page table of `slots` rows of ceil(max_len / page_size) entries. The `Pages` (whose
    `num_pages` the pool needs) and the `RaggedBatch`."""
    from bench.prefill import Pages

    lengths = [context + 1] * job.decode + [job.at + job.chunk] * (job.chunk > 0)  # positions after the step
    pages = Pages(lengths, page_size, rows=slots, width=-(-max_len // page_size))
    tokens = np.random.default_rng(5).integers(0, vocab_size, (len(lengths), max(lengths)), dtype=np.int32)
    parts = [(row, context, 1) for row in range(job.decode)] + [(job.decode, job.at, job.chunk)] * (job.chunk > 0)
    return pages, pages.batch(job.rows, parts, tokens)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from bench import decode as D
    from jaxfire import model as M
    from jaxfire import paged_cache as pc
    from jaxfire import sharding as S
    from jaxfire.config import Config
    from jaxfire.params import fuse_qkv, init_params

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mixtral-8x7b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--variant", default="fp8", choices=sorted(D.VARIANTS),
                    help="bench/decode.py's variants; fp8 (the default FP8 policy) is what the engine serves")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prefill-tokens", type=int, default=1024, help="0 skips the prefill")
    ap.add_argument("--ragged", nargs="*", default=[], metavar="SPEC",
                    help="paged engine steps to profile, e.g. decode=1 decode=8,chunk=256,bucket=512 (keys decode, "
                         "chunk, at, bucket)")
    ap.add_argument("--slots", type=int, default=32, help="page-table rows of a ragged step (the engine's slots)")
    ap.add_argument("--max-len", type=int, default=0,
                    help="positions per slot, which size the page table (default: the engine's, the model's "
                         "positions up to 4096)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--runtime", default="", help="extra Runtime fields, e.g. prefill_attention=cudnn")
    ap.add_argument("--mesh", default="", help="mesh axis sizes, e.g. expert=2")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--top", type=int, default=10, help="how many of the costliest kernels to keep and print")
    ap.add_argument("--command-buffers", action="store_true",
                    help="keep XLA's CUDA graphs while tracing (set before the first device use)")
    args = ap.parse_args(argv)
    if args.command_buffers:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_enable_command_buffers_during_profiling=true").strip()

    c = Config.preset(args.preset).replace(num_layers=args.layers)
    max_len = args.max_len or min(c.max_position_embeddings, 4096)
    try:
        pc.check_page_size(args.page_size)
    except pc.PagedCacheError as e:
        ap.error(f"--page-size: {e}")
    try:
        ragged = [RaggedJob.parse(spec) for spec in args.ragged]
    except ValueError as e:
        ap.error(f"--ragged: {e}")
    for job in ragged:
        if job.sequences > args.slots:
            ap.error(f"--ragged {job}: {job.sequences} sequences do not fit --slots {args.slots}")
        if max(args.context + 1, job.at + job.chunk) > max_len:
            ap.error(f"--ragged {job}: a sequence of {max(args.context + 1, job.at + job.chunk)} positions "
                     f"exceeds --max-len {max_len}")
    weights, kv_dtype, runtime = D.VARIANTS[args.variant]
    wb, kvb = D.element_bytes(c, weights, kv_dtype)
    read_bw = read_tbs()  # before the weights are placed: it takes several GiB for a moment
    mesh = parse_mesh(args.mesh)
    runtime = dataclasses.replace(runtime, mesh=mesh, **dict(kv.split("=") for kv in args.runtime.split(",") if kv))
    params = fuse_qkv(init_params(c, jax.random.key(0), jnp.bfloat16, fp8=weights == "fp8",
                                  sharding_fn=S.param_sharding_fn(mesh)), c, mesh)
    base = dict(preset=args.preset, layers_built=args.layers, variant=args.variant,
                command_buffers=args.command_buffers, read_tbs=read_bw,
                runtime=repr(dataclasses.replace(runtime, mesh=None)), mesh=dict(mesh.shape) if mesh else None)
    rows = []
    devices = mesh.size if mesh is not None else 1

    def step_row(step: Callable[[], Any], text: str, nbytes: float, **desc: Any) -> dict[str, Any]:
        """A traced step's row, with the bytes it must read over its wall time against the read ceiling."""
        step()
        row = profile(step, text, args.steps, top=args.top)
        tbs = nbytes / row["wall_ms"] / 1e9
        return dict(base, **desc, **row, bytes=nbytes, tbs=tbs, of_read_bw=tbs / read_bw / devices,
                    kernels_per_layer=row["kernels_per_step"] / args.layers)

    for batch in map(int, filter(None, args.batches.split(","))):
        state = {"cache": D.random_cache(c, batch, args.context + 4 * args.steps, args.context, kv_dtype,
                                         jax.random.key(1), mesh)}
        tokens = jax.random.randint(jax.random.key(2), (batch,), 0, c.vocab_size)

        def step():
            logits, state["cache"] = M.decode_step(params, state["cache"], tokens, c, runtime=runtime)
            return logits

        text = M.decode_step.lower(params, state["cache"], tokens, c, runtime=runtime).compile().as_text()
        rows.append(step_row(step, text, D.step_bytes(c, args.layers, batch, args.context, wb, kvb),
                             job="decode", batch=batch, context=args.context))
        del state
    for job in ragged:
        pages, batch = ragged_batch(job, args.context, args.slots, max_len, args.page_size, c.vocab_size)
        pool = pc.init_paged_cache(c, pages.num_pages, args.page_size, kv_dtype, mesh)
        # Every step writes the same positions again, so the sequences keep their lengths.
        state = {"cache": D.random_values(pool, jax.random.key(1))}

        def step():
            logits, state["cache"] = M.ragged_step(params, state["cache"], batch, config=c, runtime=runtime)
            return logits

        text = M.ragged_step.lower(params, state["cache"], batch, config=c, runtime=runtime).compile().as_text()
        # The chunk reads its prompt's positions, each decode row its context (as the decode job counts).
        nbytes = D.step_bytes(c, args.layers, job.tokens, args.context, wb, kvb,
                              cached=job.decode * args.context + (job.at + job.chunk) * (job.chunk > 0))
        rows.append(step_row(step, text, nbytes, job="ragged", spec=str(job), batch=job.decode,
                             chunk_tokens=job.chunk, chunk_at=job.at, bucket=job.rows, slots=args.slots,
                             page_size=args.page_size, max_len=max_len, context=args.context,
                             pages=pages.num_pages))
        del state
    if args.prefill_tokens:
        t = args.prefill_tokens
        # bench/decode.py's prefill, its cache donated back: a cache built for every call put the host's
        # dozens of small fills between prefills, which the trace booked as idle.
        prefill, compiled_text = D.prefill_call(params, c, runtime, t, kv_dtype)
        text = compiled_text()
        rows.append(dict(base, job="prefill", batch=1, tokens=t,
                         **profile(prefill, text, max(args.steps // 2, 2), top=args.top)))
    path = write_results("profile", rows, args.out_dir)
    for r in rows:
        label = r.get("spec") or f"B={r['batch']}"
        print(f"\n{r['variant']} {r['job']} {label}: {r['wall_ms']:.3f} ms a step, device busy "
              f"{r['busy_ms']:.3f} ms, idle {r['idle_ms']:.3f} ms, {r['kernels_per_step']:.0f} kernels "
              f"({r['matched_share']:.0%} matched to HLO)")
        if "bytes" in r:
            print(f"{r['kernels_per_layer']:.1f} kernels a layer; the bytes it must read at {r['tbs']:.2f} TB/s, "
                  f"{r['of_read_bw']:.0%} of the {r['read_tbs']:.2f} TB/s read bandwidth")
        print_table([dict(stage=s, ms=ms, share=ms / r["wall_ms"]) for s, ms in r["stages_ms"].items()],
                    ["stage", "ms", "share"])
        print_table(r["top_kernels"], ["kernel", "stage", "ms", "calls_per_step"])
        print("idle before:")
        print_table(r["idle_before"], ["kernel", "stage", "after", "ms", "gaps_per_step"])
    print()
    print_table(rows, ["job", "batch", "spec", "wall_ms", "busy_ms", "idle_ms", "kernels_per_layer", "tbs",
                       "of_read_bw"])
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
