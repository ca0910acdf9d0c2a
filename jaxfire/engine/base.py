"""What every engine shares: submission and its checks (any thread), the background thread, one
scheduler at a time, streaming tokens to their requests, ending requests, and the stats.

An engine subclass holds the device state and decides what each step runs (`_step`); it says what
it holds through `_busy`, `_num_running` and `_num_waiting`, lets a request go in `_drop`, and drops
everything in `_clear`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from jaxfire import metrics
from jaxfire.engine.requests import (LOGIT_BIAS_LIMIT, MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, NEUTRAL_PENALTIES,
                                     PENALTY_LIMIT, SEED_LIMIT, EngineError, Request, RequestError, TokenEvent)
from jaxfire.tokenizer import StreamDecoder

if TYPE_CHECKING:
    from jaxfire.api import Model


class EngineBase:
    """The front of an engine: see the module docstring. `slots` requests run at once; a request
    needs prompt + max_tokens of the `max_len` positions."""

    def __init__(self, model: "Model", slots: int, max_len: int | None, detokenize: bool):
        cfg = model.config
        if max_len is None:
            max_len = min(cfg.max_position_embeddings, 4096)
        for name, value in (("slots", slots), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise EngineError(f"{name} must be a positive integer, got {value!r}")
        self.model = model
        self.config = cfg
        self.slots = int(slots)
        self.max_len = int(max_len)
        self.detokenize = detokenize
        self.counters = collections.Counter()  # the engine's step counters, reported by stats()
        self._stats_lock = threading.Lock()  # the scheduler writes the totals below, any thread reads them
        self._totals = metrics.EngineStats(
            slots=self.slots, running=0, waiting=0, finished=collections.Counter(), prompt_tokens=0,
            generated_tokens=0, steps={}, time_to_first_token=metrics.Histogram(metrics.TTFT_BOUNDS),
            inter_token_latency=metrics.Histogram(metrics.ITL_BOUNDS),
            e2e_latency=metrics.Histogram(metrics.E2E_BOUNDS), queue_time=metrics.Histogram(metrics.E2E_BOUNDS))
        self._eos = frozenset(cfg.eos_token_ids)
        self._state: Any = None  # the device state, None once closed
        self._cond = threading.Condition()  # guards the inbox, cancellations and the flags below
        self._inbox: list[Request] = []
        self._cancels: list[Request] = []
        self._next_id = 0
        self._closed = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._step_lock = threading.Lock()  # one scheduler at a time; guards everything below
        self._live: set[Request] = set()  # submitted and not finished

    # ----- what a subclass provides -----

    def _step(self) -> list[TokenEvent]:
        raise NotImplementedError

    def _busy(self) -> bool:
        """Whether requests are waiting, running or in flight (the inbox aside)."""
        raise NotImplementedError

    def _num_running(self) -> int:
        raise NotImplementedError

    def _num_waiting(self) -> int:
        raise NotImplementedError

    def _drop(self, req: Request) -> None:
        """Lets go of whatever the request holds (its slot, its pages), wherever it is."""
        raise NotImplementedError

    def _clear(self) -> None:
        """Forgets every queued request and anything in flight (after a failure, or on close)."""
        raise NotImplementedError

    def _check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raises `RequestError` for a request this engine can never run (beyond `max_len`)."""

    def _cache_stats(self) -> dict[str, int]:
        """The KV cache's fields of `metrics.EngineStats`, for an engine that has them."""
        return {}

    def _take_inbox(self) -> tuple[list[Request], list[Request]]:
        """The requests submitted and the cancellations asked for since the last step; a cancelled
        request ends here (its events end with finish_reason "cancelled")."""
        with self._cond:
            new, self._inbox = self._inbox, []
            self._live.update(new)
            cancels, self._cancels = self._cancels, []
        return new, cancels

    # ----- submission (any thread) -----

    def submit(self, prompt: str | Sequence[int], *, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int = 0, ignore_eos: bool = False, stop_token_ids: Sequence[int] = (),
               stop: str | Sequence[str] = (), top_logprobs: int = 0, logit_bias: Mapping[int, float] | None = None,
               presence_penalty: float = 0.0, frequency_penalty: float = 0.0, repetition_penalty: float = 1.0,
               min_tokens: int = 0, on_token: Callable[[TokenEvent], Any] | None = None) -> Request:
        """Queues a request; returns its handle at once. Raises `RequestError` for a request that cannot run.

        prompt: token ids, or a string for a model with a tokenizer. max_tokens counts EOS.
        temperature: 0 is greedy; top_p in (0, 1]; top_k >= 0 (0: no limit); seed in [0, 2**32) picks
          the sampling stream.
        ignore_eos: generate exactly max_tokens tokens (benchmarks), unless a stop token comes.
        stop_token_ids: more ids that end the request as EOS does (finish_reason "stop"; the id is not
          part of the output).
        stop: strings that end the request once its text contains one (finish_reason "stop"): the text
          streamed ends before it, while `tokens` keeps every id generated. Needs the tokenizer; text
          that could begin a stop string is streamed one token late.
        top_logprobs: with each token, this many most likely ids at its position and their
          log-probabilities (at most MAX_TOP_LOGPROBS; `TokenEvent.top_logprobs`, `Request.top_logprobs`).
        logit_bias: token id -> a number in [-100, 100] added to that token's logit at every position
          before sampling (greedy or not, so before top-p and top-k); at most MAX_LOGIT_BIAS ids. As
          OpenAI's: -100 in effect bans a token, +100 in effect forces it. The log-probabilities
          reported are then those of the biased distribution (vLLM's `processed_logprobs`, not its
          default `raw_logprobs`).
        presence_penalty, frequency_penalty, repetition_penalty: vLLM's sampling penalties, applied before
          the logit bias: a token already generated loses `presence_penalty` (in [-2, 2]) once and
          `frequency_penalty` (in [-2, 2]) per time generated from its logit; a token generated or in the
          prompt has a positive logit divided by `repetition_penalty` (> 0), a negative one multiplied.
          The paged engine only.
        min_tokens: vLLM's: the first this many tokens are never EOS (unless ignore_eos) or one of
          stop_token_ids, whose logits are -inf there, and no stop string is looked for in their text
          (at most max_tokens; the paged engine only).
        on_token: called with each `TokenEvent` on the scheduling thread (keep it short); if it
          raises, the request ends with finish_reason "error" and the others carry on.
        """
        ids = self._validate(prompt, max_tokens, temperature, top_p, seed)
        top_k, stop_ids = self._validate_limits(top_k, stop_token_ids)
        if (isinstance(top_logprobs, bool) or not isinstance(top_logprobs, (int, np.integer))
                or not 0 <= top_logprobs <= MAX_TOP_LOGPROBS):
            raise RequestError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs!r}")
        stop = self._validate_stop(stop)
        logit_bias = self._validate_bias(logit_bias)
        penalties = self._validate_penalties(presence_penalty, frequency_penalty, repetition_penalty)
        banned = stop_ids | (frozenset() if ignore_eos else self._eos)
        self._validate_min_tokens(min_tokens, max_tokens, logit_bias, banned)
        detok = StreamDecoder(self.model.tokenizer if self.detokenize else None, stop)
        with self._cond:
            if self._closed or self._error is not None:
                raise EngineError("the engine is closed" if self._error is None
                                  else f"the engine stopped after an error: {self._error}")
            req = Request(self, self._next_id, ids, int(max_tokens), float(temperature), float(top_p), top_k, int(seed),
                          bool(ignore_eos), stop_ids, on_token, detok, int(top_logprobs), logit_bias, penalties,
                          int(min_tokens), banned)
            self._next_id += 1
            self._inbox.append(req)
            self._cond.notify_all()
        return req

    def _validate_limits(self, top_k, stop_token_ids) -> tuple[int, frozenset[int]]:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0 (0: no limit), got {top_k!r}")
        try:
            stop = list(stop_token_ids)
        except TypeError:
            raise RequestError(f"stop_token_ids must be a sequence of token ids, got {stop_token_ids!r}") from None
        for t in stop:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self.config.vocab_size:
                raise RequestError(f"stop_token_ids has {t!r}, not a token id in [0, {self.config.vocab_size})")
        return int(top_k), frozenset(int(t) for t in stop)

    def _validate_stop(self, stop) -> tuple[str, ...]:
        stop = (stop,) if isinstance(stop, str) else stop
        try:
            stop = tuple(stop)
        except TypeError:
            raise RequestError(f"stop must be a string or a sequence of strings, got {stop!r}") from None
        if any(not isinstance(s, str) or not s for s in stop):
            raise RequestError(f"stop must hold non-empty strings, got {stop!r}")
        if stop and (self.model.tokenizer is None or not self.detokenize):
            raise RequestError("stop strings need the model's tokenizer and an engine with detokenize on")
        return stop

    # Whether the engine applies sampling penalties and min_tokens (else it refuses requests that ask
    # for them): both change a row's sampling step by step.
    supports_penalties = True

    def _validate_min_tokens(self, min_tokens, max_tokens, logit_bias: dict, banned: frozenset[int]) -> None:
        if (isinstance(min_tokens, bool) or not isinstance(min_tokens, (int, np.integer))
                or not 0 <= min_tokens <= max_tokens):
            raise RequestError(f"min_tokens must be an integer in [0, max_tokens ({max_tokens})], got {min_tokens!r}")
        if min_tokens and not self.supports_penalties:
            raise RequestError(f"{type(self).__name__} has no min_tokens: jaxfire.Engine (the paged engine) applies it")
        if min_tokens and len(logit_bias.keys() | banned) > MAX_LOGIT_BIAS:
            raise RequestError(f"min_tokens bans {len(banned)} ids (EOS and stop_token_ids) beside {len(logit_bias)} "
                               f"logit_bias entries: more than the limit of {MAX_LOGIT_BIAS}")

    def _validate_penalties(self, presence, frequency, repetition) -> tuple[float, float, float]:
        for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
            if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
                    or not -PENALTY_LIMIT <= value <= PENALTY_LIMIT):
                raise RequestError(f"{name} must be a number in [{-PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}], got {value!r}")
        if (isinstance(repetition, bool) or not isinstance(repetition, (int, float, np.integer, np.floating))
                or not 0 < repetition < math.inf):
            raise RequestError(f"repetition_penalty must be a number above 0 (1: none), got {repetition!r}")
        penalties = (float(presence), float(frequency), float(repetition))
        if penalties != NEUTRAL_PENALTIES and not self.supports_penalties:
            raise RequestError(f"{type(self).__name__} has no sampling penalties: jaxfire.Engine (the paged "
                               "engine) applies them")
        return penalties

    def _validate_bias(self, logit_bias) -> dict[int, float]:
        if logit_bias is None:
            return {}
        if not isinstance(logit_bias, Mapping):
            raise RequestError(f"logit_bias must be a mapping of token ids to numbers, got {logit_bias!r}")
        if len(logit_bias) > MAX_LOGIT_BIAS:
            raise RequestError(f"logit_bias has {len(logit_bias)} token ids, more than the limit of {MAX_LOGIT_BIAS}")
        vocab = self.config.vocab_size
        for t, v in logit_bias.items():
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab:
                raise RequestError(f"logit_bias has {t!r}, not a token id in [0, {vocab})")
            if (isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))
                    or not -LOGIT_BIAS_LIMIT <= v <= LOGIT_BIAS_LIMIT):
                raise RequestError(f"logit_bias of token {t} is {v!r}, not a number in "
                                   f"[{-LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}]")
        return {int(t): float(v) for t, v in logit_bias.items()}

    def _validate(self, prompt, max_tokens, temperature, top_p, seed) -> list[int]:
        cfg = self.config
        if isinstance(prompt, str):
            if self.model.tokenizer is None:
                raise RequestError("this model has no tokenizer: pass the prompt as a list of token ids")
            ids = self.model.tokenizer.encode(prompt)
        else:
            try:
                ids = list(prompt)
            except TypeError:
                raise RequestError("the prompt must be a string or a sequence of token ids") from None
            if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in ids):
                raise RequestError("the prompt must be a string or a sequence of integer token ids")
            ids = [int(t) for t in ids]
        if not ids:
            raise RequestError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise RequestError(f"the prompt has token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer of at least 1, got {max_tokens!r}")
        if not isinstance(temperature, (int, float, np.number)) or not (math.isfinite(temperature)
                                                                        and temperature >= 0):
            raise RequestError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if not isinstance(top_p, (int, float, np.number)) or not 0 < top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {top_p!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < SEED_LIMIT:
            raise RequestError(f"seed must be an integer in [0, 2**32), got {seed!r}")
        need = len(ids) + max_tokens
        if need > cfg.max_position_embeddings:
            raise RequestError(f"prompt of {len(ids)} tokens plus {max_tokens} new tokens exceeds the model's "
                               f"{cfg.max_position_embeddings} positions")
        if need > self.max_len:
            raise RequestError(f"prompt of {len(ids)} tokens plus {max_tokens} new tokens exceeds the engine's "
                               f"{self.max_len} cache positions per slot")
        self._check_fits(len(ids), int(max_tokens))
        return ids

    def _request_cancel(self, req: Request) -> None:
        with self._cond:
            if not req.finished:
                self._cancels.append(req)
                self._cond.notify_all()

    # ----- the background thread -----

    @property
    def running(self) -> bool:
        """Whether the engine's own thread schedules (else consumers drive `step()`)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "EngineBase":
        """Runs the scheduler on a daemon thread until `close()`."""
        with self._cond:
            if self._closed:
                raise EngineError("the engine is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="jaxfire-engine", daemon=True)
                self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._inbox and not self._cancels and not self._busy():
                    self._cond.wait()
                if self._closed:
                    return
            try:
                self.step()
            except BaseException:  # step() already failed every request with it
                return

    def close(self) -> None:
        """Stops the thread, cancels unfinished requests and releases the cache."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._step_lock:
            with self._cond:
                pending = self._inbox + list(self._live)
                self._inbox = []
            for req in pending:
                self._finish(req, "cancelled", time.perf_counter())
            self._clear()
            self._state = None

    def __enter__(self) -> "EngineBase":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- scheduling -----

    @property
    def busy(self) -> bool:
        """Whether anything is queued, running or in flight."""
        with self._cond:
            return bool(self._inbox) or bool(self._cancels) or self._busy()

    def stats(self) -> metrics.EngineStats:
        """A snapshot of the engine's load and its totals since it started (`jaxfire.metrics`); safe
        from any thread while the engine runs."""
        with self._cond:
            inbox = len(self._inbox)
        with self._stats_lock:
            t = self._totals
            return dataclasses.replace(
                t, running=self._num_running(), waiting=inbox + self._num_waiting(),
                finished=dict(t.finished), steps=dict(self.counters),
                time_to_first_token=t.time_to_first_token.copy(), inter_token_latency=t.inter_token_latency.copy(),
                e2e_latency=t.e2e_latency.copy(), queue_time=t.queue_time.copy(), **self._cache_stats())

    def _check_usable(self) -> None:
        if self._error is not None:
            raise EngineError(f"the engine stopped after an error: {self._error}") from self._error
        if self._state is None:
            raise EngineError("the engine is closed")

    def step(self) -> list[TokenEvent]:
        """One scheduling round (see the module docstring); returns the events it emitted, in order."""
        with self._step_lock:
            self._check_usable()
            try:
                return self._step()
            except BaseException as e:
                self._fail(e)
                raise

    def _emit(self, req: Request, token: int, logprob: float, top: tuple[np.ndarray, np.ndarray] | None, now: float,
              events: list[TokenEvent]) -> None:
        if req.finished:  # cancelled, or ended by EOS while this step was in flight
            return
        req._emitted += 1
        is_eos = not req.ignore_eos and token in self._eos
        ends = is_eos or token in req.stop_token_ids  # ended by this id, which is not output
        last = ends or req._emitted >= req.max_tokens
        reason = "eos" if is_eos else "stop" if ends else ("length" if last else None)
        alternatives = None
        if req.num_top_logprobs and top is not None:
            alternatives = tuple((int(i), float(v)) for i, v in zip(*(a[:req.num_top_logprobs] for a in top)))
        if not ends:
            req.tokens.append(token)
            req.logprobs.append(logprob)
            if alternatives is not None:
                req.top_logprobs.append(alternatives)
        times = req.metrics.token_times
        times.append(now)
        with self._stats_lock:
            self._totals.generated_tokens += 1
            if len(times) == 1:
                self._totals.time_to_first_token.observe(now - req.metrics.arrival)
            else:
                self._totals.inter_token_latency.observe(now - times[-2])
        text, hit = ((req._detok.flush(), False) if ends
                     else req._detok.stream(token, final=last, stops=req._emitted >= req.min_tokens))
        if hit:  # a stop string: the text ends before it
            last, reason = True, "stop"
        event = TokenEvent(index=req.id, token=token, text=text, finished=last, finish_reason=reason, logprob=logprob,
                           top_logprobs=alternatives)
        events.append(event)
        req._events.put(event)
        if req._on_token is not None:
            try:
                req._on_token(event)
            except Exception as e:  # a consumer's bug ends its own request only
                req.error = e
                self._finish(req, "error", now)
                return
        if last:
            self._finish(req, reason, now)

    def _finish(self, req: Request, reason: str, now: float) -> None:
        if req.finished:
            return
        self._drop(req)
        req.finish_reason = reason
        req.metrics.finished = now
        with self._stats_lock:
            self._totals.finished[reason] += 1
            if req.metrics.token_times:
                self._totals.e2e_latency.observe(req.metrics.e2e)
        self._live.discard(req)
        req._close()

    def _fail(self, error: BaseException) -> None:
        """A failed step leaves the donated state unusable: every unfinished request ends with the error."""
        with self._cond:
            self._error = error
            pending = self._inbox + list(self._live)
            self._inbox = []
            self._cond.notify_all()
        now = time.perf_counter()
        for req in pending:
            if not req.finished:
                req.error = error
                self._finish(req, "error", now)
        self._clear()

