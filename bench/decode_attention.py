# B batch, S cached positions, H heads (Hq query, Hkv key/value), K head dim.
"""Decode attention: achieved TB/s of KV cache read, beside the copy ceiling and JAX's own paths.

    PYTHONPATH=. python3 bench/decode_attention.py --out-dir bench/results           # the grid
    PYTHONPATH=. python3 bench/decode_attention.py --study sweep --batches 1,32 ...  # tuning
    PYTHONPATH=. python3 bench/decode_attention.py --study paged --page-sizes 16,64 ...  # paged vs contiguous
    PYTHONPATH=. python3 bench/decode_attention.py --study paged-sweep --out-dir ...  # paged kernel configs
    PYTHONPATH=. python3 bench/decode_attention.py --study append --batches 1,32,128  # the cache append

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

The paged sweep times the paged kernel over a grid of `PagedAttentionConfig`s for each batch, cache
dtype and page size (Mixtral's heads, `--seqs` one length), beside the contiguous kernel's default on
the same caches and the read ceiling (`bench.common.read_tbs`) of the same run. Configs run in tiers
(0: the default and the kernel as first written; 1: the decode launch's main alternatives and a single
launch of 16-row tiles; 2: the rest; the second page size and the serving step one tier later), each
variant at every (batch, dtype, page size) before the next, until `--budget-s` has passed: a run cut
short keeps the most telling rows. Each config is checked against the reference output before it is
timed; one that fails to compile or to match is written with its error and skipped. With `--slots N`
each batch also runs as a serving step does: N page-table rows of which `batch` are live, the rows
padded to a bucket.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from pallas_kernels import cache_append
from pallas_kernels.cache_append import mosaic as append_mosaic
from pallas_kernels.decode_attention import DecodeAttentionConfig, decode_attention, default_config
from pallas_kernels.paged_attention import PagedAttentionConfig, paged_attention
from pallas_kernels.paged_attention import default_config as paged_default_config
from pallas_kernels.paged_attention import mosaic as paged_mosaic

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


def ours(config: DecodeAttentionConfig | None, implementation: str = "pallas") -> Callable[[Inputs], jax.Array]:
    def fn(x: Inputs) -> jax.Array:
        return decode_attention(
            x.q, x.k, x.v, x.lengths, k_scale=x.k_scale, v_scale=x.v_scale,
            implementation=implementation, config=config,
        )

    return fn


def reference(x: Inputs, chunk_bytes: int = 2 << 30) -> jax.Array:
    """The reference output [B, Hq, K] in float32, computed a few sequences at a time."""
    per_seq = x.kv_bytes // x.q.shape[0] * 4
    step = max(1, chunk_bytes // per_seq)
    parts = []
    for b in range(0, x.q.shape[0], step):
        sl = slice(b, b + step)
        scales = {} if x.k_scale is None else {"k_scale": x.k_scale[sl], "v_scale": x.v_scale[sl]}
        parts.append(decode_attention(x.q[sl], x.k[sl], x.v[sl], x.lengths[sl], **scales,
                                      implementation="reference").astype(jnp.float32))
    return jnp.concatenate(parts)


def rel_err(out: jax.Array, ref: jax.Array) -> float:
    return float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))


def check(fn: Callable[[Inputs], jax.Array], x: Inputs) -> float:
    """Relative L2 error against the reference."""
    rel = rel_err(jax.jit(fn)(x), reference(x))
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
                base = {"study": "grid", "batch": batch, "seq_len": seq_len, "cache": dtype,
                        "config": _config_dict(config)}
                first = None  # the first implementation's seconds
                for implementation in args.implementations:
                    try:
                        rel = check(ours(config, implementation), sets[0])
                        t = device_time(ours(config, implementation), sets, args.copies)
                    except Exception as e:  # recorded, so one bad size does not lose the others
                        rows.append(dict(base, impl=implementation, error=f"{type(e).__name__}: {str(e)[:300]}"))
                        emit(rows[-1])
                        continue
                    row = dict(
                        base, impl=implementation, q_heads=HQ, kv_heads=HKV, head_dim=HEAD_DIM,
                        scales="per_token" if fp8 else None, kv_bytes=nbytes, rel_err=rel, time_us=t * 1e6,
                        tbps=nbytes / t / 1e12, copy_tbps=copy_bw / 1e12, pct_copy=100 * nbytes / t / copy_bw,
                        copies=args.copies, input_sets=len(sets))
                    if first is not None:  # a later implementation: its time beside the first's, no peers
                        row[f"vs_{args.implementations[0]}"] = first / t
                    else:
                        first = t
                        if not args.no_peers:
                            _add_peers(row, peers(fp8), sets, nbytes, args.copies)
                        if fp8 and (batch, seq_len) in bf16_time:
                            row["time_vs_bf16"] = t / bf16_time[(batch, seq_len)]
                        if not fp8:
                            bf16_time[(batch, seq_len)] = t
                    rows.append(row)
                    emit(row)
                del sets
    return rows


def _add_peers(row: dict[str, Any], fns: dict[str, Callable[[Inputs], jax.Array]], sets: list[Inputs], nbytes: int,
               copies: int) -> None:
    """Each peer's TB/s on the same inputs (None, with the error, where it cannot run), the best of them,
    and the row's rate against it."""
    for name, fn in fns.items():
        try:
            row[f"{name}_tbps"] = nbytes / device_time(fn, sets, copies) / 1e12
        except Exception as e:  # a peer that cannot run this size is recorded as such
            row[f"{name}_tbps"] = None
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    peer_figs = [row[f"{name}_tbps"] for name in fns if row[f"{name}_tbps"]]
    row["best_peer_tbps"] = max(peer_figs) if peer_figs else None
    if row["best_peer_tbps"]:
        row["vs_best_peer"] = row["tbps"] / row["best_peer_tbps"]


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


