"""The ASGI application and its uvicorn server: routes, admission, and the bridge from engine to event loop.

The engine's scheduling thread hands each token to the event loop (`on_token` ->
`loop.call_soon_threadsafe`), so a thousand open streams cost a thousand queues, not a thousand threads.
A request whose client leaves is cancelled, which frees its slot at the engine's next step.
Admission happens before any route runs (`_Gate`): the API key, draining after SIGTERM (503), the
limit on requests in flight (429 with Retry-After) and the body size (413).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hmac
import json
import signal
import socket
import threading
import time
import uuid
from typing import Any, AsyncIterator

import uvicorn
from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

import jaxfire
from jaxfire import metrics
from jaxfire.chat import ChatTemplate
from jaxfire.engine import Engine, EngineError, Request, TokenEvent
from jaxfire.errors import JaxfireError
from jaxfire.server import protocol
from jaxfire.server.protocol import BadRequest, Call, Limits
from jaxfire.server.scoring import prompt_logprobs

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                503: "service_unavailable", 504: "timeout"}
# The engine's finish reasons as OpenAI's: a stop string, a stop id and EOS all "stop".
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
_GENERATE = ("/v1/completions", "/v1/chat/completions")
_OPEN = ("/health", "/metrics", "/version")  # no API key needed


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"),
                                   "code": status}}, status, headers=headers)


class _Timeout(JaxfireError):
    pass


class _Gate:
    """ASGI middleware admitting a request before its route runs."""

    def __init__(self, app: Any, server: "CompletionServer"):
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        server, path = self.server, scope["path"]
        headers = dict(scope["headers"])
        if server.api_key is not None and path not in _OPEN:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {server.api_key}".encode()):
                return await error(401, "this server needs an API key: send the header "
                                        "'Authorization: Bearer <key>'")(scope, receive, send)
        if path not in _GENERATE or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if server.draining:
            return await error(503, "the server is shutting down", {"Retry-After": "5"})(scope, receive, send)
        if server.in_flight >= server.max_concurrent_requests:
            return await error(429, f"the server is at its limit of {server.max_concurrent_requests} requests in "
                                    "flight (--max-concurrent-requests): retry shortly",
                               {"Retry-After": "1"})(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > server.limits.max_body_bytes:
            return await error(413, f"the request body has {int(length)} bytes, more than the "
                                    f"{server.limits.max_body_bytes} accepted")(scope, receive, send)
        server.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            server.in_flight -= 1


class _Uvicorn(uvicorn.Server):
    """uvicorn, with SIGTERM (and Ctrl-C) starting a drain instead of an immediate stop, and the process
    exiting normally afterwards (uvicorn's own handler re-raises the signal once stopped)."""

    def __init__(self, config: uvicorn.Config, owner: "CompletionServer"):
        super().__init__(config)
        self.owner = owner

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.owner.draining:  # a second signal: stop now
            self.should_exit = self.force_exit = True
        else:
            self.owner.drain()

    async def on_tick(self, counter: int) -> bool:
        return await super().on_tick(counter) or self.owner.drained()


class _Stream(StreamingResponse):
    """Server-sent events whose requests are cancelled however the response ends: also when the client
    leaves before the first chunk, where the generator never starts and its own cleanup never runs."""

    def __init__(self, content: AsyncIterator[bytes], reqs: list[Request]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._reqs = reqs

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for r in self._reqs:
                r.cancel()  # no effect once finished


class CompletionServer:
    """The HTTP server over a started engine. `chat_template` replaces the tokenizer's own for chat
    completions; with `api_key`, every route but /health, /metrics and /version needs it as a bearer
    token. The socket is bound here (port 0: any free one, see `server_address`); `run()` serves in the
    calling thread until SIGTERM has drained it, `serve_in_thread()` in a thread until `shutdown()`."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8000, model_name: str = "jaxfire",
                 verbose: bool = False, chat_template: ChatTemplate | None = None, api_key: str | None = None, *,
                 max_concurrent_requests: int = 512, request_timeout: float | None = None,
                 shutdown_timeout: float = 30.0, limits: Limits = Limits()):
        self.engine = engine
        self.api_key = api_key or None
        self.model_name = model_name
        self.chat_template = chat_template
        self.max_concurrent_requests = max_concurrent_requests
        self.request_timeout = request_timeout
        self.shutdown_timeout = shutdown_timeout
        prompt_limit = min(engine.max_len, engine.config.max_position_embeddings)
        self.limits = dataclasses.replace(limits, max_prompt_tokens=limits.max_prompt_tokens or prompt_limit)
        self.created = int(time.time())
        self.in_flight = 0  # admitted generation requests not yet answered in full (event loop only)
        self.draining = False
        self._drain_deadline = 0.0
        # Prompt scoring (echo) runs off the event loop, one batch at a time.
        self._scorer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxfire-score")
        self.socket = socket.create_server((host, port), backlog=4096)
        self.server_address = self.socket.getsockname()
        self.app = self._routes(FastAPI(title="jaxfire", version=jaxfire.__version__, docs_url=None,
                                        redoc_url=None, openapi_url=None))
        config = uvicorn.Config(_Gate(self.app, self), log_level="info" if verbose else "warning",
                                access_log=verbose, backlog=4096, lifespan="off", timeout_graceful_shutdown=5,
                                timeout_keep_alive=5)
        self._uvicorn = _Uvicorn(config, self)
        self._thread: threading.Thread | None = None

    # ----- lifecycle -----

    def run(self) -> None:
        """Serves until a drain ends (SIGTERM, then in-flight requests done or `shutdown_timeout` gone)."""
        self._uvicorn.run(sockets=[self.socket])

    def serve_in_thread(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.run, name="jaxfire-server", daemon=True)
        self._thread.start()
        while not self._uvicorn.started and self._thread.is_alive():
            time.sleep(0.01)
        return self._thread

    def drain(self) -> None:
        """Stops admitting generation requests (503); the server exits once those in flight are done."""
        self.draining = True
        self._drain_deadline = time.monotonic() + self.shutdown_timeout

    def drained(self) -> bool:
        return self.draining and (self.in_flight == 0 or time.monotonic() > self._drain_deadline)

    def shutdown(self) -> None:
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join()

    def server_close(self) -> None:
        self.socket.close()
        self._scorer.shutdown(wait=False, cancel_futures=True)

    # ----- prompts -----

    def chat_ids(self, messages: Any, add_generation_prompt: bool) -> list[int]:
        """The prompt's token ids for chat messages; raises a JaxfireError naming what is missing or wrong."""
        tok = self.engine.model.tokenizer
        if tok is None:
            raise BadRequest("this model has no tokenizer, so it cannot take chat messages")
        template = self.chat_template or tok.chat_template
        if template is None:
            raise BadRequest("this model has no chat template: start the server with --chat-template FILE "
                             "(a Jinja template), or use /v1/completions")
        return tok.encode_chat(messages, add_generation_prompt, template)

    def room(self, prompt_tokens: int) -> int:
        """New tokens a prompt of this length leaves room for in a slot."""
        limit = min(self.engine.max_len, self.engine.config.max_position_embeddings)
        if prompt_tokens >= limit:
            raise BadRequest(f"the chat prompt has {prompt_tokens} tokens, which leaves no room for a reply in the "
                             f"engine's {limit} positions per slot")
        return limit - prompt_tokens

    def _prompt_ids(self, call: Call) -> list[list[int]]:
        """Each prompt's token ids, checked against the vocabulary and the prompt-token limit."""
        tok = self.engine.model.tokenizer
        out = []
        for p in call.prompts:
            if call.chat:
                ids = self.chat_ids(p, call.add_generation_prompt)
            elif isinstance(p, str):
                if tok is None:
                    raise BadRequest("this model has no tokenizer: send the prompt as a list of token ids")
                ids = tok.encode(p)
            else:
                ids = list(p)
            if not ids:
                raise BadRequest("the prompt is empty")
            vocab = self.engine.config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise BadRequest(f"the prompt has token id {bad[0]} outside the vocabulary [0, {vocab})")
            if len(ids) > self.limits.max_prompt_tokens and not call.chat:  # a chat's: room() says it
                raise BadRequest(f"the prompt has {len(ids)} tokens, more than the server's limit of "
                                 f"{self.limits.max_prompt_tokens} prompt tokens")
            out.append(ids)
        return out

    def _text(self, i: int) -> str:
        tok = self.engine.model.tokenizer
        return tok.decode([i], skip_special_tokens=False) if tok is not None else str(i)

    # ----- the engine, bridged -----

    def _submit(self, call: Call, prompts: list[list[int]], queue: asyncio.Queue) -> list[Request]:
        """One engine request per choice (prompt-major); each token reaches `queue` as (choice, event)."""
        loop = asyncio.get_running_loop()
        kwargs = dict(call.kwargs)
        reqs: list[Request] = []
        try:
            for ids in prompts:
                if call.chat and kwargs["max_tokens"] is None:
                    kwargs["max_tokens"] = self.room(len(ids))
                if kwargs["max_tokens"] == 0 and call.echo:
                    continue  # the prompt scored alone
                for _ in range(call.n):
                    k = len(reqs)
                    reqs.append(self.engine.submit(
                        ids, **kwargs, seed=call.seeds[k],
                        on_token=lambda event, k=k: loop.call_soon_threadsafe(queue.put_nowait, (k, event))))
        except BaseException:
            for r in reqs:
                r.cancel()
            raise
        return reqs

    async def _events(self, reqs: list[Request], queue: asyncio.Queue,
                      deadline: float | None) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(choice, event) until every choice has finished. A request the engine failed raises
        EngineError; one past `deadline` raises _Timeout. Leaving early cancels the unfinished ones."""
        loop = asyncio.get_running_loop()
        left = len(reqs)
        try:
            while left:
                wait = 1.0 if deadline is None else min(1.0, deadline - loop.time())
                try:
                    k, event = await asyncio.wait_for(queue.get(), max(wait, 0.0))
                except TimeoutError:
                    if deadline is not None and loop.time() >= deadline:
                        raise _Timeout(f"the request did not finish within the server's --request-timeout of "
                                       f"{self.request_timeout:g} s") from None
                    failed = [r for r in reqs if r.finish_reason in ("error", "cancelled")]
                    if failed:  # no finishing event comes for these
                        r = failed[0]
                        raise EngineError(f"request {r.id} ended ({r.finish_reason}): {r.error or 'engine closed'}")
                    continue
                yield k, event
                left -= event.finished
        finally:
            for r in reqs:
                r.cancel()  # no effect once finished

    async def _scores(self, call: Call, prompts: list[list[int]]) -> list[tuple[list, list]]:
        if not call.echo:
            return []
        return await asyncio.get_running_loop().run_in_executor(
            self._scorer, prompt_logprobs, self.engine.model, prompts, call.top_logprobs)

    # ----- responses -----

    def _logprobs(self, call: Call, tokens: list[int], values: list[float | None], tops: list | None,
                  offset: int, lengths: list[int]) -> dict:
        """OpenAI's logprobs object for these tokens, whose text starts at character `offset` and where
        each adds `lengths` characters (a special token, such as BOS, adds none)."""
        texts = [self._text(t) for t in tokens]
        if call.chat:
            return {"content": [{"token": t, "logprob": v, "bytes": list(t.encode()),
                                 "top_logprobs": [{"token": self._text(i), "logprob": a,
                                                   "bytes": list(self._text(i).encode())} for i, a in top or ()]}
                                for t, v, top in zip(texts, values, tops or [None] * len(texts))]}
        offsets = []
        for n in lengths:
            offsets.append(offset)
            offset += n
        top = None
        if call.top_logprobs:  # alternatives by their text, as OpenAI lists them, most likely first
            top = []
            for alternatives in tops:
                if alternatives is None:  # a prompt's first token has none
                    top.append(None)
                    continue
                by_text: dict[str, float] = {}
                for i, v in alternatives:
                    by_text.setdefault(self._text(i), v)  # ids that decode alike: the likelier one's value
                top.append(by_text)
        return {"tokens": texts, "token_logprobs": values, "top_logprobs": top, "text_offset": offsets}

    def _echo(self, call: Call, prompt: Any, ids: list[int], scores: tuple[list, list]) -> tuple[str, dict | None]:
        """A prompt's echoed text and its tokens' logprobs (the first token has none)."""
        tok = self.engine.model.tokenizer
        text = prompt if isinstance(prompt, str) else (tok.decode(ids) if tok is not None else "")
        if not call.logprobs:
            return text, None
        values, tops = scores
        lengths = [len(tok.decode([i])) if tok is not None else 0 for i in ids]
        return text, self._logprobs(call, ids, [None, *values], [None, *tops] if call.top_logprobs else None, 0,
                                    lengths)

    def _choice(self, call: Call, k: int, text: str, finish: str | None, logprobs: dict | None,
                first: bool = False) -> dict:
        if not call.chat:
            return {"index": k, "text": text, "finish_reason": finish, "logprobs": logprobs}
        if call.stream:
            message = {"delta": {"role": "assistant", "content": text} if first else {"content": text}}
        else:
            message = {"message": {"role": "assistant", "content": text}}
        return {"index": k, **message, "finish_reason": finish, "logprobs": logprobs}

    def _envelope(self, call: Call, rid: str, choices: list[dict]) -> dict:
        if call.chat:
            kind = "chat.completion.chunk" if call.stream else "chat.completion"
            return {"id": f"chatcmpl-{rid}", "object": kind, "created": self.created, "model": self.model_name,
                    "choices": choices}
        return {"id": f"cmpl-{rid}", "object": "text_completion", "created": self.created, "model": self.model_name,
                "choices": choices}

    @staticmethod
    def _usage(prompts: list[list[int]], reqs: list[Request]) -> dict:
        prompt = sum(map(len, prompts))
        done = sum(len(r.metrics.token_times) for r in reqs)  # ids generated, an ending EOS or stop id included
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    async def _generate(self, http: HttpRequest, call: Call) -> Response:
        prompts = self._prompt_ids(call)
        queue: asyncio.Queue = asyncio.Queue()
        reqs = self._submit(call, prompts, queue)
        loop = asyncio.get_running_loop()
        deadline = None if self.request_timeout is None else loop.time() + self.request_timeout
        rid = uuid.uuid4().hex
        echo_only = not reqs
        choices = [(i, j) for i in range(len(prompts)) for j in range(call.n)]  # choice k: (prompt, sample)
        if call.stream:
            return _Stream(self._stream(call, prompts, reqs, queue, deadline, rid, echo_only, choices), reqs)

        async def whole() -> Response:
            scores = await self._scores(call, prompts)
            events: list[list[TokenEvent]] = [[] for _ in choices]
            if not echo_only:
                async for k, event in self._events(reqs, queue, deadline):
                    events[k].append(event)
            out = []
            for k, (i, _) in enumerate(choices):
                text, lp, finish = "", None, "length"
                if call.echo:
                    text, lp = self._echo(call, call.prompts[i], prompts[i], scores[i])
                if not echo_only:
                    r = reqs[k]
                    output = events[k][:len(r.tokens)]  # not an ending EOS or stop id
                    gen = self._logprobs(call, [e.token for e in output], [e.logprob for e in output],
                                         [e.top_logprobs for e in output], len(text),
                                         [len(e.text or "") for e in output]) if call.logprobs else None
                    lp = gen if lp is None else _joined(lp, gen)
                    text += "".join(e.text or "" for e in events[k])
                    # The last event's reason: the request's own field is set only after its callback ran.
                    reason = events[k][-1].finish_reason
                    finish = _FINISH.get(reason, reason)
                out.append(self._choice(call, k, text, finish, lp))
            return JSONResponse({**self._envelope(call, rid, out), "usage": self._usage(prompts, reqs)})

        # A client that leaves before the answer is whole: stop working for it.
        answer = asyncio.ensure_future(whole())
        left = asyncio.ensure_future(_disconnected(http))
        try:
            await asyncio.wait({answer, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
            if not answer.done():
                answer.cancel()
                for r in reqs:
                    r.cancel()
        if answer.cancelled():
            return Response(status_code=499)  # never read
        return answer.result()

    async def _stream(self, call: Call, prompts: list[list[int]], reqs: list[Request], queue: asyncio.Queue,
                      deadline: float | None, rid: str, echo_only: bool, choices: list) -> AsyncIterator[bytes]:
        def sse(payload: dict | str) -> bytes:
            return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()

        try:
            offsets = [0] * len(choices)
            if call.echo:
                scores = await self._scores(call, prompts)
                for k, (i, _) in enumerate(choices):
                    text, lp = self._echo(call, call.prompts[i], prompts[i], scores[i])
                    offsets[k] = len(text)
                    yield sse(self._envelope(call, rid, [self._choice(call, k, text, "length" if echo_only else None,
                                                                      lp)]))
            seen = [0] * len(choices)
            if not echo_only:
                async for k, event in self._events(reqs, queue, deadline):
                    # An ending EOS or stop id is not output (req.tokens stops short of it), nor listed.
                    listed = call.logprobs and seen[k] < len(reqs[k].tokens)
                    lp = self._logprobs(call, [event.token], [event.logprob], [event.top_logprobs],
                                        offsets[k], [len(event.text or "")]) if listed else None
                    offsets[k] += len(event.text or "")
                    finish = _FINISH.get(event.finish_reason) if event.finished else None
                    yield sse(self._envelope(call, rid, [self._choice(call, k, event.text or "", finish, lp,
                                                                      first=seen[k] == 0)]))
                    seen[k] += 1
            if call.usage:
                yield sse({**self._envelope(call, rid, []), "usage": self._usage(prompts, reqs)})
        except (EngineError, _Timeout) as e:  # the engine failed this request mid-stream: say so, then end
            status = 504 if isinstance(e, _Timeout) else 500
            yield sse({"error": {"message": str(e), "type": _ERROR_TYPES.get(status, "server_error"), "code": status}})
        finally:  # a client that left (the response is cancelled) frees its slots
            for r in reqs:
                r.cancel()
        yield sse("[DONE]")

    # ----- routes -----

    def _routes(self, app: FastAPI) -> FastAPI:
        @app.exception_handler(HTTPException)
        async def http_error(request: HttpRequest, exc: HTTPException) -> Response:
            if exc.status_code == 404:
                return error(404, f"no route {request.url.path}")
            return error(exc.status_code, str(exc.detail))

        @app.exception_handler(JaxfireError)
        async def refused(request: HttpRequest, exc: JaxfireError) -> Response:
            if isinstance(exc, _Timeout):
                return error(504, str(exc))
            if isinstance(exc, EngineError):  # the engine failed, or is closed
                return error(503 if "closed" in str(exc) else 500, str(exc))
            return error(400, str(exc))

        @app.post("/v1/completions")
        async def completions(request: HttpRequest) -> Response:
            return await self._generate(request, protocol.completion_call(await self._json(request), self.limits))

        @app.post("/v1/chat/completions")
        async def chat_completions(request: HttpRequest) -> Response:
            return await self._generate(request, protocol.chat_call(await self._json(request), self.limits))

        @app.get("/v1/models")
        async def models() -> Response:
            return JSONResponse({"object": "list", "data": [
                {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "jaxfire",
                 "max_model_len": self.limits.max_prompt_tokens}]})

        @app.get("/health")
        async def health() -> Response:
            if self.draining:
                return error(503, "the server is shutting down")
            return JSONResponse({"status": "ok"})

        @app.get("/version")
        async def version() -> Response:
            return JSONResponse({"version": jaxfire.__version__})

        @app.get("/metrics")
        async def prometheus() -> Response:
            return PlainTextResponse(metrics.prometheus(self.engine.stats(), self.model_name),
                                     media_type="text/plain; version=0.0.4; charset=utf-8")

        @app.post("/tokenize")
        async def tokenize(request: HttpRequest) -> Response:
            body = protocol.parse(protocol.TokenizeBody, await self._json(request))
            tok = self._tokenizer()
            if (body.prompt is None) == (body.messages is None):
                raise BadRequest("give either 'prompt' or 'messages'")
            ids = (tok.encode(body.prompt, add_special_tokens=body.add_special_tokens) if body.prompt is not None
                   else self.chat_ids(body.messages, body.add_generation_prompt))
            return JSONResponse({"count": len(ids), "max_model_len": self.limits.max_prompt_tokens, "tokens": ids})

        @app.post("/detokenize")
        async def detokenize(request: HttpRequest) -> Response:
            body = protocol.parse(protocol.DetokenizeBody, await self._json(request))
            vocab = self.engine.config.vocab_size
            bad = [t for t in body.tokens if not 0 <= t < vocab]
            if bad:
                raise BadRequest(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
            return JSONResponse({"prompt": self._tokenizer().decode(body.tokens)})

        @app.get("/tokenizer_info")
        async def tokenizer_info() -> Response:  # SGLang's route; lm-eval's tokenizer_backend=remote reads it
            tok, cfg = self._tokenizer(), self.engine.config
            name = lambda i: None if i is None else tok.decode([i], skip_special_tokens=False)  # noqa: E731
            eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
            return JSONResponse({"eos_token": name(eos), "bos_token": name(cfg.bos_token_id),
                                 "pad_token": name(cfg.pad_token_id), "model_max_length": self.limits.max_prompt_tokens})

        return app

    def _tokenizer(self):
        if self.engine.model.tokenizer is None:
            raise BadRequest("this model has no tokenizer")
        return self.engine.model.tokenizer

    async def _json(self, request: HttpRequest) -> Any:
        """The body as JSON, read up to the size limit (a body without Content-Length is counted)."""
        limit, data = self.limits.max_body_bytes, bytearray()
        async for piece in request.stream():
            data += piece
            if len(data) > limit:
                raise HTTPException(413, f"the request body has more than the {limit} bytes accepted")
        try:
            return json.loads(data or b"null")
        except ValueError as e:
            raise BadRequest(f"the request body is not JSON: {e}") from None


def _joined(echoed: dict, generated: dict) -> dict:
    """Completions' logprobs of an echoed prompt followed by those of its completion."""
    return {key: None if echoed[key] is None else echoed[key] + generated[key] for key in echoed}


async def _disconnected(http: HttpRequest) -> None:
    """Returns once the client has hung up."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return
