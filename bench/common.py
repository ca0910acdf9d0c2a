"""Shared benchmark plumbing: timing on the device, the memory ceilings, and JSON-lines results.

Every benchmark in bench/ times with `time_fn`, measures the ceiling it compares against in the same
run, and appends one JSON object per measured configuration to a file under bench/results/ through
`write_results`, which stamps the device, jax version and date.

Two memory ceilings: `read_tbs`, a streaming read of several GiB (what a decode step does: it reads
weights and cache and writes little), and `copy_bandwidth`, a read-plus-write copy, which on an H200
gives 2.96-3.35 TB/s where the read gives 4.6 and so overstates how close a read-bound step is.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def device_info() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "device": getattr(dev, "device_kind", str(dev)),
        "platform": dev.platform,
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),  # compiler switches change the figures
    }


def time_fn(
    fn: Callable[..., Any],
    *args,
    warmup: int = 3,
    iters: int = 20,
    arg_sets=None,
    sync_each: bool = True,
) -> float:
    """Median wall time in seconds of `fn(*args)` with the device synchronised around each call.

    `arg_sets`, a list of argument tuples, rotates inputs between calls so that repeated calls do not
    measure a warm L2 cache; `args` is used when it is None. With `sync_each=False` the calls are
    queued back to back and the mean is returned: host dispatch then overlaps device work, which is
    what a jitted step sees, and microsecond kernels are not buried under a host round trip.
    """
    sets = arg_sets or [args]
    for i in range(warmup):
        jax.block_until_ready(fn(*sets[i % len(sets)]))
    if not sync_each:
        t0 = time.perf_counter()
        outs = [fn(*sets[i % len(sets)]) for i in range(iters)]
        jax.block_until_ready(outs)
        return (time.perf_counter() - t0) / iters
    times = []
    for i in range(iters):
        a = sets[i % len(sets)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*a))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(nbytes: int | None = None) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written: 1 GiB on a
    GPU; off a GPU (the CPU test runs, where 1 GiB of random numbers takes minutes) 16 MiB, the figure
    only there to fill the column."""
    if nbytes is None:
        nbytes = 1 << 30 if jax.devices()[0].platform == "gpu" else 16 << 20
    n = nbytes // 4
    xs = [jax.random.normal(jax.random.key(i), (n,), jnp.float32) for i in range(2)]
    copy = jax.jit(lambda x: x * 1.0001)
    t = time_fn(copy, arg_sets=[(x,) for x in xs], warmup=3, iters=20)
    return 2 * n * 4 / t


# A sum over 8 GiB of bf16 reads 4.60-4.62 TB/s on an H200, over 2 GiB 4.44-4.49: smaller reads do
# not reach the card's rate. Off a GPU (the CPU test runs) the figure only fills the column.
READ_BYTES = {"gpu": 8 << 30, "other": 64 << 20}


def median_seconds(call: Callable[[], Any], iters: int) -> float:
    """Median wall time of `call()` (which returns logits to wait on) over `iters` runs after two warm-up
    runs; the last logits must be finite."""
    times = []
    for i in range(iters + 2):
        t0 = time.perf_counter()
        logits = jax.block_until_ready(call())
        if i >= 2:
            times.append(time.perf_counter() - t0)
    assert bool(jnp.all(jnp.isfinite(logits))), "non-finite logits"
    return float(np.median(times))


@functools.cache
def read_tbs(nbytes: int | None = None) -> float:
    """The device's streaming read bandwidth in TB/s: `jnp.sum` over `nbytes` of bf16 (READ_BYTES by
    platform, at most a quarter of the device's memory), the mean of 10 calls queued back to back.

    Measured once per process and remembered, so every benchmark of a run can call it; the buffer is
    freed before it returns.
    """
    if nbytes is None:
        dev = jax.devices()[0]
        nbytes = READ_BYTES["gpu" if dev.platform == "gpu" else "other"]
        limit = (dev.memory_stats() or {}).get("bytes_limit") if dev.platform == "gpu" else None
        if limit:
            nbytes = min(nbytes, limit // 4)
    shape = (max(nbytes // 2 // 4096, 1), 4096)  # 2D: an int32 index of 8 GiB of bf16 would overflow
    # Filled on the device by a cheap integer pattern (random numbers take seconds on a CPU); the sum
    # is a separate program, so the buffer is read from memory, never fused with its making.
    fill = jax.jit(lambda s: ((jax.lax.broadcasted_iota(jnp.int32, shape, 0) * 7
                               + jax.lax.broadcasted_iota(jnp.int32, shape, 1)) % 251).astype(jnp.bfloat16) * s)
    x = fill(jnp.bfloat16(0.01))  # [R, 4096]
    total = jax.jit(lambda v: jnp.sum(v, dtype=jnp.float32))
    # Queued back to back: a host round trip after each ~2 ms sum would read 10% low.
    sec = time_fn(total, x, warmup=2, iters=10, sync_each=False)
    del x
    return shape[0] * shape[1] * 2 / sec / 1e12


def parse_mesh(text: str | None):
    """A `--mesh` argument ("expert=2" or "expert=2,tensor=2") as a device mesh; None when empty."""
    if not text:
        return None
    from jaxfire.sharding import MeshError, mesh_from_spec

    try:
        return mesh_from_spec(text)
    except MeshError as e:
        raise SystemExit(f"--mesh: {e}") from None


def write_results(name: str, rows: list[dict[str, Any]], out_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Appends rows, each stamped with device_info(), to <out_dir or bench/results>/<name>.jsonl."""
    out = pathlib.Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.jsonl"
    info = device_info()
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps({**info, **row}, default=float) + "\n")
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)
