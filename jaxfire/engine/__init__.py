"""The serving engines: requests join and leave a running batch that shares one KV cache.

`Engine` is `ContiguousEngine`: decode slots over a contiguous `[slots, max_len]` cache, the engine
measured on GPUs. `PagedEngine` serves from a paged KV cache with a token-budget scheduler (chunked
prefill packed with decode) and prefix caching; it is opt-in until a GPU run of `bench/serving.py
--compare` shows it ahead (its steps read tokens back synchronously, and its attention kernel reads
pages at 0.2-0.6 of the contiguous kernel's bandwidth from batch 8 up). Where things are:
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

Engine = ContiguousEngine

__all__ = ["MAX_LOGIT_BIAS", "MAX_TOP_LOGPROBS", "SEED_LIMIT", "ContiguousEngine", "Engine", "EngineError",
           "PagedEngine", "Request", "RequestError", "RequestMetrics", "SlotState", "TokenEvent", "prefill_buckets",
           "slot_buckets"]
