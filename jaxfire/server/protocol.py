"""The OpenAI request bodies the server takes, as pydantic models, and the checks that turn one into a `Call`.

Every refusal is a `BadRequest` (HTTP 400) whose one sentence names the field or limit at fault; the
engine's own checks (temperature, top_p, prompt length, ...) answer the same way when it refuses.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, Strict

from jaxfire.engine import MAX_TOP_LOGPROBS, SEED_LIMIT
from jaxfire.errors import JaxfireError


class BadRequest(JaxfireError):
    pass


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for; each is refused with a 400 naming it."""
    max_body_bytes: int = 1 << 24  # a prompt of a million token ids still fits (beyond it: HTTP 413)
    max_stop_strings: int = 16  # each is checked against the text of every token
    max_stop_chars: int = 256
    max_n: int = 16  # choices per prompt
    max_choices: int = 64  # prompts times n: engine requests one HTTP request may submit
    max_prompt_tokens: int | None = None  # None: the engine's positions per slot


TokenId = Annotated[int, Strict()]  # true is not a token id


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """The fields completions and chat share (OpenAI's, plus vLLM's top_k, ignore_eos, stop_token_ids)."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    n: int | None = 1
    logit_bias: dict[str, Annotated[float, Strict()]] | None = None  # token id (a string, as JSON keys are) -> bias
    user: str | None = None  # accepted and ignored, as vLLM does
    presence_penalty: Annotated[float, Strict()] | None = None  # the engine checks the penalties' ranges
    frequency_penalty: Annotated[float, Strict()] | None = None
    repetition_penalty: Annotated[float, Strict()] | None = None
    min_tokens: Annotated[int, Strict()] | None = None  # vLLM's; the engine checks it against max_tokens


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    echo: bool | None = False
    logprobs: int | None = None  # a bool is checked in completion_call


class ChatBody(_Sampling):
    messages: Any  # checked where the chat template renders them
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Call:
    """One request's body, checked: what to submit and how to answer."""
    prompts: list  # completions: strings or token-id lists; a chat: [messages]
    kwargs: dict  # `Engine.submit` keywords but seed; max_tokens 0: echo only, None: a chat filling its slot
    seeds: list[int]  # one per choice, prompt-major
    n: int
    stream: bool
    usage: bool  # end a stream with a usage chunk
    logprobs: bool
    top_logprobs: int = 0  # alternatives per token
    echo: bool = False
    chat: bool = False
    add_generation_prompt: bool = True


_EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "a string or a list of strings",
    "stop_token_ids": "a list of token ids",
    "logit_bias": "an object of token ids to numbers",
    "stream_options": 'an object such as {"include_usage": true}',
}


def _sentence(error: pydantic.ValidationError) -> str:
    e = error.errors()[0]
    path = [str(p) for p in e["loc"] if not isinstance(p, int)]
    name = path[0] if path else ""
    if not path:
        return "the request body must be a JSON object"
    if e["type"] == "extra_forbidden":
        return f"unsupported field {'.'.join(path)!r}"
    if e["type"] == "missing":
        return f"{name!r} is required"
    if name in _EXPECTED and not (name == "stream_options" and len(path) > 1):  # its own fields name themselves
        return f"{name!r} must be {_EXPECTED[name]}"
    return f"{'.'.join(path[:2])!r}: {e['msg']}"


