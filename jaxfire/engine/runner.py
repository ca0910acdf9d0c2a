"""The device step runner: a `StepPlan` becomes one `RaggedBatch`, one `model.ragged_step` over the
paged cache, and one sampling program; the sampled tokens come back to the host.

`dispatch` queues a step and returns at once; `read` waits for its samples. The engine dispatches
step k+1 before it reads step k, so the host plans and emits while the device runs. A decode row whose
token is step k's sample (`Chunk.pending`) takes it from step k's samples on the device.

Dimensions: T token rows of a step (a bucket), S page-table rows (the engine's slots), M pages per
row (`ceil(max_len / Z)`), Z page size, P pages in the pool, V vocab, L bias entries per row
(`MAX_LOGIT_BIAS`).

Shapes never depend on the traffic: T is the smallest of `token_buckets` (powers of two from
`min_bucket` up to and including `max_batched_tokens`) holding the plan's tokens, the page table is
always `[S, M]`, the logits `[S, V]`. `warmup()` runs every bucket and every sampling variant once,
so serving never compiles afterwards.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from jaxfire import model as M
from jaxfire import paged_cache as PC
from jaxfire import sharding as S
from jaxfire.engine import sampler
from jaxfire.engine.requests import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, NEUTRAL_PENALTIES, zero_bias
from jaxfire.engine.scheduler import StepPlan

if TYPE_CHECKING:
    from jaxfire.api import Model


def token_buckets(max_batched_tokens: int, min_bucket: int = 1) -> tuple[int, ...]:
    """A step's token rows are padded up to one of these: powers of two from `min_bucket`, then the budget."""
    buckets, b = [], min(min_bucket, max_batched_tokens)
    while b < max_batched_tokens:
        buckets.append(b)
        b *= 2
    return tuple(buckets) + (max_batched_tokens,)


@dataclasses.dataclass
class Sampled:
    """What a step sampled, per page-table row that asked (`rows`), on the host."""

    rows: list[int]
    tokens: np.ndarray  # [S] int32
    logprobs: np.ndarray  # [S] float32
    top_ids: np.ndarray | None  # [S, MAX_TOP_LOGPROBS] int32
    top_logprobs: np.ndarray | None  # [S, MAX_TOP_LOGPROBS] float32


@dataclasses.dataclass
class InFlight:
    """A dispatched step: the page-table rows it samples and its sampling output, still on the device."""

    rows: list[int]
    out: jax.Array  # [2 + 2 top, S] int32, see `sampler.with_logprobs`


@functools.partial(jax.jit, static_argnames=("sample", "top"))
def _sample_rows(logits: jax.Array, seeds: jax.Array, steps: jax.Array, temperature: jax.Array, top_p: jax.Array,
                 top_k: jax.Array, sample: bool, top: int) -> tuple[jax.Array, jax.Array]:
    # logits: [S, V] float32, the rest [S] -> [2 + 2 top, S], and the tokens [S]
    tokens = sampler.sample(logits, seeds, steps, temperature, top_p, top_k, sample)
    return sampler.with_logprobs(logits, tokens, top), tokens


def _step_fn(params, cache: PC.PagedKVCache, batch: PC.RaggedBatch, last: jax.Array, from_last: jax.Array,
             config, runtime) -> tuple[jax.Array, PC.PagedKVCache]:
    """`model.ragged_step` whose rows marked `from_last` take their sequence's token from `last`, the
    previous step's samples by page-table row."""
    # last: [S] int32, from_last: [T] bool -> logits [S, V] float32
    tokens = jnp.where(from_last, last[jnp.maximum(batch.seq_ids, 0)], batch.tokens)  # [T]
    return M.ragged_step_fn(params, cache, dataclasses.replace(batch, tokens=tokens), config, runtime)


_step = jax.jit(_step_fn, static_argnames=("config", "runtime"), donate_argnames=("cache",),
                compiler_options=S.COMPILER_OPTIONS)


