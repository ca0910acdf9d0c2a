"""The serving engines: requests join and leave a running batch that shares one KV cache.

`Engine` is the engine over a paged KV cache (`paged.py`); `ContiguousEngine` keeps a contiguous
`[slots, max_len]` cache, the behaviour the paged engine is measured against. Where things are:
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
from jaxfire.engine.paged import Engine
from jaxfire.engine.requests import (MAX_TOP_LOGPROBS, SEED_LIMIT, EngineError, Request, RequestError,
                                     RequestMetrics, TokenEvent)

__all__ = ["MAX_TOP_LOGPROBS", "SEED_LIMIT", "ContiguousEngine", "Engine", "EngineError", "Request", "RequestError",
           "RequestMetrics", "SlotState", "TokenEvent", "prefill_buckets", "slot_buckets"]