def parse(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as e:
        raise BadRequest(_sentence(e)) from None


def _count(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise BadRequest(f"'{field}' must be an integer in [0, {MAX_TOP_LOGPROBS}] (alternatives per token), "
                         f"got {value!r}")
    return value


def _common(b: _Sampling, prompts: int, limits: Limits) -> tuple[dict, list[int], int]:
    """`Engine.submit` keywords but max_tokens, a seed per choice, and n."""
    n = 1 if b.n is None else b.n
    if not 1 <= n <= limits.max_n:
        raise BadRequest(f"'n' must be an integer in [1, {limits.max_n}] (the server's limit on choices per prompt), "
                         f"got {n}")
    if prompts * n > limits.max_choices:
        raise BadRequest(f"{prompts} prompts times n={n} make {prompts * n} choices, more than the server's limit "
                         f"of {limits.max_choices} per request")
    stop = [b.stop] if isinstance(b.stop, str) else list(b.stop or ())
    if len(stop) > limits.max_stop_strings:
        raise BadRequest(f"'stop' has {len(stop)} strings, more than the server's limit of {limits.max_stop_strings}")
    if any(len(s) > limits.max_stop_chars for s in stop):
        raise BadRequest(f"a stop string is longer than the server's limit of {limits.max_stop_chars} characters")
    if b.seed is None:  # as OpenAI: unseeded draws differ
        seeds = [random.getrandbits(32) for _ in range(prompts * n)]
    elif not 0 <= b.seed < SEED_LIMIT:
        raise BadRequest(f"'seed' must be an integer in [0, 2**32), got {b.seed}")
    else:  # choice j of each prompt draws from seed + j: a prompt's choices differ, prompts alike agree
        seeds = [(b.seed + j) % SEED_LIMIT for _ in range(prompts) for j in range(n)]
    kwargs = dict(temperature=1.0 if b.temperature is None else b.temperature,
                  top_p=1.0 if b.top_p is None else b.top_p,
                  top_k=0 if b.top_k in (None, -1) else b.top_k, ignore_eos=b.ignore_eos, stop=tuple(stop),
                  stop_token_ids=tuple(b.stop_token_ids or ()))
    kwargs.update({name: getattr(b, name) for name in ("presence_penalty", "frequency_penalty", "repetition_penalty",
                                                       "min_tokens") if getattr(b, name) is not None})
    if b.logit_bias:  # the engine checks the ids against the vocabulary and the biases' range
        kwargs["logit_bias"] = {_token_key(k): v for k, v in b.logit_bias.items()}
    return kwargs, seeds, n


def _token_key(key: str) -> int:
    if not re.fullmatch(r"-?[0-9]{1,18}", key):  # beyond any vocabulary, and int() refuses thousands of digits
        raise BadRequest(f"'logit_bias' keys must be token ids (integers as strings), got {key[:40]!r}")
    return int(key)


def completion_call(body: Any, limits: Limits = Limits()) -> Call:
    """A /v1/completions body checked; raises BadRequest naming the first bad field or limit."""
    if isinstance(body, dict) and isinstance(body.get("logprobs"), bool):
        if body["logprobs"]:
            raise BadRequest(f"'logprobs' must be an integer in [0, {MAX_TOP_LOGPROBS}] (alternatives per token), "
                             "got True")
        body = {**body, "logprobs": None}  # false: none
    b = parse(CompletionBody, body)
    prompt = b.prompt
    prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    if not prompts:
        raise BadRequest("'prompt' is an empty list")
    kwargs, seeds, n = _common(b, len(prompts), limits)
    top = 0 if b.logprobs is None else _count(b.logprobs, "logprobs")
    if top:
        kwargs["top_logprobs"] = top
    # OpenAI's legacy default; 0 with echo scores the prompt alone (without echo the engine refuses it)
    kwargs["max_tokens"] = 16 if b.max_tokens is None else b.max_tokens
    return Call(prompts, kwargs, seeds, n, bool(b.stream), bool(b.stream_options and b.stream_options.include_usage),
                b.logprobs is not None, top, echo=bool(b.echo))


def chat_call(body: Any, limits: Limits = Limits()) -> Call:
    """A /v1/chat/completions body checked; raises BadRequest naming the first bad field or limit."""
    if isinstance(body, dict) and "logprobs" in body and not isinstance(body["logprobs"], (bool, type(None))):
        raise BadRequest("'logprobs' must be true or false")
    b = parse(ChatBody, body)
    fmt = (b.response_format or {}).get("type", "text")
    if fmt != "text":
        raise BadRequest(f"response_format {fmt!r} is not supported: this server cannot constrain replies to JSON; "
                         "ask for JSON in the prompt instead")
    if b.tools or b.tool_choice not in (None, "none"):
        raise BadRequest("tools (function calling) are not supported by this server")
    kwargs, seeds, n = _common(b, 1, limits)
    top = 0
    if b.top_logprobs is not None:
        if not b.logprobs:
            raise BadRequest("'top_logprobs' needs 'logprobs': true")
        top = kwargs["top_logprobs"] = _count(b.top_logprobs, "top_logprobs")
    kwargs["max_tokens"] = b.max_completion_tokens if b.max_completion_tokens is not None else b.max_tokens
    return Call([b.messages], kwargs, seeds, n, bool(b.stream),
                bool(b.stream_options and b.stream_options.include_usage), bool(b.logprobs), top, chat=True,
                add_generation_prompt=b.add_generation_prompt)


class TokenizeBody(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: Any = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[TokenId] = Field(...)