class Runner:
    """Holds the paged cache and runs plans on it."""

    def __init__(self, model: "Model", rows: int, max_len: int, page_size: int, num_pages: int,
                 max_batched_tokens: int, min_bucket: int = 1):
        self.model = model
        self.rows = rows
        self.page_size = page_size
        self.pages_per_row = -(-max_len // page_size)
        self.token_buckets = token_buckets(max_batched_tokens, min_bucket)
        mesh = model.runtime.mesh
        cache = PC.init_paged_cache(model.config, num_pages, page_size, model.kv_cache_dtype or model.dtype, mesh)
        # Committed to where the steps leave it: jit keys its arguments on committedness.
        self._where = (jax.devices()[0] if mesh is None
                       else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        self.cache = jax.device_put(cache, self._where) if mesh is None else cache
        self._last = jax.device_put(np.zeros((rows,), np.int32), self._where)  # [S]: the last step's samples
        # For sampling penalties, per row: the counts of the tokens its request generated, and which are in
        # its prompt (`reset_penalties` when a penalized request takes the row, `sampler.count` each step).
        self.max_len = max_len
        vocab = model.config.vocab_size
        self._counts = jax.device_put(np.zeros((rows, vocab), np.int32), self._where)  # [S, V]
        self._in_prompt = jax.device_put(np.zeros((rows, vocab), bool), self._where)  # [S, V]

    def _batch(self, plan: StepPlan, bucket: int | None = None) -> tuple[PC.RaggedBatch, jax.Array, list[int]]:
        """The plan as a ragged batch of `bucket` rows (default: the smallest holding it) and the rows
        whose token is the last step's sample, host arrays put on the device; and the page-table rows
        it samples."""
        t = bucket or next(b for b in self.token_buckets if b >= plan.num_tokens)
        tokens = np.zeros((t,), np.int32)  # [T]
        from_last = np.zeros((t,), bool)  # [T]
        positions = np.zeros((t,), np.int32)  # [T]
        seq_ids = np.full((t,), -1, np.int32)  # [T]: padding rows -1
        page_table = np.zeros((self.rows, self.pages_per_row), np.int32)  # [S, M]: unused entries the null page
        context_lens = np.zeros((self.rows,), np.int32)  # [S]
        logit_rows = np.zeros((self.rows,), np.int32)  # [S]
        at, sampled = 0, []
        for chunk in plan.chunks:
            n = len(chunk.tokens)
            tokens[at:at + n] = chunk.tokens
            from_last[at] = chunk.pending
            positions[at:at + n] = np.arange(chunk.start, chunk.start + n)
            seq_ids[at:at + n] = chunk.row
            page_table[chunk.row, :len(chunk.pages)] = chunk.pages
            context_lens[chunk.row] = chunk.start + n
            logit_rows[chunk.row] = at + n - 1
            if chunk.sample:
                sampled.append(chunk.row)
            at += n
        arrays, from_last = jax.device_put((dict(tokens=tokens, positions=positions, seq_ids=seq_ids,
                                                 page_table=page_table, context_lens=context_lens,
                                                 logit_rows=logit_rows), from_last), self._where)
        return PC.RaggedBatch(**arrays), from_last, sampled

    def _run_step(self, batch: PC.RaggedBatch, from_last: jax.Array) -> jax.Array:
        p = self.model
        logits, self.cache = _step(p.params, self.cache, batch, self._last, from_last, config=p.config,
                                   runtime=p.runtime)
        return logits

    def dispatch(self, plan: StepPlan, params: dict[int, tuple], top: bool) -> InFlight:
        """Queues the plan's step and its sampling, returning at once; samples row r with `params[r]` =
        (seed, index of the token in its request's stream, temperature, top_p, top_k, padded logit bias
        or None: `Request._bias`, penalties or None: `Request._penalties`), and the likeliest
        alternatives too with `top`. A penalized row's counts must be its request's
        (`reset_penalties`)."""
        batch, from_last, rows = self._batch(plan)
        return self._sample(self._run_step(batch, from_last), rows, params, top)

    def read(self, step: InFlight) -> Sampled:
        """The step's samples on the host (waits for the device)."""
        tokens, logprobs, top_ids, top_lps = sampler.read(step.out)
        return Sampled(step.rows, tokens, logprobs, top_ids, top_lps)

    def _sample(self, logits: jax.Array, rows: list[int], params: dict, top: bool) -> InFlight:
        seeds = np.zeros((self.rows,), np.uint32)
        steps = np.zeros((self.rows,), np.int32)
        temperature = np.zeros((self.rows,), np.float32)
        top_p = np.ones((self.rows,), np.float32)
        top_k = np.zeros((self.rows,), np.int32)
        for r in rows:
            seeds[r], steps[r], temperature[r], top_p[r], top_k[r], _, _ = params[r]
        penalized = [r for r in rows if params[r][6] is not None]
        if penalized:  # only then, as the bias below
            penalties = np.tile(np.asarray(NEUTRAL_PENALTIES, np.float32), (self.rows, 1))  # [S, 3]
            for r in penalized:
                penalties[r] = params[r][6]
            logits = sampler.penalize(logits, self._counts, self._in_prompt,
                                      *jax.device_put(tuple(penalties.T), self._where))
        biased = [r for r in rows if params[r][5] is not None]
        if biased:  # only then: a step without biased rows runs as it did before biases existed
            ids = np.zeros((self.rows, MAX_LOGIT_BIAS), np.int32)  # [S, L]
            values = np.zeros((self.rows, MAX_LOGIT_BIAS), np.float32)  # [S, L]
            for r in biased:
                ids[r], values[r] = params[r][5]
            logits = sampler.add_bias(logits, *jax.device_put((ids, values), self._where))
        out, self._last = _sample_rows(logits, *jax.device_put((seeds, steps, temperature, top_p, top_k), self._where),
                                       sample=bool((temperature > 0).any()), top=MAX_TOP_LOGPROBS if top else 0)
        if penalized:
            counted = np.zeros((self.rows,), bool)
            counted[penalized] = True
            self._counts = sampler.count(self._counts, self._last, jax.device_put(counted, self._where))
        out.copy_to_host_async()
        return InFlight(rows, out)

    def reset_penalties(self, row: int, generated: Sequence[int], prompt: Sequence[int]) -> None:
        """Row `row`'s penalty state becomes a request's: the counts of the tokens it has generated, and its
        prompt's tokens."""
        pad = self.model.config.vocab_size  # past the vocabulary: counts nothing
        ids = np.full((2, self.max_len), pad, np.int32)  # [2, N]
        ids[0, :len(generated)] = generated
        ids[1, :len(prompt)] = prompt
        self._counts, self._in_prompt = sampler.reset_counts(
            self._counts, self._in_prompt, *jax.device_put((np.int32(row), ids[0], ids[1]), self._where))

    def warmup(self, progress: Callable[[list], Iterable] | None = None, compile_workers: int = 1) -> None:
        """Compiles the step of every token bucket and every sampling variant, greedy or not, with and
        without alternatives, after a logit bias or not (all rows padding: only the null page is
        written). `progress` may wrap the list of programs run (a progress bar). With
        `compile_workers` > 1 that many threads first compile the buckets' steps side by side (XLA
        compiles without the GIL); the steps then run from the compiled programs."""
        empty = StepPlan(chunks=[], preempted=[])
        batches = {t: self._batch(empty, t)[:2] for t in self.token_buckets}
        last: dict[str, jax.Array] = {}
        compiled: list[Callable[[], None]] = []
        pool = None
        if compile_workers > 1 and len(batches) > 1:
            pool = concurrent.futures.ThreadPoolExecutor(min(compile_workers, len(batches)),
                                                         thread_name_prefix="jaxfire-compile")
            p = self.model
            # the largest first: the longest compiles start at once
            futures = [pool.submit(lambda b: _step.trace(p.params, self.cache, b[0], self._last, b[1], config=p.config,
                                                         runtime=p.runtime).lower().compile(), batches[t])
                       for t in sorted(batches, reverse=True)]  # called as `_run_step` calls it: the same program
            compiled = [f.result for f in futures]  # each waits for its program (what the progress bar shows)

        def step(t: int) -> None:
            last["logits"] = self._run_step(*batches[t])

        def sample(top: bool, temperature: float, bias, penalties=None) -> None:
            self.read(self._sample(last["logits"], [0], {0: (0, 0, temperature, 1.0, 0, bias, penalties)}, top))

        programs = [functools.partial(step, t) for t in self.token_buckets] + [
            functools.partial(sample, *v) for v in itertools.product((False, True), (0.0, 1.0), (None, zero_bias()))]
        # the penalties' programs (apart from the sampling ones): a row's reset, penalize and count
        programs += [functools.partial(self.reset_penalties, 0, [], []),
                     functools.partial(sample, False, 0.0, None, (0.5, 0.5, 1.5))]
        programs = compiled + programs * 2  # on a mesh a step may return the cache in other shardings than it came in
        try:
            for program in progress(programs) if progress else programs:
                program()
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        jax.block_until_ready(self.cache)


def default_pages(model: "Model", rows: int, max_len: int, page_size: int, share: float = 0.9) -> tuple[int, bool]:
    """Pages for the pool, the null page included: enough for every row at `max_len`, or fewer where
    the device's free memory holds fewer (`share` of what is left after the weights, the rest for
    activations; on a mesh counted as if each device held the whole cache, which a sharded cache only
    undercuts). Also whether free memory was the limit. A device that reports no memory (the CPU)
    gets the full count."""
    need = rows * -(-max_len // page_size) + 1
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # backends without memory statistics
        stats = None
    if not stats or "bytes_limit" not in stats:
        return need, False
    free = (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) * share
    fit = max(int(free // PC.page_bytes(model.config, page_size, model.kv_cache_dtype or model.dtype)), 2)
    return min(need, fit), fit < need
