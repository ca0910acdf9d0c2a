"""A request's handle and what it streams: `Request`, `TokenEvent`, `RequestMetrics`, and the errors
an engine raises."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np

from jaxfire.errors import JaxfireError
from jaxfire.kv_cache import KVCache
from jaxfire.tokenizer import StreamDecoder

if TYPE_CHECKING:
    from jaxfire.engine.contiguous import Engine

SEED_LIMIT = 2**32  # jax.random.key reads 32 bits of a seed: larger ones would silently collide
# A step's sampling program returns this many alternatives a token when any request asks for some (one
# compiled shape; each request keeps its own count), OpenAI's limit.
MAX_TOP_LOGPROBS = 20
# Token ids one request may bias (OpenAI's limit); a step that biases any row pads every row's bias to
# this many entries (one compiled shape).
MAX_LOGIT_BIAS = 300
LOGIT_BIAS_LIMIT = 100.0  # each bias is in [-LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT], as OpenAI's


class RequestError(JaxfireError):
    """A request the engine refuses at submission (nothing else is affected)."""


class EngineError(JaxfireError):
    """The engine is closed, or stopped after a failure."""


@dataclasses.dataclass
class TokenEvent:
    """One generated token of one request, as streams yield it."""

    index: int  # the request's id (its submission number; the prompt's index for `jaxfire.generate`)
    token: int
    text: str | None  # the text this token adds (None without a tokenizer or with detokenize off)
    finished: bool
    finish_reason: str | None = None  # "eos", "stop" (a stop token or string) or "length" once finished
    # log-probability of the token under the model's distribution (before temperature, top-p and top-k;
    # after the request's logit_bias)
    logprob: float | None = None
    # the request's `top_logprobs` most likely ids at this position, with their log-probabilities, most
    # likely first (None unless the request asked for them)
    top_logprobs: tuple[tuple[int, float], ...] | None = None


@dataclasses.dataclass
class RequestMetrics:
    """Host-side timestamps (`time.perf_counter()`) of one request."""

    arrival: float  # submitted
    prompt_tokens: int
    scheduled: float | None = None  # its prefill was dispatched (it held a slot from then on)
    token_times: list[float] = dataclasses.field(default_factory=list)  # each token became visible
    finished: float | None = None

    @property
    def ttft(self) -> float | None:
        """Time to first token, seconds (queueing and prefill included)."""
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def itl(self) -> list[float]:
        """Inter-token latencies, seconds: the gaps between successive tokens."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def e2e(self) -> float | None:
        """End-to-end latency, seconds, from submission to the last token."""
        return self.token_times[-1] - self.arrival if self.token_times else None

    @property
    def queue_time(self) -> float | None:
        return None if self.scheduled is None else self.scheduled - self.arrival


# (presence, frequency, repetition) that change nothing
NEUTRAL_PENALTIES = (0.0, 0.0, 1.0)
PENALTY_LIMIT = 2.0  # presence and frequency, as OpenAI's


def zero_bias() -> tuple[np.ndarray, np.ndarray]:
    """A logit bias that changes nothing, as the sampler takes one: ids [MAX_LOGIT_BIAS] int32 and values
    [MAX_LOGIT_BIAS] float32, all zero."""
    return np.zeros((MAX_LOGIT_BIAS,), np.int32), np.zeros((MAX_LOGIT_BIAS,), np.float32)


def padded_bias(logit_bias: Mapping[int, float]) -> tuple[np.ndarray, np.ndarray] | None:
    """A request's bias as the sampler takes it (`zero_bias` with its entries first); None when no entry
    changes a logit, so the request samples as an unbiased one does."""
    nonzero = {t: v for t, v in logit_bias.items() if v}
    if not nonzero:
        return None
    ids, values = zero_bias()
    ids[:len(nonzero)] = list(nonzero)
    values[:len(nonzero)] = list(nonzero.values())
    return ids, values


_END = object()  # closes a request's event queue