def to_pages(x: Inputs, page_size: int, seed: int, slots: int = 0) -> PagedInputs:
    """With `slots`, laid out as a serving step: max(B, slots) page-table rows of which the first B are
    live (the others empty), and the rows padded to a bucket, the next power of two of at least 16."""
    batch, seq_len = x.k.shape[:2]
    per_seq = seq_len // page_size
    ids = 1 + np.random.default_rng(seed).permutation(batch * per_seq)  # [B S/Z]: shuffled pool pages
    where = np.argsort(ids)  # pool page p (from 1) holds the contiguous page where[p - 1]

    def pool(a):
        pages = a.reshape(batch * per_seq, page_size, *a.shape[2:])[jnp.asarray(where)]
        return jnp.concatenate([jnp.zeros_like(pages[:1]), pages])

    scales = (None, None) if x.k_scale is None else (pool(x.k_scale), pool(x.v_scale))
    table = np.zeros((max(batch, slots), per_seq), np.int32)
    table[:batch] = ids.reshape(batch, per_seq)
    lengths = jnp.zeros((table.shape[0],), jnp.int32).at[:batch].set(x.lengths)
    rows = max(16, 1 << (batch - 1).bit_length()) if slots else batch
    q = jnp.zeros((rows, *x.q.shape[1:]), x.q.dtype).at[:batch].set(x.q)
    seq_ids = jnp.full((rows,), -1, jnp.int32).at[:batch].set(jnp.arange(batch, dtype=jnp.int32))
    positions = jnp.zeros((rows,), jnp.int32).at[:batch].set(x.lengths - 1)
    return PagedInputs(q, pool(x.k), pool(x.v), jnp.asarray(table), seq_ids, positions, lengths, *scales)


def ours_paged(x: PagedInputs, config: PagedAttentionConfig | None = None, implementation: str = "pallas") -> jax.Array:
    return paged_attention(x.q, x.k, x.v, x.table, x.seq_ids, x.positions, x.lengths, k_scale=x.k_scale,
                           v_scale=x.v_scale, implementation=implementation, config=config)


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
                        t, rel = _paged_time(paged, args.copies, want=want, against="the contiguous kernel")
                        row.update(rel_err=rel, time_us=t * 1e6, tbps=nbytes / t / 1e12,
                                   pct_copy=100 * nbytes / t / copy_bw, vs_contiguous=contiguous / t)
                        del paged
                    except Exception as e:  # recorded, so one bad size does not lose the others
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    rows.append(row)
                    emit(row)
                del sets
    return rows


