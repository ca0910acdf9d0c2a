"""Prefill at Mixtral geometry with random weights: one-shot (`model.prefill`), chunked and packed
(`model.ragged_step` over the paged cache), bf16 and FP8, in TFLOP/s of useful work beside dense bf16
and FP8 matmul ceilings measured in the same run.

    PYTHONPATH=. python bench/prefill.py [--preset mixtral-8x7b] [--layers 8] [--out-dir DIR]
    PYTHONPATH=. python bench/prefill.py --preset tiny --layers 2 --tokens 64 --chunks 16,24 --packed 4x16  # CPU

Jobs, per variant (bench/decode.py's VARIANTS):
- "oneshot": a `--tokens` prompt in one `model.prefill(fresh=True)` call (the contiguous engine's path);
- "chunked": the same prompt in calls of C rows (`--chunks`; the last call padded), each appending to
  the prompt's pages and attending over the chunks before it; the time is all the calls';
- "packed": N prompts of L tokens (`--packed NxL`) in one call of N L rows.
"vs_oneshot" is a job's time over the one-shot prefill's (the goal: at most 1.15). Useful FLOPs: the
projections and the k experts of every token, causal attention within each prompt, the LM head once
per prompt. The ceilings are [2 T, D] x [D, F] matmuls (T the prompt's tokens: the expert rows of a
one-shot prefill) through XLA, bf16 and e4m3 x e4m3. Layers beyond `--layers` are not built; times
are also scaled to the whole model ("model_ms"). Before a variant is timed, one layer of it is
checked on the device: chunked and packed logits against the one-shot prefill's.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bench.decode import VARIANTS, warm_up_clocks  # noqa: E402
from jaxfire import model as M  # noqa: E402
from jaxfire import paged_cache as pc  # noqa: E402
from jaxfire.config import Config  # noqa: E402
from jaxfire.kv_cache import init_cache  # noqa: E402
from jaxfire.params import fuse_qkv, init_params  # noqa: E402


def useful_flops(c: Config, layers: int, prompts: list[int]) -> float:
    d, f, k = c.hidden_size, c.intermediate_size, c.num_experts_per_tok
    tokens = sum(prompts)
    proj = 2 * tokens * (2 * c.num_heads + 2 * c.num_kv_heads) * c.head_dim * d
    experts = 2 * tokens * k * 3 * d * f
    attn = sum(2 * 2 * n * n / 2 * c.num_heads * c.head_dim for n in prompts)  # causal half of QK^T and PV
    return layers * (proj + experts + attn) + 2 * len(prompts) * c.vocab_size * d


def matmul_ceilings(rows: int, c: Config) -> dict[str, float]:
    """TFLOP/s of a dense [rows, D] x [D, F] matmul through XLA, bf16 and e4m3 x e4m3 (weights [F, D])."""
    d, f = c.hidden_size, c.intermediate_size
    out = {}
    for name, dtype in (("bf16", jnp.bfloat16), ("fp8", jnp.float8_e4m3fn)):
        sets = [(jax.random.normal(jax.random.key(2 * i), (rows, d), jnp.bfloat16).astype(dtype),
                 jax.random.normal(jax.random.key(2 * i + 1), (f, d), jnp.bfloat16).astype(dtype)) for i in range(4)]
        mm = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                                      preferred_element_type=jnp.bfloat16))
        # Queued back to back: a host round trip after each 0.3 ms product would halve the rate.
        sec = common.time_fn(mm, arg_sets=sets, warmup=3, iters=20, sync_each=False)
        out[name] = 2 * rows * d * f / sec / 1e12
    return out


class Pages:
    """Sequences laid out in a paged cache: sequence i, of prompts[i] positions, in page-table row i
    holding the pages those positions need, all pages in a shuffled order. The table has `rows` rows
    of `width` entries (default: one row per sequence, as wide as the longest needs; the engine's is
    [slots, ceil(max_len / Z)]), entries past a sequence's pages 0, the null page."""

    def __init__(self, prompts: list[int], page_size: int, seed: int = 0, rows: int | None = None,
                 width: int | None = None):
        held = [-(-n // page_size) for n in prompts]
        self.num_pages = 1 + sum(held)
        ids = 1 + np.random.default_rng(seed).permutation(sum(held))
        self.table = np.zeros((rows or len(prompts), width or max(held)), np.int32)  # [S, M]
        for row, (first, n) in enumerate(zip(np.cumsum([0] + held), held)):
            self.table[row, :n] = ids[first:first + n]
        self.prompts = prompts

    def batch(self, rows: int, parts: list[tuple[int, int, int]], tokens: np.ndarray) -> pc.RaggedBatch:
        """parts: (page-table row, first position, count) in row order; tokens [S, max prompt]."""
        t = np.zeros(rows, np.int32)
        pos = np.zeros(rows, np.int32)
        seq = np.full(rows, -1, np.int32)
        lens = np.zeros(len(self.table), np.int32)
        logit_rows = np.zeros(len(self.table), np.int32)
        at = 0
        for row, start, n in parts:
            t[at:at + n], pos[at:at + n], seq[at:at + n] = tokens[row, start:start + n], np.arange(start, start + n), row
            lens[row], logit_rows[row] = start + n, at + n - 1
            at += n
        return pc.RaggedBatch(*(jnp.asarray(a) for a in (t, pos, seq, self.table, lens, logit_rows)))


def chunked_batches(tokens_n: int, chunk: int, page_size: int, tokens: np.ndarray):
    pages = Pages([tokens_n], page_size)
    return pages, [pages.batch(chunk, [(0, s, min(chunk, tokens_n - s))], tokens) for s in range(0, tokens_n, chunk)]


def packed_batch(n: int, length: int, page_size: int, tokens: np.ndarray):
    pages = Pages([length] * n, page_size)
    return pages, [pages.batch(n * length, [(i, 0, length) for i in range(n)], tokens)]


def ragged_runner(params, c, runtime, kv, pages: Pages, batches: list[pc.RaggedBatch], page_size: int):
    """A call that runs the batches in turn over one paged cache (donated and threaded through), returning
    the last call's logits."""
    state = {"cache": pc.init_paged_cache(c, pages.num_pages, page_size, kv, runtime.mesh)}

    def call():
        for b in batches:
            logits, state["cache"] = M.ragged_step(params, state["cache"], b, config=c, runtime=runtime)
        return logits

    return call


def oneshot_runner(params, c, runtime, kv, tokens: np.ndarray):
    n = tokens.shape[1]
    state = {"cache": init_cache(c, tokens.shape[0], n, kv, runtime.mesh)}
    tokens = jnp.asarray(tokens)
    counts = jnp.full((tokens.shape[0],), n, jnp.int32)

    def call():
        cache = dataclasses.replace(state["cache"], lengths=jnp.zeros_like(state["cache"].lengths))
        logits, state["cache"] = M.prefill(params, cache, tokens, counts, c, runtime=runtime, fresh=True)
        return logits

    return call


def check(params, c: Config, runtime, kv, tokens_n: int, page_size: int) -> float:
    """Relative error of one layer's chunked (two chunks) and packed (the prompt beside another) logits
    against its one-shot prefill's, on the device, before anything is timed."""
    c = c.replace(num_layers=1)
    params = dataclasses.replace(params, layers=params.layers[:1])
    tokens = np.random.default_rng(4).integers(0, c.vocab_size, (2, tokens_n)).astype(np.int32)
    want = oneshot_runner(params, c, runtime, kv, tokens[:1])()[0]
    pages, batches = chunked_batches(tokens_n, tokens_n // 2, page_size, tokens)
    chunked = ragged_runner(params, c, runtime, kv, pages, batches, page_size)()[0]
    pages, batches = packed_batch(2, tokens_n, page_size, tokens)
    packed = ragged_runner(params, c, runtime, kv, pages, batches, page_size)()[0]
    err = max(float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) for got in (chunked, packed))
    # The one-shot prefill attends over bf16 keys (cuDNN on GPUs), the ragged step over the cache's own
    # (e4m3 for an FP8 cache); with FP8 activations each path also rounds its activations to e4m3.
    bound = 0.12 if kv == "fp8" or runtime.fp8.activations != "never" else 5e-2
    assert err < bound, f"ragged_step disagrees with prefill: relative error {err}"
    return err


def _packed(text: str) -> list[tuple[int, int]]:
    out = []
    for part in filter(None, text.split(",")):
        n, _, length = part.partition("x")
        out.append((int(n), int(length)))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mixtral-8x7b")
    ap.add_argument("--layers", type=int, default=8, help="layers built (times are also scaled to the full model)")
    ap.add_argument("--variants", default="fp8,bf16", help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--tokens", type=int, default=1024, help="the one-shot and chunked prompt's length")
    ap.add_argument("--chunks", default="256,512", help="chunk sizes (rows per call) of the chunked jobs")
    ap.add_argument("--packed", default="8x128,32x32", help="N x L: N prompts of L tokens in one call")
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    try:
        chunks = [int(x) for x in args.chunks.split(",") if x]
        packed = _packed(args.packed)
    except ValueError:
        ap.error(f"--chunks takes sizes like 256,512 and --packed sizes like 8x128, got {args.chunks!r} and "
                 f"{args.packed!r}")
    for name, n in [("--tokens", args.tokens), ("--iters", args.iters)] + [("--chunks", x) for x in chunks] + [
            ("--packed", x) for p in packed for x in p]:
        if n < 1:
            ap.error(f"{name} must be positive, got {n}")
    try:
        pc.check_page_size(args.page_size)
    except pc.PagedCacheError as e:
        ap.error(f"--page-size: {e}")
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: {unknown[0]!r} is not one of {', '.join(VARIANTS)}")

    full = Config.preset(args.preset)
    c = full.replace(num_layers=args.layers)
    scale = full.num_layers / args.layers
    ceilings = matmul_ceilings(2 * args.tokens, c)
    warm_up_clocks()
    print(f"device {jax.devices()[0].device_kind}; dense [{2 * args.tokens}, {c.hidden_size}] x "
          f"[{c.hidden_size}, {c.intermediate_size}]: bf16 {ceilings['bf16']:.0f}, fp8 {ceilings['fp8']:.0f} TFLOP/s",
          flush=True)
    rows: list[dict] = []
    rng = np.random.default_rng(3)
    for name in args.variants.split(","):
        weights, kv, runtime = VARIANTS[name]
        gc.collect()
        params = init_params(c, jax.random.key(0), jnp.bfloat16, fp8=weights == "fp8")
        if not name.endswith("-unfused"):
            params = fuse_qkv(params, c)
        err = check(params, c, runtime, kv, min(256, args.tokens), args.page_size)
        print(name, f"chunked and packed against one-shot, one layer: relative error {err:.2e}", flush=True)
        base = dict(preset=args.preset, layers_built=args.layers, layers_model=full.num_layers, variant=name,
                    weights=weights, kv_cache="fp8" if kv == "fp8" else "bf16", runtime=repr(runtime),
                    page_size=args.page_size, rel_err_vs_oneshot=err, bf16_ceiling_tflops=ceilings["bf16"],
                    fp8_ceiling_tflops=ceilings["fp8"])
        prompt = rng.integers(0, c.vocab_size, (1, args.tokens)).astype(np.int32)
        jobs = [("oneshot", None, [args.tokens], lambda: oneshot_runner(params, c, runtime, kv, prompt))]
        for chunk in chunks:
            jobs.append(("chunked", chunk, [args.tokens], lambda chunk=chunk: ragged_runner(
                params, c, runtime, kv, *chunked_batches(args.tokens, chunk, args.page_size, prompt), args.page_size)))
        for n, length in packed:
            tokens = rng.integers(0, c.vocab_size, (n, length)).astype(np.int32)
            jobs.append(("packed", f"{n}x{length}", [length] * n, lambda n=n, length=length, tokens=tokens: ragged_runner(
                params, c, runtime, kv, *packed_batch(n, length, args.page_size, tokens), args.page_size)))
        oneshot_ms = None
        for job, shape, prompts, make in jobs:
            row = dict(base, job=job, shape=shape, tokens=sum(prompts), prompts=len(prompts))
            try:
                sec = common.median_seconds(make(), args.iters)
            except Exception as e:  # recorded, so one job that fails does not lose the others
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            else:
                tflops = useful_flops(c, args.layers, prompts) / sec / 1e12
                row.update(ms=sec * 1e3, model_ms=sec * 1e3 * scale, tflops=tflops,
                           of_ceiling=tflops / ceilings["fp8" if weights == "fp8" else "bf16"])
                oneshot_ms = sec * 1e3 if job == "oneshot" else oneshot_ms
                if oneshot_ms:
                    row["vs_oneshot"] = sec * 1e3 / oneshot_ms
            rows.append(row)
            path = common.write_results("prefill", [row], args.out_dir)  # at once: a run cut short keeps it
            print(name, job, shape or "", " ".join(f"{k}={common._fmt(row.get(k))}" for k in
                                                  ("ms", "model_ms", "tflops", "vs_oneshot", "error") if k in row),
                  flush=True)
        del params, jobs
    common.print_table(rows, ["variant", "job", "shape", "tokens", "ms", "model_ms", "tflops", "of_ceiling",
                              "vs_oneshot", "error"])
    print(f"wrote {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
