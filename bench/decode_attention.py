# B batch, S cached positions, H heads (Hq query, Hkv key/value), K head dim.
"""Decode attention: achieved TB/s of KV cache read, beside the copy ceiling and JAX's own paths.

    PYTHONPATH=. python3 bench/decode_attention.py --out-dir bench/results           # the grid
    PYTHONPATH=. python3 bench/decode_attention.py --study sweep --batches 1,32 ...  # tuning
    PYTHONPATH=. python3 bench/decode_attention.py --study paged --page-sizes 16,64 ...  # paged vs contiguous

Bytes counted: K + V (+ both per-token scale arrays for an fp8 cache), each read once; every
length is S. Times are per call, from jitted groups of `--copies` calls queued back to back
(bench.common.time_fn with sync_each=False), so host dispatch is hidden the same way for every
implementation, as it is inside a jitted decode step; inputs rotate over at least 256 MB so the
50 MB L2 does not serve repeats. Each of our configurations is checked against the
reference on the GPU before it is timed.

The paged study times `pallas_kernels.paged_attention` (one decode row per sequence, the same
caches cut into pages of each `--page-sizes` size and handed out in a shuffled order, so
consecutive pages of a sequence are not adjacent in memory) beside the contiguous kernel on the
same inputs in the same run: "vs_contiguous" is the paged kernel's TB/s over the contiguous one's.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from pallas_kernels.decode_attention import DecodeAttentionConfig, decode_attention, default_config
from pallas_kernels.paged_attention import paged_attention

HQ, HKV, HEAD_DIM = 32, 8, 128
FP8_MAX = 448.0
ROTATE_BYTES = 256 << 20


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Inputs:
    q: jax.Array  # [B, Hq, K]
    k: jax.Array  # [B, S, Hkv, K]
    v: jax.Array  # [B, S, Hkv, K]
    lengths: jax.Array  # [B]
    k_scale: jax.Array | None  # [B, S, Hkv]
    v_scale: jax.Array | None  # [B, S, Hkv]

    @property
    def kv_bytes(self) -> int:
        total = self.k.nbytes + self.v.nbytes
        if self.k_scale is not None:
            total += self.k_scale.nbytes + self.v_scale.nbytes
        return total


def _quantise(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per token and head, as the fp8 KV cache stores it: [B, S, Hkv, K] -> e4m3, [B, S, Hkv]."""
    scale = jnp.max(jnp.abs(x), axis=-1).astype(jnp.float32) / FP8_MAX  # [B, S, Hkv]
    scale = jnp.where(scale > 0, scale, 1.0)
    return (x / scale[..., None].astype(x.dtype)).astype(jnp.float8_e4m3fn), scale


@jax.jit(static_argnames=("batch", "seq_len", "fp8"))
def _make(key: jax.Array, batch: int, seq_len: int, fp8: bool):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (batch, HQ, HEAD_DIM), jnp.bfloat16)
    k = jax.random.normal(kk, (batch, seq_len, HKV, HEAD_DIM), jnp.bfloat16)
    v = jax.random.normal(kv, (batch, seq_len, HKV, HEAD_DIM), jnp.bfloat16)
    lengths = jnp.full((batch,), seq_len, jnp.int32)
    if not fp8:
        return q, k, v, lengths, None, None
    k, k_scale = _quantise(k)
    v, v_scale = _quantise(v)
    return q, k, v, lengths, k_scale, v_scale


def make_input_sets(batch: int, seq_len: int, fp8: bool, seed: int = 0) -> list[Inputs]:
    itemsize = 1 if fp8 else 2
    one = 2 * batch * seq_len * HKV * HEAD_DIM * itemsize
    count = max(1, min(64, math.ceil(ROTATE_BYTES / one)))
    if one > 8 << 30:
        count = 1
    return [Inputs(*_make(jax.random.key(seed * 1000 + i), batch, seq_len, fp8)) for i in range(count)]