def _paged_time(sets: list[PagedInputs], copies: int, config: PagedAttentionConfig | None = None,
                iters: int | None = None, want: jax.Array | None = None,
                against: str = "the reference", implementation: str = "pallas") -> tuple[float, float | None]:
    """`device_time` for paged inputs: seconds per call, from groups of `copies` calls in one program, q
    offset per copy. With `want` ([B, Hq, K] of sets[0]), the first call of the first group (q as given)
    is checked against it before any timing: (seconds, relative error)."""

    def group(inputs: list[PagedInputs]) -> list[jax.Array]:
        return [ours_paged(dataclasses.replace(x, q=x.q + jnp.asarray(c, x.q.dtype)), config, implementation)
                for c, x in enumerate(inputs)]

    run = jax.jit(group)
    n_groups = max(1, math.ceil(len(sets) / copies))
    groups = [[sets[(g * copies + c) % len(sets)] for c in range(copies)] for g in range(n_groups)]
    rel = None
    if want is not None:
        rel = rel_err(run(groups[0])[0][:want.shape[0]], want)
        if not rel < 2e-2:
            raise AssertionError(f"paged_attention is wrong here: relative error {rel:.3g} against {against}")
    t = common.time_fn(run, arg_sets=[(g,) for g in groups], warmup=1 if want is not None else 2,
                       iters=iters or max(10, 2 * n_groups), sync_each=False)
    return t / copies, rel


