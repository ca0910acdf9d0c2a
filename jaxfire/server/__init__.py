"""python -m jaxfire.server: OpenAI-compatible completions and chat completions over the serving engine.

    POST /v1/completions       {"prompt": "...", "max_tokens": 50, "temperature": 0, "stream": true, ...}
    POST /v1/chat/completions  {"messages": [{"role": "user", "content": "..."}], "max_tokens": 50, ...}
    GET  /v1/models            the one model served
    POST /tokenize, /detokenize  vLLM's: {"prompt": "..."} -> {"tokens": [...]}, {"tokens": [...]} -> {"prompt": "..."}
    GET  /tokenizer_info       the special tokens (lm-eval's tokenizer_backend=remote reads it)
    GET  /health, /version     200 once the engine is up (503 while shutting down); the package version
    GET  /metrics              load, totals and latency histograms in Prometheus' text format

FastAPI on uvicorn; request bodies are pydantic models (`protocol.py`). The fields are OpenAI's:
`prompt` as a string, a list of strings, token ids or a list of id lists; chat `messages`;
`max_tokens` (chat: or `max_completion_tokens`), `temperature`, `top_p`, `seed`, `stop`, `n` (choices
per prompt, each an engine request with seed + j), `stream`, `stream_options.include_usage`, `echo`
(the prompt before the completion, with its tokens' log-probabilities from the model's forward pass:
lm-evaluation-harness's loglikelihood requests), `logprobs` (completions' N or chat's `top_logprobs`
N, up to 20 alternatives per token), `logit_bias` (token ids as strings to numbers in [-100, 100],
at most 300, added to the logits before sampling; the generated tokens' log-probabilities are then
the biased distribution's), `user` (ignored); plus vLLM's `top_k` (-1 or 0: no limit), `ignore_eos`
and `stop_token_ids`. Chat `response_format` other than text and `tools` are refused with a 400
saying so. Chat messages become the prompt through the model's chat template (the checkpoint's, or
`--chat-template FILE`); a chat without `max_tokens` may fill the slot's cache.
A streamed completion is sent as server-sent events, one `data: {json}` chunk per token as the engine
produces it, then `data: [DONE]`.

Limits (`protocol.Limits`), each refused naming it: 16 stop strings of 256 characters, n <= 16, 64
choices (prompts x n) per request, prompt tokens <= the engine's positions per slot, a body of 16 MiB
(HTTP 413). Beyond `--max-concurrent-requests` generation requests in flight: HTTP 429 with
Retry-After. A request past `--request-timeout` is cancelled (HTTP 504, or an error chunk ending its
stream). A client that disconnects has its requests cancelled, which frees their slots. With
`--api-key` (or JAXFIRE_API_KEY) every route but /health, /metrics and /version needs
`Authorization: Bearer <key>` (HTTP 401 without it). SIGTERM or Ctrl-C drains: new generation
requests get 503, those in flight finish (up to `--shutdown-timeout` seconds), then the process exits 0.
"""

from jaxfire.server.app import CompletionServer
from jaxfire.server.protocol import BadRequest, Call, Limits, chat_call, completion_call

__all__ = ["BadRequest", "Call", "CompletionServer", "Limits", "chat_call", "completion_call"]
