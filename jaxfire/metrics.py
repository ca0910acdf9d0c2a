"""Serving metrics: the counters and latency histograms an engine keeps, and their Prometheus text form.

`Engine.stats()` returns an `EngineStats` snapshot; `python -m jaxfire.server` serves it at
`GET /metrics` in Prometheus' text exposition format, under names that follow vLLM's (`jaxfire:`
where vLLM writes `vllm:`), so existing dashboards need only the prefix changed.
"""

from __future__ import annotations

import bisect
import dataclasses

# Bucket upper bounds, seconds.
TTFT_BOUNDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
ITL_BOUNDS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
              0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0)


class Histogram:
    """Counts of observations per bucket (`bounds`: upper bounds, inclusive; one more bucket past the
    last) and their sum."""

    def __init__(self, bounds: tuple[float, ...]):
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"histogram bounds must increase strictly, got {bounds}")
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def copy(self) -> "Histogram":
        other = Histogram(self.bounds)
        other.counts, other.sum = list(self.counts), self.sum
        return other


@dataclasses.dataclass
class EngineStats:
    """An engine's state and totals since it started."""

    slots: int
    running: int  # requests holding a slot (decoding, or prefilling a prompt in chunks)
    waiting: int  # submitted, waiting for a slot
    finished: dict[str, int]  # requests ended, by finish reason ("eos", "stop", "length", "cancelled", "error")
    prompt_tokens: int  # of requests admitted to a slot
    generated_tokens: int  # tokens emitted, an ending EOS or stop id included
    steps: dict[str, int]  # the engine's step counters (decode_steps, prefills, ...)
    time_to_first_token: Histogram  # seconds, from submission
    inter_token_latency: Histogram  # seconds between a request's successive tokens
    e2e_latency: Histogram  # seconds from submission to the last token
    queue_time: Histogram  # seconds from submission to holding a slot
    # The paged engine's KV cache (zero for the contiguous engine)
    kv_pages_total: int = 0  # pages a request may hold (the null page aside)
    kv_pages_used: int = 0  # referenced by running requests
    kv_pages_cached: int = 0  # unreferenced, kept for their tokens until evicted
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of them, found there
    preemptions: int = 0  # requests sent back to the queue to recompute later


def prometheus(stats: EngineStats, model_name: str, prefix: str = "jaxfire") -> str:
    """The stats in Prometheus' text exposition format (version 0.0.4)."""
    label = f'model_name="{_escape(model_name)}"'
    lines: list[str] = []

    def metric(name: str, kind: str, doc: str, samples: list[tuple[str, str, float]]) -> None:
        lines.append(f"# HELP {prefix}:{name} {doc}")
        lines.append(f"# TYPE {prefix}:{name} {kind}")
        for suffix, labels, value in samples:
            lines.append(f"{prefix}:{name}{suffix}{{{label}{labels}}} {_number(value)}")

    metric("num_requests_running", "gauge", "Requests holding a decode slot.", [("", "", stats.running)])
    metric("num_requests_waiting", "gauge", "Requests waiting for a decode slot.", [("", "", stats.waiting)])
    metric("num_slots", "gauge", "Decode slots of the engine.", [("", "", stats.slots)])
    metric("kv_cache_usage_perc", "gauge", "Fraction of the KV cache pages referenced by running requests (0 to 1).",
           [("", "", stats.kv_pages_used / stats.kv_pages_total if stats.kv_pages_total else 0.0)])
    metric("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
           [("", "", stats.prefix_cache_queries)])
    metric("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.",
           [("", "", stats.prefix_cache_hits)])
    metric("num_preemptions_total", "counter", "Requests preempted to free KV cache pages.",
           [("", "", stats.preemptions)])
    metric("request_success_total", "counter", "Requests finished, by finish reason.",
           [("", f',finished_reason="{_escape(r)}"', n) for r, n in sorted(stats.finished.items())])
    metric("prompt_tokens_total", "counter", "Prompt tokens of requests admitted.", [("", "", stats.prompt_tokens)])
    metric("generation_tokens_total", "counter", "Tokens generated.", [("", "", stats.generated_tokens)])
    for name, value in sorted(stats.steps.items()):
        metric(f"engine_{name}_total", "counter", f"Engine {name.replace('_', ' ')}.", [("", "", value)])
    for name, hist, doc in (
            ("time_to_first_token_seconds", stats.time_to_first_token, "Time to first token, queueing included."),
            ("time_per_output_token_seconds", stats.inter_token_latency, "Time between successive tokens."),
            ("e2e_request_latency_seconds", stats.e2e_latency, "Submission to last token."),
            ("request_queue_time_seconds", stats.queue_time, "Submission to holding a decode slot.")):
        samples, running = [], 0
        for bound, n in zip(hist.bounds + (float("inf"),), hist.counts):
            running += n
            samples.append(("_bucket", f',le="{_number(bound)}"', running))
        samples += [("_sum", "", hist.sum), ("_count", "", hist.count)]
        metric(name, "histogram", doc, samples)
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