def paged_sweep_configs(batch: int, rows: int, seqs: int, seq_len: int, page_size: int,
                        itemsize: int) -> list[tuple[int, str, PagedAttentionConfig]]:
    """(tier, name, config) of the paged sweep at these shapes (`rows` T, `seqs` S page-table rows): tier 0
    the default and the kernel as first written, 1 the decode launch's main alternatives (key blocks,
    stages, warps, how many splits its wave asks for, the Mosaic GPU kernel) and a single
    launch of 16-row tiles, 2 the rest."""
    base = paged_default_config(HQ // HKV, page_size, rows, seqs, seq_len // page_size, kv_heads=HKV,
                                head_dim=HEAD_DIM, itemsize=itemsize)
    # the decode launch's own choices, also where the default keeps the first kernel (few rows)
    dec = base.decode or paged_default_config(HQ // HKV, page_size, head_dim=HEAD_DIM, itemsize=itemsize).decode

    def decode(positions: int, stages: int, warps: int = 4, **kw) -> PagedAttentionConfig:
        return dataclasses.replace(base, decode=dataclasses.replace(
            dec, block_kv=positions, num_stages=stages, num_warps=warps, **kw))

    old = dataclasses.replace(base, decode=None, gather="pages")
    tile16 = max(1, 16 // (1 << (HQ // HKV - 1).bit_length()))  # block_q of a 16-row tile
    single = dataclasses.replace(old, block_q=tile16, gather="rows", pages_per_step=max(1, 128 // page_size),
                                 num_stages=3, num_warps=4)
    grid = [
        (0, "default", base),
        (0, "old", old),
        *([(0, "decode-launch", dataclasses.replace(base, decode=dec))] if base.decode is None else []),
        (1, "single-tile16", single),
        (1, "decode-kv64", decode(64, 3)),
        (1, "decode-wave2x", decode(128, 3, wave=2 * dec.wave)),
        (1, "decode-wave0.5x", decode(128, 3, wave=max(1, dec.wave // 2))),
        (1, "decode-stages4", decode(128, 4)),
        (1, "decode-warps8", decode(128, 3, 8)),
        # the decode launch on Mosaic GPU, its wave the programs that fit an SM, on 132 SMs (64 x 2 fits
        # two a multiprocessor; steps are whole 64-row tiles)
        *[(1, f"mosaic-kv{positions}-stages{stages}",
           decode(positions, stages, kernel="mosaic",
                  wave=132 * paged_mosaic.resident_programs(positions, stages, HEAD_DIM, itemsize, HKV)))
          for positions, stages in ((64, 3), (128, 2), (64, 2))],
        (2, "decode-nosplit", decode(128, 3, num_splits=1)),
        (2, "decode-wave4x", decode(128, 3, num_splits=32, wave=4 * dec.wave)),
        (2, "decode-stages2", decode(128, 2)),
        (2, "decode-kv64-stages4", decode(64, 4)),
        (2, "decode-kv64-warps8", decode(64, 3, 8)),
        (2, "decode-kv256-stages2", decode(256, 2)),
        (2, "single-tile16-kv64", dataclasses.replace(single, pages_per_step=max(1, 64 // page_size))),
        (2, "single-tile16-pages", dataclasses.replace(old, block_q=tile16)),
        (2, "old-rows", dataclasses.replace(old, gather="rows", num_stages=3)),
    ]
    seen, out = set(), []
    for tier, name, config in grid:  # at some page sizes two names are one config
        if config not in seen:
            seen.add(config)
            out.append((tier, name, config))
    return out


def run_paged_sweep(args: argparse.Namespace, copy_bw: float, emit: Callable[[dict], None]) -> list[dict[str, Any]]:
    """Paged kernel configs against the contiguous kernel and the read ceiling, by tiers, within --budget-s."""
    read = common.read_tbs()
    print(f"read ceiling {read:.3f} TB/s", flush=True)
    seq_len = args.seqs[0]
    rows: list[dict[str, Any]] = []
    work = []  # (priority, rank in its grid, order, row base, paged sets, want, config)
    for dtype in args.dtypes:
        fp8 = dtype == "fp8"
        for batch in args.batches:
            sets = make_input_sets(batch, seq_len, fp8)
            nbytes = sets[0].kv_bytes
            contiguous_config = default_config(batch, seq_len, HKV, HEAD_DIM, sets[0].k.dtype)
            base = {"study": "paged-sweep", "batch": batch, "seq_len": seq_len, "cache": dtype, "q_heads": HQ,
                    "kv_heads": HKV, "head_dim": HEAD_DIM, "kv_bytes": nbytes, "copy_tbps": copy_bw / 1e12,
                    "read_tbs": read, "copies": args.copies, "iters": args.sweep_iters,
                    "contiguous_config": _config_dict(contiguous_config)}
            try:
                contiguous = device_time(ours(contiguous_config), sets, args.copies)
                base.update(contiguous_us=contiguous * 1e6, contiguous_tbps=nbytes / contiguous / 1e12)
            except Exception as e:  # the paged configs are still timed, without the comparison
                base["contiguous_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            want = reference(sets[0])
            for z, page_size in enumerate(args.page_sizes):
                for slots in [0, args.slots] if args.slots else [0]:
                    paged = [to_pages(x, page_size, i, slots) for i, x in enumerate(sets)]
                    table_rows, step_rows = paged[0].table.shape[0], paged[0].q.shape[0]
                    if slots and table_rows == step_rows == batch:
                        continue  # the serving step of a batch this large is the batch itself
                    shape = dict(base, page_size=page_size, slots=slots or None, rows=step_rows)
                    configs = paged_sweep_configs(batch, step_rows, table_rows, seq_len, page_size, 1 if fp8 else 2)
                    for rank, (tier, name, config) in enumerate(configs):
                        if tier in args.tiers and (not args.variants or name in args.variants):
                            for implementation in args.implementations:
                                row = dict(shape, variant=name, impl=implementation, tier=tier,
                                           default=name == "default" and implementation == "pallas")
                                priority = tier + min(z, 1) + min(slots, 1)
                                work.append((priority, rank, len(work), row, paged, want, config))
            del sets
    # Within a tier, one variant at every shape before the next: a budget cut drops variants, not shapes.
    work.sort(key=lambda w: w[:3])
    start, skipped = time.perf_counter(), 0
    for *_, row, paged, want, config in work:
        if time.perf_counter() - start >= args.budget_s:
            skipped += 1
            continue
        row = dict(row, config=dataclasses.asdict(config))
        t0 = time.perf_counter()
        try:
            t, rel = _paged_time(paged, args.copies, config, iters=args.sweep_iters, want=want,
                                 implementation=row["impl"])
            nbytes = row["kv_bytes"]
            row.update(rel_err=rel, time_us=t * 1e6, tbps=nbytes / t / 1e12, of_read=nbytes / t / 1e12 / read,
                       pct_copy=100 * nbytes / t / copy_bw)
            if "contiguous_us" in row:
                row["vs_contiguous"] = row["contiguous_us"] / row["time_us"]
        except Exception as e:  # a config that does not compile or does not match is recorded and skipped
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        row["wall_s"] = time.perf_counter() - t0  # compile, check and timing
        rows.append(row)
        emit(row)
    if skipped:
        print(f"--budget-s {args.budget_s:g} s spent: {skipped} of {len(work)} configs not run", flush=True)
    return rows


def _line(row: dict[str, Any]) -> str:
    # A sweep row names its config by variant: the whole config is in the written row.
    keys = ("study", "cache", "batch", "seq_len", "page_size", "slots", "variant" if "variant" in row else "config",
            "impl", "time_us", "vs_triton", "vs_pallas", "tbps", "pct_copy", "of_read", "contiguous_tbps", "vs_contiguous", "xla_tbps", "cudnn_tbps",
            "pallas_gqa_tbps", "vs_best_peer", "time_vs_bf16", "wall_s", "error")
    return " ".join(f"{k}={common._fmt(row[k])}" for k in keys if k in row)


# name: implementation= ("triton": the Pallas Triton kernel; "triton-jit": the kernel written in Triton itself,
# launched as XLA's Triton custom call; "jax-triton": the same through jax-triton)
APPEND_IMPLEMENTATIONS = {"triton": "pallas_triton", "mosaic": "pallas_mosaic", "triton-jit": "triton",
                          "jax-triton": "jax_triton", "xla": "reference"}


def run_append(args: argparse.Namespace, copy_bw: float, emit: Callable[[dict], None]) -> list[dict[str, Any]]:
    """The cache append (one token a sequence into a contiguous cache, in place) on each backend: one
    program writes `--copies` tokens at consecutive positions, its caches donated and fed back, so a
    write costs its own bytes; each backend's caches are checked against XLA's before it is timed. Time
    per write includes the launch (the writes are a few KiB: latency, not bandwidth, is what differs)."""
    rows = []
    seq_len = args.seqs[0]
    for dtype in args.dtypes:
        cache_dtype = jnp.float8_e4m3fn if dtype == "fp8" else jnp.bfloat16
        for batch in args.batches:
            new = [jax.random.normal(k, (args.copies, batch, HKV, HEAD_DIM), jnp.bfloat16)
                   for k in jax.random.split(jax.random.key(batch), 2)]
            base = {"study": "append", "cache": dtype, "batch": batch, "seq_len": seq_len, "kv_heads": HKV,
                    "head_dim": HEAD_DIM, "copies": args.copies, "copy_tbps": copy_bw / 1e12, **common.device_info()}
            group, want = [], None
            for name, implementation in APPEND_IMPLEMENTATIONS.items():
                if name == "mosaic" and append_mosaic.unsupported_reason(cache_dtype, HKV):
                    continue
                row = dict(base, impl=name)
                group.append(row)
                try:
                    row["time_us"], got = _append_time(new, batch, seq_len, cache_dtype, implementation,
                                                       args.copies, max(10, 4 * args.sweep_iters))
                except Exception as e:  # noqa: BLE001 (a backend that fails is a row saying how)
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    continue
                want = got if want is None else want
                row["max_abs_diff"] = max(float(np.max(np.abs(g - w))) for g, w in zip(got[:2], want[:2]))
                if len(got) > 2:  # an fp8 cache's scales, relative
                    row["max_scale_rel_diff"] = max(float(np.max(np.abs(g - w) / np.maximum(np.abs(w), 1e-30)))
                                                    for g, w in zip(got[2:], want[2:]))
                # bf16 bit for bit; fp8 within one e4m3 step (32 at the top binade) and its scales within an
                # ulp or two (a division against a multiplication by 1 / 448)
                if row["max_abs_diff"] > (32 if len(got) > 2 else 0) or row.get("max_scale_rel_diff", 0) > 3e-7:
                    row["error"] = "differs from the Triton kernel's write"
            triton_us = group[0].get("time_us")
            for row in group:
                if triton_us and "time_us" in row and "error" not in row:
                    row["vs_triton"] = triton_us / row["time_us"]
                emit(row)
            rows += group
    return rows


def _append_time(new: list[jax.Array], batch: int, seq_len: int, cache_dtype, implementation: str, copies: int,
                 iters: int) -> tuple[float, list[np.ndarray]]:
    """(us per write, the first program's written positions as float32 arrays: k, v and an FP8 cache's
    scales)."""
    def writes(caches, start):
        for c in range(copies):
            at = start + c + jnp.zeros((batch,), jnp.int32)
            caches = cache_append(*caches[:2], new[0][c], new[1][c], at, implementation=implementation,
                                  **dict(zip(("k_scale", "v_scale"), caches[2:])))
        return caches

    run = jax.jit(writes, donate_argnums=0)
    shape = (batch, seq_len, HKV, HEAD_DIM)
    caches = (jnp.zeros(shape, cache_dtype), jnp.zeros(shape, cache_dtype))
    if cache_dtype == jnp.float8_e4m3fn:
        caches += (jnp.zeros(shape[:3], jnp.float32), jnp.zeros(shape[:3], jnp.float32))
    caches = run(caches, jnp.int32(0))
    got = [np.asarray(c[:, :copies].astype(jnp.float32)) for c in caches]
    start = 0
    for i in range(iters + 2):  # two warm-up programs, then the timed ones
        if i == 2:
            jax.block_until_ready(caches)
            t0 = time.perf_counter()
        start = (start + copies) % (seq_len - copies)
        caches = run(caches, jnp.int32(start))
    jax.block_until_ready(caches)
    return (time.perf_counter() - t0) / iters / copies * 1e6, got

def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", choices=("grid", "sweep", "both", "paged", "paged-sweep", "append"), default="grid")
    p.add_argument("--batches", type=_ints, default=[1, 8, 32, 128])
    p.add_argument("--seqs", type=_ints, default=None, help="lengths (default 1024,4096,16384; the paged sweep "
                                                            "takes one, 4096)")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["bf16", "fp8"])
    p.add_argument("--copies", type=int, default=16)
    p.add_argument("--implementations", type=lambda s: s.split(","), default=["pallas"],
                   help="the kernels' implementation= names the grid and the paged sweep time side by side, the "
                        "first with the peers (e.g. pallas,triton,jax_triton)")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--block-s", dest="block_s", type=_ints, default=[64, 128])
    p.add_argument("--warps", type=_ints, default=[4, 8])
    p.add_argument("--stages", type=_ints, default=[2, 3, 4])
    p.add_argument("--split-factors", dest="split_factors",
                   type=lambda s: [float(x) for x in s.split(",")], default=[1.0])
    p.add_argument("--sweep-batches", type=_ints, default=None)
    p.add_argument("--sweep-seqs", type=_ints, default=None)
    p.add_argument("--page-sizes", dest="page_sizes", type=_ints, default=None,
                   help="the paged studies' page sizes, each dividing every --seqs length (default 16,32,64,128; "
                        "the paged sweep 16,64)")
    p.add_argument("--tiers", type=_ints, default=[0, 1, 2], help="the paged sweep's config tiers")
    p.add_argument("--variants", type=lambda s: s.split(","), default=None,
                   help="the paged sweep's configs by name, within --tiers (default: all)")
    p.add_argument("--budget-s", dest="budget_s", type=float, default=150.0,
                   help="the paged sweep starts no config after this many seconds of configs")
    p.add_argument("--sweep-iters", dest="sweep_iters", type=int, default=5,
                   help="the paged sweep's timed groups of --copies calls per config")
    p.add_argument("--slots", type=int, default=0,
                   help="the paged sweep also runs each batch as a serving step of this many page-table rows")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    sweep = args.study == "paged-sweep"
    if args.seqs is None:
        args.seqs = [4096] if sweep or args.study == "append" else [1024, 4096, 16384]
    if args.page_sizes is None:
        args.page_sizes = [16, 64] if sweep else [16, 32, 64, 128]
    if sweep and len(args.seqs) != 1:
        p.error(f"--seqs: the paged sweep takes one length, got {args.seqs}")
    bad = [(z, n) for z in args.page_sizes for n in args.seqs if n % z]
    if args.study in ("paged", "paged-sweep") and bad:
        p.error(f"--page-sizes: page size {bad[0][0]} does not divide the length {bad[0][1]}")

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
        rows += run_paged(args, copy_bw, emit)
        common.print_table(rows, ["cache", "batch", "seq_len", "page_size", "time_us", "tbps", "contiguous_tbps",
                                  "vs_contiguous", "error"])
    if sweep:
        rows += run_paged_sweep(args, copy_bw, emit)
    if args.study == "append":
        rows += run_append(args, copy_bw, emit)
        common.print_table(rows, ["cache", "batch", "impl", "time_us", "vs_triton", "max_abs_diff"])
    if sweep and rows:
        common.print_table(rows, ["cache", "batch", "page_size", "slots", "variant", "impl", "time_us", "tbps", "of_read",
                                  "contiguous_tbps", "vs_contiguous", "error"])
    print(f"wrote {len(rows)} rows to {args.out_dir or common.RESULTS_DIR}")
    grid = [r for r in rows if r["study"] == "grid"]
    if grid:
        common.print_table(grid, ["cache", "batch", "seq_len", "impl", "time_us", "tbps", "pct_copy",
                                  "xla_tbps", "cudnn_tbps", "pallas_gqa_tbps", "vs_best_peer",
                                  "time_vs_bf16"])
    return rows


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
