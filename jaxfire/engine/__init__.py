"""The serving engine: requests join and leave a running batch that shares one KV cache.

Where things are:
- `requests.py`: a request's handle (`Request`), what it streams (`TokenEvent`) and its timings
  (`RequestMetrics`), and the errors an engine raises;
- `base.py`: what every engine shares: submission and its checks, the background thread, streaming
  tokens to their requests, ending them, the stats;
- `sampler.py`: the sampling programs every step ends with (per-request streams, log-probabilities);
- `contiguous.py`: the engine over a contiguous `[slots, max_len]` cache and its device programs.
"""

from jaxfire.engine.contiguous import ContiguousEngine, SlotState, prefill_buckets, slot_buckets
from jaxfire.engine.requests import (MAX_TOP_LOGPROBS, SEED_LIMIT, EngineError, Request, RequestError,
                                     RequestMetrics, TokenEvent)

Engine = ContiguousEngine

__all__ = ["MAX_TOP_LOGPROBS", "SEED_LIMIT", "ContiguousEngine", "Engine", "EngineError", "Request", "RequestError",
           "RequestMetrics", "SlotState", "TokenEvent", "prefill_buckets", "slot_buckets"]