def device_time(fn: Callable[[Inputs], jax.Array], sets: list[Inputs], copies: int) -> float:
    """Seconds per call: groups of `copies` calls run in one jitted program.

    q is offset by the copy index so that repeated input sets do not collapse into one call.
    """

    def group(inputs: list[Inputs]) -> list[jax.Array]:
        return [
            fn(dataclasses.replace(x, q=x.q + jnp.asarray(c, x.q.dtype)))
            for c, x in enumerate(inputs)
        ]

    run = jax.jit(group)
    n_groups = max(1, math.ceil(len(sets) / copies))
    groups = [[sets[(g * copies + c) % len(sets)] for c in range(copies)] for g in range(n_groups)]
    iters = max(10, 2 * n_groups)
    t = common.time_fn(run, arg_sets=[(g,) for g in groups], warmup=2, iters=iters, sync_each=False)
    return t / copies


def _dequantised(x: Inputs) -> tuple[jax.Array, jax.Array]:
    if x.k_scale is None:
        return x.k, x.v
    k = (x.k.astype(jnp.float32) * x.k_scale[..., None]).astype(jnp.bfloat16)
    v = (x.v.astype(jnp.float32) * x.v_scale[..., None]).astype(jnp.bfloat16)
    return k, v


def _sdpa(implementation: str) -> Callable[[Inputs], jax.Array]:
    def fn(x: Inputs) -> jax.Array:
        k, v = _dequantised(x)
        out = jax.nn.dot_product_attention(x.q[:, None], k, v, implementation=implementation)
        return out[:, 0]

    return fn


def _pallas_gqa() -> Callable[[Inputs], jax.Array] | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode
        except ImportError:
            return None
    return lambda x: jax_decode.gqa(x.q, *_dequantised(x))


def peers(fp8: bool) -> dict[str, Callable[[Inputs], jax.Array]]:
    """Other ways to compute the same attention; fp8 caches are dequantised by XLA first."""
    out = {"xla": _sdpa("xla")}
    if not fp8:
        out["cudnn"] = _sdpa("cudnn")
        gqa = _pallas_gqa()
        if gqa is not None:
            out["pallas_gqa"] = gqa
    return out


def ours(config: DecodeAttentionConfig | None) -> Callable[[Inputs], jax.Array]:
    def fn(x: Inputs) -> jax.Array:
        return decode_attention(
            x.q, x.k, x.v, x.lengths, k_scale=x.k_scale, v_scale=x.v_scale,
            implementation="pallas", config=config,
        )

    return fn