class Request:
    """A submitted request: its tokens so far, how it ended, its timings. Iterate it (once) for its events.

    Without a running engine thread, iterating or `result()` drives the engine from the calling thread.
    """

    def __init__(self, engine: "Engine", rid: int, prompt: list[int], max_tokens: int, temperature: float,
                 top_p: float, top_k: int, seed: int, ignore_eos: bool, stop_token_ids: frozenset[int],
                 on_token: Callable[[TokenEvent], Any] | None, detokenizer: StreamDecoder, num_top_logprobs: int = 0,
                 logit_bias: Mapping[int, float] | None = None, penalties: tuple[float, float, float] = NEUTRAL_PENALTIES,
                 min_tokens: int = 0, banned: frozenset[int] = frozenset()):
        self.id = rid
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.seed = seed
        self.ignore_eos = ignore_eos
        self.stop_token_ids = stop_token_ids
        self.logit_bias = dict(logit_bias or {})  # token id -> what is added to its logit before sampling
        self._bias = padded_bias(self.logit_bias)
        self.presence_penalty, self.frequency_penalty, self.repetition_penalty = penalties
        self._penalties = None if penalties == NEUTRAL_PENALTIES else penalties  # as the sampler takes them
        self._counted_row: int | None = None  # the row whose device counts are this request's (paged engine)
        self.min_tokens = min_tokens
        # the bias of its first min_tokens positions: `banned` (the ids that would end it) at -inf
        self._min_bias = padded_bias({**self.logit_bias, **dict.fromkeys(banned, -np.inf)}) if min_tokens else None
        self.tokens: list[int] = []  # generated ids (EOS and stop tokens not included)
        self.logprobs: list[float] = []  # each token's log-probability under the model (see TokenEvent)
        self.num_top_logprobs = num_top_logprobs
        self.top_logprobs: list[tuple[tuple[int, float], ...]] = []  # per token, when num_top_logprobs > 0
        self.finish_reason: str | None = None  # "eos", "stop", "length", "cancelled" or "error"
        self.error: BaseException | None = None  # what stopped it, for "error"
        self.metrics = RequestMetrics(arrival=time.perf_counter(), prompt_tokens=len(prompt))
        self._engine = engine
        self._on_token = on_token
        self._detok = detokenizer
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._emitted = 0  # tokens seen by the host, EOS included
        self._dispatched = 0  # tokens whose computation was dispatched
        self._slot: int | None = None
        self._decoding = False  # its slot's row of the shared cache holds its prompt
        self._small: KVCache | None = None  # a chunked prompt's own batch-1 cache while it prefills
        self._prefilled = 0  # prompt tokens in it
        self._seq: Any = None  # the paged engine's view of it (`scheduler.Sequence`)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stops the request; its slot is freed at the engine's next step. No effect once finished."""
        self._engine._request_cancel(self)

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                if self._engine.running:
                    item = self._events.get()
                else:
                    self._engine.step()
                    continue
            if item is _END:
                if self.finish_reason == "error":
                    raise EngineError(f"request {self.id} failed: {self.error}") from self.error
                return
            yield item

    def _close(self) -> None:
        """Ends its stream: iterators return once they reach this, and `result()` returns."""
        self._events.put(_END)
        self._done.set()

    def result(self, timeout: float | None = None) -> list[int]:
        """Waits until the request finishes and returns its generated ids (EOS not included)."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while not self._done.is_set():
            if self._engine.running:
                left = None if deadline is None else max(0.0, deadline - time.perf_counter())
                if not self._done.wait(left):
                    break
            else:
                if deadline is not None and time.perf_counter() > deadline:
                    break
                self._engine.step()
        if not self._done.is_set():
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self.finish_reason == "error":
            raise EngineError(f"request {self.id} failed: {self.error}") from self.error
        return self.tokens

    def __repr__(self) -> str:
        state = self.finish_reason or ("running" if self._slot is not None else "waiting")
        return f"Request(id={self.id}, prompt_tokens={len(self.prompt)}, tokens={len(self.tokens)}, {state})"
