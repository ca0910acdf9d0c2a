"""The serving engines: requests join and leave a running batch that shares one KV cache.

`Engine` is `PagedEngine`: a paged KV cache, a token-budget scheduler (chunked prefill packed with
decode) and prefix caching. `ContiguousEngine` keeps decode slots over a contiguous `[slots, max_len]`
cache and prefills whole prompts one per call. On one H200 (bench/serving.py, run S3, Mixtral-8x7B in
FP8) the paged engine matched it at zero load (6.0 ms a token), beat it at 1 request/s (median
inter-token 6.05 against 6.56 ms, end to end 0.39 against 0.45 s), held p90 inter-token latency at 20-21
ms where the contiguous engine's reached 46-56 from 8 requests/s up, and lost at 4 requests/s (median
16.9 against 12.8 ms) and in throughput at 16 offered (9.8 against 11.4 completed a second). Where things are:
- `requests.py`: a request's handle (`Request`), what it streams (`TokenEvent`) and its timings
  (`RequestMetrics`), and the errors an engine raises;
- `base.py`: what every engine shares: submission and its checks, the background thread, streaming
  tokens to their requests, ending them, the stats;
- `sampler.py`: the sampling programs every step ends with (per-request streams, log-probabilities);
- `pages.py`: the page allocator (reference counts) and the prefix cache (hash chain of full pages,
  least recently released evicted first);
- `scheduler.py`: the policy: which tokens of which requests each step computes, under a token
  budget (a `StepPlan`); admission, preemption;
- `runner.py`: a plan as one ragged batch through `model.ragged_step`, and sampling;
- `paged.py`: the paged engine on those three;
- `contiguous.py`: the engine over a contiguous cache and its device programs.
"""

from jaxfire.engine.contiguous import ContiguousEngine, SlotState, prefill_buckets, slot_buckets
from jaxfire.engine.paged import PagedEngine
from jaxfire.engine.requests import (MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, SEED_LIMIT, EngineError, Request,
                                     RequestError, RequestMetrics, TokenEvent)

Engine = PagedEngine

__all__ = ["MAX_LOGIT_BIAS", "MAX_TOP_LOGPROBS", "SEED_LIMIT", "ContiguousEngine", "Engine", "EngineError",
           "PagedEngine", "Request", "RequestError", "RequestMetrics", "SlotState", "TokenEvent", "prefill_buckets",
           "slot_buckets"]