def check(fn: Callable[[Inputs], jax.Array], x: Inputs, chunk_bytes: int = 2 << 30) -> float:
    """Relative L2 error against the reference, computed a few sequences at a time."""
    out = jax.jit(fn)(x).astype(jnp.float32)
    per_seq = x.kv_bytes // x.q.shape[0] * 4
    step = max(1, chunk_bytes // per_seq)
    err = 0.0
    ref_norm = 0.0
    for b in range(0, x.q.shape[0], step):
        sl = slice(b, b + step)
        part = Inputs(
            x.q[sl], x.k[sl], x.v[sl], x.lengths[sl],
            None if x.k_scale is None else x.k_scale[sl],
            None if x.v_scale is None else x.v_scale[sl],
        )
        ref = decode_attention(
            part.q, part.k, part.v, part.lengths, k_scale=part.k_scale, v_scale=part.v_scale,
            implementation="reference",
        ).astype(jnp.float32)
        err += float(jnp.sum((out[sl] - ref) ** 2))
        ref_norm += float(jnp.sum(ref**2))
    rel = math.sqrt(err / ref_norm)
    if not rel < 2e-2:
        raise AssertionError(f"decode_attention is wrong here: relative error {rel:.3g}")
    return rel


def _config_dict(c: DecodeAttentionConfig) -> dict[str, int]:
    return dataclasses.asdict(c)


def run_grid(args: argparse.Namespace, copy_bw: float, emit: Callable[[dict], None]) -> list[dict[str, Any]]:
    rows = []
    bf16_time: dict[tuple[int, int], float] = {}
    for dtype in args.dtypes:
        fp8 = dtype == "fp8"
        for batch in args.batches:
            for seq_len in args.seqs:
                sets = make_input_sets(batch, seq_len, fp8)
                nbytes = sets[0].kv_bytes
                config = default_config(batch, seq_len, HKV, HEAD_DIM, sets[0].k.dtype)
                try:
                    rel = check(ours(config), sets[0])
                    t = device_time(ours(config), sets, args.copies)
                except Exception as e:  # recorded, so one bad size does not lose the others
                    rows.append({"study": "grid", "batch": batch, "seq_len": seq_len,
                                 "cache": dtype, "config": _config_dict(config),
                                 "error": f"{type(e).__name__}: {str(e)[:300]}"})
                    emit(rows[-1])
                    continue
                row = {
                    "study": "grid", "batch": batch, "seq_len": seq_len, "q_heads": HQ,
                    "kv_heads": HKV, "head_dim": HEAD_DIM, "cache": dtype,
                    "scales": "per_token" if fp8 else None, "kv_bytes": nbytes,
                    "config": _config_dict(config), "rel_err": rel, "time_us": t * 1e6,
                    "tbps": nbytes / t / 1e12, "copy_tbps": copy_bw / 1e12,
                    "pct_copy": 100 * nbytes / t / copy_bw, "copies": args.copies,
                    "input_sets": len(sets),
                }
                if not args.no_peers:
                    for name, fn in peers(fp8).items():
                        try:
                            tp = device_time(fn, sets, args.copies)
                            row[f"{name}_tbps"] = nbytes / tp / 1e12
                        except Exception as e:  # a peer that cannot run this size is recorded as such
                            row[f"{name}_tbps"] = None
                            row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    peer_figs = [v for key, v in row.items() if key.endswith("_tbps")
                                 and key not in ("tbps", "copy_tbps") and v]
                    row["best_peer_tbps"] = max(peer_figs) if peer_figs else None
                    if row["best_peer_tbps"]:
                        row["vs_best_peer"] = row["tbps"] / row["best_peer_tbps"]
                if fp8 and (batch, seq_len) in bf16_time:
                    row["time_vs_bf16"] = t / bf16_time[(batch, seq_len)]
                if not fp8:
                    bf16_time[(batch, seq_len)] = t
                rows.append(row)
                emit(row)
                del sets
    return rows


def _sweep_configs(args: argparse.Namespace, batch: int, seq_len: int, dtype) -> list:
    base = default_config(batch, seq_len, HKV, HEAD_DIM, dtype)
    configs = [base]
    for block_s in args.block_s:
        for warps in args.warps:
            for stages in args.stages:
                splits = {max(1, min(round(base.num_splits * f), seq_len // block_s))
                          for f in args.split_factors}
                for n in sorted(splits):
                    c = DecodeAttentionConfig(block_s, n, warps, stages)
                    if c not in configs:
                        configs.append(c)
    return configs


def run_sweep(args: argparse.Namespace, copy_bw: float, emit: Callable[[dict], None]) -> list[dict[str, Any]]:
    rows = []
    for dtype in args.dtypes:
        fp8 = dtype == "fp8"
        for batch in args.batches:
            for seq_len in args.seqs:
                sets = make_input_sets(batch, seq_len, fp8)
                nbytes = sets[0].kv_bytes
                for i, config in enumerate(_sweep_configs(args, batch, seq_len, sets[0].k.dtype)):
                    row = {
                        "study": "sweep", "batch": batch, "seq_len": seq_len, "cache": dtype,
                        "config": _config_dict(config), "default": i == 0, "kv_bytes": nbytes,
                        "copy_tbps": copy_bw / 1e12,
                    }
                    try:
                        row["rel_err"] = check(ours(config), sets[0])
                        t = device_time(ours(config), sets, args.copies)
                        row.update(time_us=t * 1e6, tbps=nbytes / t / 1e12,
                                   pct_copy=100 * nbytes / t / copy_bw)
                    except Exception as e:
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    rows.append(row)
                    emit(row)
                del sets
    return rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedInputs:
    """A contiguous input set cut into pages: sequence b's page i is pool page table[b, i]."""

    q: jax.Array  # [B, Hq, K]
    k: jax.Array  # [P, Z, Hkv, K], page 0 the null page
    v: jax.Array  # [P, Z, Hkv, K]
    table: jax.Array  # [B, S / Z]
    seq_ids: jax.Array  # [B]
    positions: jax.Array  # [B]
    lengths: jax.Array  # [B]
    k_scale: jax.Array | None  # [P, Z, Hkv]
    v_scale: jax.Array | None


def to_pages(x: Inputs, page_size: int, seed: int) -> PagedInputs:
    batch, seq_len = x.k.shape[:2]
    per_seq = seq_len // page_size
    ids = 1 + np.random.default_rng(seed).permutation(batch * per_seq)  # [B S/Z]: shuffled pool pages
    where = np.argsort(ids)  # pool page p (from 1) holds the contiguous page where[p - 1]

    def pool(a):
        pages = a.reshape(batch * per_seq, page_size, *a.shape[2:])[jnp.asarray(where)]
        return jnp.concatenate([jnp.zeros_like(pages[:1]), pages])

    scales = (None, None) if x.k_scale is None else (pool(x.k_scale), pool(x.v_scale))
    return PagedInputs(x.q, pool(x.k), pool(x.v), jnp.asarray(ids.reshape(batch, per_seq), jnp.int32),
                       jnp.arange(batch, dtype=jnp.int32), x.lengths - 1, x.lengths, *scales)


def ours_paged(x: PagedInputs) -> jax.Array:
    return paged_attention(x.q, x.k, x.v, x.table, x.seq_ids, x.positions, x.lengths, k_scale=x.k_scale,
                           v_scale=x.v_scale, implementation="pallas")


def run_paged(args: argparse.Namespace, copy_bw: float, emit: Callable[[dict], None]) -> list[dict[str, Any]]:
    """Paged against contiguous decode attention at the same batch and length, on the same caches."""
    rows = []
    for dtype in args.dtypes:
        fp8 = dtype == "fp8"
        for batch in args.batches:
            for seq_len in args.seqs:
                sets = make_input_sets(batch, seq_len, fp8)
                nbytes = sets[0].kv_bytes
                config = default_config(batch, seq_len, HKV, HEAD_DIM, sets[0].k.dtype)
                base = {"study": "paged", "batch": batch, "seq_len": seq_len, "cache": dtype, "kv_bytes": nbytes,
                        "copy_tbps": copy_bw / 1e12}
                try:
                    contiguous = device_time(ours(config), sets, args.copies)
                except Exception as e:
                    emit(dict(base, page_size=None, error=f"contiguous: {type(e).__name__}: {str(e)[:300]}"))
                    continue
                want = jax.jit(ours(config))(sets[0]).astype(jnp.float32)
                for page_size in args.page_sizes:
                    row = dict(base, page_size=page_size, contiguous_us=contiguous * 1e6,
                               contiguous_tbps=nbytes / contiguous / 1e12)
                    try:
                        paged = [to_pages(x, page_size, i) for i, x in enumerate(sets)]
                        got = jax.jit(ours_paged)(paged[0]).astype(jnp.float32)
                        rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
                        if not rel < 2e-2:
                            raise AssertionError(f"paged_attention is wrong here: relative error {rel:.3g} "
                                                 "against the contiguous kernel")
                        t = _paged_time(paged, args.copies)
                        row.update(rel_err=rel, time_us=t * 1e6, tbps=nbytes / t / 1e12,
                                   pct_copy=100 * nbytes / t / copy_bw, vs_contiguous=contiguous / t)
                        del paged
                    except Exception as e:  # recorded, so one bad size does not lose the others
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    rows.append(row)
                    emit(row)
                del sets
    return rows


def _paged_time(sets: list[PagedInputs], copies: int) -> float:
    """`device_time` for paged inputs: groups of `copies` calls in one program, q offset per copy."""

    def group(inputs: list[PagedInputs]) -> list[jax.Array]:
        return [ours_paged(dataclasses.replace(x, q=x.q + jnp.asarray(c, x.q.dtype))) for c, x in enumerate(inputs)]

    n_groups = max(1, math.ceil(len(sets) / copies))
    groups = [[sets[(g * copies + c) % len(sets)] for c in range(copies)] for g in range(n_groups)]
    t = common.time_fn(jax.jit(group), arg_sets=[(g,) for g in groups], warmup=2, iters=max(10, 2 * n_groups),
                       sync_each=False)
    return t / copies


def _line(row: dict[str, Any]) -> str:
    keys = ("study", "cache", "batch", "seq_len", "page_size", "config", "time_us", "tbps", "pct_copy",
            "contiguous_tbps", "vs_contiguous", "xla_tbps", "cudnn_tbps", "pallas_gqa_tbps", "vs_best_peer",
            "time_vs_bf16", "error")
    return " ".join(f"{k}={common._fmt(row[k])}" for k in keys if k in row)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", choices=("grid", "sweep", "both", "paged"), default="grid")
    p.add_argument("--batches", type=_ints, default=[1, 8, 32, 128])
    p.add_argument("--seqs", type=_ints, default=[1024, 4096, 16384])
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["bf16", "fp8"])
    p.add_argument("--copies", type=int, default=16)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--block-s", dest="block_s", type=_ints, default=[64, 128])
    p.add_argument("--warps", type=_ints, default=[4, 8])
    p.add_argument("--stages", type=_ints, default=[2, 3, 4])
    p.add_argument("--split-factors", dest="split_factors",
                   type=lambda s: [float(x) for x in s.split(",")], default=[1.0])
    p.add_argument("--sweep-batches", type=_ints, default=None)
    p.add_argument("--sweep-seqs", type=_ints, default=None)
    p.add_argument("--page-sizes", dest="page_sizes", type=_ints, default=[16, 32, 64, 128],
                   help="the paged study's page sizes (each must divide every --seqs length)")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args()

    print(common.device_info(), flush=True)
    copy_bw = common.copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e12:.3f} TB/s (read + write)", flush=True)
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        # Written as it comes, so a run cut short keeps what it measured.
        common.write_results("decode_attention", [row], args.out_dir)
        print(_line(row), flush=True)

    if args.study in ("sweep", "both"):
        sweep_args = argparse.Namespace(**vars(args))
        sweep_args.batches = args.sweep_batches or args.batches
        sweep_args.seqs = args.sweep_seqs or args.seqs
        rows += run_sweep(sweep_args, copy_bw, emit)
    if args.study in ("grid", "both"):
        rows += run_grid(args, copy_bw, emit)
    if args.study == "paged":
        bad = [(z, n) for z in args.page_sizes for n in args.seqs if n % z]
        if bad:
            p.error(f"--page-sizes: page size {bad[0][0]} does not divide the length {bad[0][1]}")
        rows += run_paged(args, copy_bw, emit)
        common.print_table(rows, ["cache", "batch", "seq_len", "page_size", "time_us", "tbps", "contiguous_tbps",
                                  "vs_contiguous", "error"])
    print(f"wrote {len(rows)} rows to {args.out_dir or common.RESULTS_DIR}")
    grid = [r for r in rows if r["study"] == "grid"]
    if grid:
        common.print_table(grid, ["cache", "batch", "seq_len", "time_us", "tbps", "pct_copy",
                                  "xla_tbps", "cudnn_tbps", "pallas_gqa_tbps", "vs_best_peer",
                                  "time_vs_bf16"])


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
