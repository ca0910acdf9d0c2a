"""The engine over a paged KV cache: a token-budget scheduler, chunked prefill packed with decode, and
automatic prefix caching.

How a step runs (`PagedEngine.step`, on one thread at a time: the engine's own, or whoever consumes
results, as in `contiguous.py`):
1. new submissions join the scheduler's queue; cancelled requests end, their pages released at once;
2. the scheduler (`scheduler.py`) plans the step under `max_batched_tokens`: the decode token of every
   running request, then prefill chunks of partly computed and newly admitted prompts (first come,
   first served; an admitted prompt first takes its longest cached prefix of full pages from the
   prefix cache, `pages.py`); when pages run out it preempts the latest admitted request, which
   recomputes its prompt and streamed tokens later;
3. the runner (`runner.py`) queues the plan as one ragged batch through `model.ragged_step`, which
   writes every row's key/value into its page and returns the next-token logits of each request
   whose chunk reached its last token, and samples them;
4. then the previous step's samples are read back (the device runs the step just queued meanwhile)
   and emitted, and full pages of known tokens join the prefix cache. So the host plans step k+1
   before it knows step k's tokens: a request sampled in step k decodes in step k+1 from that sample
   on the device, and a request that step k ends (a stop) loses the extra row it got in step k+1.
Token n of a request is drawn with key fold_in(key(seed), n) over its own logits (its logit bias
added), as in `contiguous.py`, so a request's tokens do not depend on what else runs, on chunking, on
prefix hits or on preemption (a recomputed request resumes at the same n, never re-sending a token).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Sequence

import numpy as np

from jaxfire import paged_cache
from jaxfire.engine.base import EngineBase
from jaxfire.engine.pages import PagePool
from jaxfire.engine.requests import EngineError, Request, RequestError, TokenEvent
from jaxfire.engine.runner import InFlight, Runner, default_pages
from jaxfire.engine.scheduler import Scheduler, StepPlan
from jaxfire.engine.scheduler import Sequence as Seq
from jaxfire.errors import JaxfireError

if TYPE_CHECKING:
    from jaxfire.api import Model


class PagedEngine(EngineBase):
    """Continuous batching over a paged KV cache.

    model: a `jaxfire.Model`; its `runtime` (kernels, FP8 policy, mesh) and `kv_cache_dtype` are
      honoured.
    slots: requests running at once (rows of the page table); more wait in submission order.
    max_len: positions one request may use (prompt + max_tokens; default: the model's positions, at
      most 4096).
    page_size: positions per page: a power of two of at least 16 (the paged attention kernel's key
      blocks).
    kv_pages: pages in the pool, the null page included (default: enough for every slot at max_len,
      or as many as fit the device memory left after the weights where that is fewer, printed at
      start).
    prefix_caching: keep full pages keyed by their tokens and reuse them for prompts that begin alike.
    max_batched_tokens: token rows per step, decode tokens and prefill chunks together (at least
      `slots`; default `max(slots, 256)`). Bounds how long a step, and so a running request's wait
      for its next token, can be. Measured on one H200 (Mixtral-8x7B, FP8, 1024-token prompts, 50
      tokens out, over HTTP; bench/results/serving.jsonl, run S3): 256 held p90 inter-token latency
      at 20-21 ms from 4 to 16 requests/s offered (completing up to 9.8 a second), 512 at 25-30 ms
      (up to 12.7 a second), 128 at 20 ms but no more than 5.9 a second.
    max_idle_batched_tokens: token rows of a step in which no running request decodes (none waits for
      a token), so that a prompt reaching an idle engine prefills in fewer, larger chunks (default:
      `max_batched_tokens`, no difference; at least that). Not yet measured in serving: on one H200 a
      1024-token prompt in four chunks of 256 cost 1.57x one call of 1024 (bench/prefill.py).
    min_bucket: the fewest token rows a step is padded to (steps compile for powers of two from it):
      1, so that a step of a few decode rows runs the kernels of its own size.
    detokenize: whether events carry text (needs the model's tokenizer).
    """

    def __init__(self, model: "Model", *, slots: int = 8, max_len: int | None = None, page_size: int = 16,
                 kv_pages: int | None = None, prefix_caching: bool = True, max_batched_tokens: int | None = None,
                 max_idle_batched_tokens: int | None = None, min_bucket: int = 1, detokenize: bool = True):
        super().__init__(model, slots, max_len, detokenize)
        try:
            paged_cache.check_page_size(page_size)  # the sizes the paged attention kernels take
        except JaxfireError as e:
            raise EngineError(f"page_size: {e}") from None
        self.page_size = int(page_size)
        per_request = -(-self.max_len // self.page_size)
        if kv_pages is None:
            kv_pages, short = default_pages(model, self.slots, self.max_len, self.page_size)
            if short:  # the running requests are bounded by the tokens the pool holds, not by slots
                print(f"jaxfire.PagedEngine: {kv_pages} KV cache pages of {self.page_size} positions fit the free "
                      f"device memory ({(kv_pages - 1) * self.page_size} positions; {self.slots} slots at "
                      f"max_len {self.max_len} would take {self.slots * per_request})", file=sys.stderr, flush=True)
        if isinstance(kv_pages, bool) or not isinstance(kv_pages, (int, np.integer)) or kv_pages < per_request + 1:
            raise EngineError(f"kv_pages must be at least {per_request + 1}: one request of max_len {self.max_len} "
                              f"takes {per_request} pages of {self.page_size}, and page 0 is reserved; "
                              f"got {kv_pages!r}")
        if max_batched_tokens is None:
            max_batched_tokens = max(self.slots, 256)
        if (isinstance(max_batched_tokens, bool) or not isinstance(max_batched_tokens, (int, np.integer))
                or max_batched_tokens < self.slots):
            raise EngineError(f"max_batched_tokens must be an integer of at least slots ({self.slots}): every "
                              f"running request decodes a token each step; got {max_batched_tokens!r}")
        if max_idle_batched_tokens is None:
            max_idle_batched_tokens = max_batched_tokens
        if (isinstance(max_idle_batched_tokens, bool) or not isinstance(max_idle_batched_tokens, (int, np.integer))
                or max_idle_batched_tokens < max_batched_tokens):
            raise EngineError(f"max_idle_batched_tokens must be an integer of at least max_batched_tokens "
                              f"({max_batched_tokens}); got {max_idle_batched_tokens!r}")
        if isinstance(min_bucket, bool) or not isinstance(min_bucket, (int, np.integer)) or min_bucket < 1:
            raise EngineError(f"min_bucket must be a positive integer, got {min_bucket!r}")
        self.kv_pages = int(kv_pages)
        self.prefix_caching = bool(prefix_caching)
        self.max_batched_tokens = int(max_batched_tokens)
        self.max_idle_batched_tokens = int(max_idle_batched_tokens)
        self._pool = PagePool(self.kv_pages, self.page_size, caching=self.prefix_caching)
        self._scheduler = Scheduler(self._pool, self.slots, self.max_batched_tokens, self.max_idle_batched_tokens)
        # the device state: the paged cache and the programs over it (None once closed)
        self._state = Runner(model, self.slots, self.max_len, self.page_size, self.kv_pages,
                             self.max_idle_batched_tokens, int(min_bucket))
        self.token_buckets = self._state.token_buckets
        self._in_flight: tuple[StepPlan, InFlight] | None = None  # dispatched, samples not read yet
        # counters: steps (ragged steps run), mixed_steps (of them, steps with decode and prefill rows),
        # prefills (prompts whose first token was sampled), decode_tokens and prefill_tokens (rows of each
        # kind), padding_tokens (rows of a bucket left empty)

    @property
    def free_slots(self) -> int:
        return self._scheduler.free_rows

    # ----- what EngineBase asks of an engine -----

    def _check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        if not self._scheduler.fits_alone(prompt_tokens + max_tokens):
            raise RequestError(f"prompt of {prompt_tokens} tokens plus {max_tokens} new tokens needs more than the "
                               f"engine's {self._pool.capacity} KV pages of {self.page_size}")

    def _busy(self) -> bool:
        return bool(self._scheduler.waiting) or bool(self._scheduler.running) or self._in_flight is not None

    def _num_running(self) -> int:
        return len(self._scheduler.running)

    def _num_waiting(self) -> int:
        return len(self._scheduler.waiting)

    def _drop(self, req: Request) -> None:
        if req._seq is not None:
            self._scheduler.finish(req._seq)
        req._slot = None

    def _clear(self) -> None:
        self._in_flight = None
        for seq in list(self._scheduler.running) + list(self._scheduler.waiting):
            self._scheduler.finish(seq)

    def _cache_stats(self) -> dict:
        s = self._scheduler
        return dict(kv_pages_total=self._pool.capacity, kv_pages_used=self._pool.used,
                    kv_pages_cached=self._pool.cached, prefix_cache_queries=s.prefix_queries,
                    prefix_cache_hits=s.prefix_hits, preemptions=s.preemptions)

    # ----- steps -----

    def warmup(self, prompt_lengths: Sequence[int] | None = None,
               progress: Callable[[list], Iterable] | None = None, compile_workers: int = 1) -> None:
        """Compiles the step of every token bucket and every sampling variant (`prompt_lengths` is
        accepted for the contiguous engine's signature: a paged step's shapes do not depend on it).
        `progress` may wrap the list of programs run (a progress bar); `compile_workers` threads compile
        the buckets' steps side by side first.

        Call it while no request runs; afterwards serving never compiles.
        """
        with self._step_lock:
            if self._busy() or self._inbox:
                raise EngineError("warm up the engine before submitting requests")
            self._check_usable()
            if isinstance(compile_workers, bool) or not isinstance(compile_workers, int) or compile_workers < 1:
                raise EngineError(f"compile_workers must be an integer of at least 1, got {compile_workers!r}")
            self._state.warmup(progress, compile_workers)

    def _step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        new, cancels = self._take_inbox()
        for req in new:
            req._seq = Seq(req.id, req.prompt, req.max_tokens, owner=req)
            self._scheduler.add(req._seq)
        for req in cancels:
            if not req.finished:
                self._finish(req, "cancelled", time.perf_counter())
        plan = self._scheduler.schedule()
        for seq in plan.preempted:
            seq.owner._slot = None
            seq.owner._counted_row = None  # its row may serve another request before it comes back
        dispatched = self._dispatch(plan) if plan.chunks else None
        # the step before this one ran while this one was planned; its samples come back now, while
        # the device runs the step just dispatched
        previous, self._in_flight = self._in_flight, dispatched
        if previous is not None:
            self._deliver(*previous, events)
        return events

    def _dispatch(self, plan: StepPlan) -> tuple[StepPlan, InFlight]:
        now = time.perf_counter()
        params, top = {}, False
        for chunk in plan.chunks:
            req = chunk.seq.owner
            req._slot = chunk.row
            if req.metrics.scheduled is None:
                req.metrics.scheduled = now
                with self._stats_lock:
                    self._totals.prompt_tokens += req.metrics.prompt_tokens
                    self._totals.queue_time.observe(req.metrics.queue_time)
            if req._penalties is not None and req._counted_row != chunk.row:
                # (re)admitted: the row's counts become the request's, from every token the host has (a
                # sequence comes back only after its last step's samples were read: nothing is pending)
                seq = chunk.seq
                self._state.reset_penalties(chunk.row, seq.tokens[seq.prompt_len:], seq.tokens[:seq.prompt_len])
                req._counted_row = chunk.row
            if chunk.sample:  # the token's index in the request's stream: what its key folds in
                index = chunk.seq.known - chunk.seq.prompt_len
                bias = req._min_bias if index < req.min_tokens else req._bias
                params[chunk.row] = (req.seed, index, req.temperature, req.top_p, req.top_k, bias, req._penalties)
                top = top or req.num_top_logprobs > 0
        step = self._state.dispatch(plan, params, top)
        self._scheduler.computed(plan)
        decode = sum(len(c.tokens) == 1 and c.start >= c.seq.prompt_len for c in plan.chunks)
        self.counters["steps"] += 1
        self.counters["decode_tokens"] += decode
        self.counters["prefill_tokens"] += plan.num_tokens - decode
        self.counters["padding_tokens"] += next(b for b in self.token_buckets if b >= plan.num_tokens) - plan.num_tokens
        self.counters["mixed_steps"] += 0 < decode < plan.num_tokens
        return plan, step

    def _deliver(self, plan: StepPlan, step: InFlight, events: list[TokenEvent]) -> None:
        """Emits a step's samples: each becomes its sequence's next token, unless its request ended
        meanwhile (a stop, a cancel: its sample is dropped)."""
        out = self._state.read(step)
        now = time.perf_counter()
        for chunk in plan.chunks:
            req = chunk.seq.owner
            if not chunk.sample or req.finished:
                continue
            r = chunk.row
            if chunk.seq.generated == 0:
                self.counters["prefills"] += 1
            token = int(out.tokens[r])
            self._scheduler.append(chunk.seq, token)
            top_pair = None if out.top_ids is None else (out.top_ids[r], out.top_logprobs[r])
            self._emit(req, token, float(out.logprobs[r]), top_pair, now, events)
