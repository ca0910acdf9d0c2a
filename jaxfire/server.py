"""python -m jaxfire.server: OpenAI-compatible completions and chat completions over the serving engine.

    POST /v1/completions       {"prompt": "...", "max_tokens": 50, "temperature": 0, "stream": true, ...}
    POST /v1/chat/completions  {"messages": [{"role": "user", "content": "..."}], "max_tokens": 50, ...}
    GET  /v1/models            the one model served
    GET  /health               200 once the engine is up
    GET  /metrics              load, totals and latency histograms in Prometheus' text format

The request fields are OpenAI's (`prompt` as a string or a list of token ids, or chat `messages`;
`max_tokens` (chat: or `max_completion_tokens`), `temperature`, `top_p`, `seed`, `stop`, `stream`,
`stream_options.include_usage`, `logprobs`: each chosen token's log-probability under the model,
with up to 20 alternatives: completions' `logprobs` N, chat's `top_logprobs` N) plus vLLM's `top_k` (-1 or 0: no limit), `ignore_eos` and `stop_token_ids`, so
that OpenAI clients and vLLM's `benchmark_serving.py` (backends "openai" and "openai-chat") run
against it unchanged. Chat messages become the prompt through the model's chat template (the
checkpoint's, or `--chat-template FILE`); a chat without `max_tokens` may fill the slot's cache. A
streamed completion is sent as server-sent events, one `data: {json}` chunk per token as the engine
produces it, then `data: [DONE]`. Each HTTP request is one engine request: requests from all
connections share the engine's decode slots (continuous batching). A bad request gets HTTP 400 with
OpenAI's error body; a client that disconnects mid-stream has its request cancelled, which frees its
slot. With `--api-key` (or JAXFIRE_API_KEY) the /v1 routes need `Authorization: Bearer <key>` (HTTP
401 without it); /health and /metrics stay open. SIGTERM or Ctrl-C stops the server and the engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import hmac
import http.server
import json
import os
import random
import signal
import threading
import time
from typing import Any

from jaxfire import metrics
from jaxfire.chat import ChatTemplate
from jaxfire.engine import MAX_TOP_LOGPROBS, Engine, EngineError, Request
from jaxfire.errors import JaxfireError

MAX_BODY_BYTES = 1 << 24  # a prompt of a million token ids still fits
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
                413: "invalid_request_error"}
# The engine's finish reasons as OpenAI's: a stop string, a stop id and EOS all "stop".
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
_SAMPLING = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options",
             "ignore_eos", "stop_token_ids", "n", "logprobs", "user"}
_FIELDS = {"/v1/completions": _SAMPLING | {"prompt", "echo"},
           "/v1/chat/completions": _SAMPLING | {"messages", "max_completion_tokens", "top_logprobs",
                                                "add_generation_prompt"}}


class BadRequest(JaxfireError):
    pass


@dataclasses.dataclass(frozen=True)
class Call:
    """One request's body, checked: what to submit and how to answer."""
    prompt: Any  # a string or token ids; for a chat, the messages
    kwargs: dict  # `Engine.submit` keywords; a chat's max_tokens None: as many as the cache holds
    stream: bool
    usage: bool  # end a stream with a usage chunk
    logprobs: bool
    chat: bool = False
    top_logprobs: int = 0  # alternatives per token
    add_generation_prompt: bool = True


def _sampling_args(body: Any, route: str) -> tuple[dict, bool, bool]:
    """`Engine.submit` keywords but max_tokens, whether to stream and whether to end with usage."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS[route])
    if unknown:
        raise BadRequest(f"unsupported field {unknown[0]!r}")
    if body.get("n", 1) != 1 or body.get("echo", False):
        raise BadRequest("n > 1 and echo are not supported")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object")
    top_k, seed = body.get("top_k", 0), body.get("seed")
    kwargs = dict(temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0),
                  top_k=0 if top_k == -1 else top_k,
                  seed=random.getrandbits(32) if seed is None else seed,  # as OpenAI: unseeded draws differ
                  ignore_eos=bool(body.get("ignore_eos", False)), stop=body.get("stop") or (),
                  stop_token_ids=body.get("stop_token_ids") or ())
    return kwargs, bool(body.get("stream", False)), bool(options.get("include_usage", False))


def completion_args(body: Any) -> Call:
    """A /v1/completions body checked; raises BadRequest naming the first bad field."""
    kwargs, stream, usage = _sampling_args(body, "/v1/completions")
    logprobs = None if body.get("logprobs") is False else body.get("logprobs")
    if logprobs is not None:
        kwargs["top_logprobs"] = _count(logprobs, "logprobs")
    if "prompt" not in body:
        raise BadRequest("'prompt' is required")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if not isinstance(prompt, (str, list)):
        raise BadRequest("'prompt' must be a string or a list of token ids")
    max_tokens = body.get("max_tokens")
    kwargs["max_tokens"] = 16 if max_tokens is None else max_tokens  # OpenAI's legacy default
    return Call(prompt, kwargs, stream, usage, logprobs is not None, top_logprobs=kwargs.get("top_logprobs", 0))


def chat_args(body: Any) -> Call:
    """A /v1/chat/completions body checked; raises BadRequest naming the first bad field."""
    kwargs, stream, usage = _sampling_args(body, "/v1/chat/completions")
    if not isinstance(body.get("logprobs", False), bool):
        raise BadRequest("'logprobs' must be true or false")
    if body.get("top_logprobs") is not None:
        if not body.get("logprobs"):
            raise BadRequest("'top_logprobs' needs 'logprobs': true")
        kwargs["top_logprobs"] = _count(body["top_logprobs"], "top_logprobs")
    if "messages" not in body:
        raise BadRequest("'messages' is required")
    kwargs["max_tokens"] = body.get("max_completion_tokens", body.get("max_tokens"))
    return Call(body["messages"], kwargs, stream, usage, bool(body.get("logprobs")),
                chat=True, top_logprobs=kwargs.get("top_logprobs", 0),
                add_generation_prompt=bool(body.get("add_generation_prompt", True)))


def _count(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise BadRequest(f"'{field}' must be an integer in [0, {MAX_TOP_LOGPROBS}] (alternatives per token), "
                         f"got {value!r}")
    return value


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "CompletionServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet unless asked
        if self.server.verbose:
            super().log_message(format, *args)

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        kind = _ERROR_TYPES.get(status, "server_error")
        self._json(status, {"error": {"message": message, "type": kind, "code": status}})

    def _authorized(self) -> bool:
        """Whether the request may go on: /v1 routes need the server's API key, where it has one."""
        key = self.server.api_key
        if key is None or not self.path.startswith("/v1/"):
            return True
        if hmac.compare_digest(self.headers.get("Authorization", "").encode(), f"Bearer {key}".encode()):
            return True
        self._error(401, "this server needs an API key: send the header 'Authorization: Bearer <key>'")
        self.close_connection = True  # a body is never read
        return False

    def do_GET(self) -> None:  # noqa: N802 (the http.server hook's name)
        if not self._authorized():
            return
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/metrics":
            data = metrics.prometheus(self.server.engine.stats(), self.server.model_name).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                         "owned_by": "jaxfire"}]})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        if self.path not in _FIELDS:
            self._error(404, f"no route {self.path}")
            return
        try:
            length = int(self.headers.get("Content-Length", 0))
            if length > MAX_BODY_BYTES:
                self._error(413, f"the request body has {length} bytes, more than the {MAX_BODY_BYTES} accepted")
                self.close_connection = True  # its bytes are never read
                return
            body = json.loads(self.rfile.read(length) or b"null")
        except (ValueError, json.JSONDecodeError) as e:
            self._error(400, f"the request body is not JSON: {e}")
            return
        try:
            call = chat_args(body) if self.path == "/v1/chat/completions" else completion_args(body)
            prompt, kwargs = call.prompt, call.kwargs
            if call.chat:
                prompt = self.server.chat_ids(prompt, call.add_generation_prompt)
                if kwargs["max_tokens"] is None:
                    kwargs = {**kwargs, "max_tokens": self.server.room(len(prompt))}
            req = self.server.engine.submit(prompt, **kwargs)
        except JaxfireError as e:
            self._error(400, str(e))
            return
        if call.stream:
            self._stream(req, call)
        else:
            self._complete(req, call)

    def _chunk(self, req: Request, call: Call, text: str, finish: str | None, logprobs: dict | None = None,
               first: bool = False) -> dict:
        """One response object: a whole completion, or a streamed piece of one."""
        if not call.chat:
            return {"id": f"cmpl-{req.id}", "object": "text_completion", "created": self.server.created,
                    "model": self.server.model_name,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}]}
        if call.stream:
            kind, message = "chat.completion.chunk", {"delta": {"role": "assistant", "content": text} if first
                                                      else {"content": text}}
        else:
            kind, message = "chat.completion", {"message": {"role": "assistant", "content": text}}
        return {"id": f"chatcmpl-{req.id}", "object": kind, "created": self.server.created,
                "model": self.server.model_name,
                "choices": [{"index": 0, **message, "finish_reason": finish, "logprobs": logprobs}]}

    def _logprobs(self, call: Call, events: list, offset: int) -> dict:
        """OpenAI's logprobs object for these tokens, whose text starts at character `offset`."""
        tok = self.server.engine.model.tokenizer

        def text(i: int) -> str:
            return tok.decode([i], skip_special_tokens=False) if tok is not None else str(i)

        tokens = [text(e.token) for e in events]
        if call.chat:
            return {"content": [{"token": t, "logprob": e.logprob, "bytes": list(t.encode()),
                                 "top_logprobs": [{"token": text(i), "logprob": v, "bytes": list(text(i).encode())}
                                                  for i, v in e.top_logprobs or ()]}
                                for t, e in zip(tokens, events)]}
        offsets = []
        for e in events:
            offsets.append(offset)
            offset += len(e.text or "")
        top = None
        if call.top_logprobs:  # alternatives by their text, as OpenAI lists them, most likely first
            top = []
            for e in events:
                by_text: dict[str, float] = {}
                for i, v in e.top_logprobs:
                    by_text.setdefault(text(i), v)  # ids that decode alike: the likelier one's value
                top.append(by_text)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in events], "top_logprobs": top,
                "text_offset": offsets}

    def _usage(self, req: Request) -> dict:
        done = len(req.metrics.token_times)  # ids generated, an ending EOS or stop id included
        return {"prompt_tokens": len(req.prompt), "completion_tokens": done, "total_tokens": len(req.prompt) + done}

    def _complete(self, req: Request, call: Call) -> None:
        events = list(req)
        text = "".join(event.text or "" for event in events)
        output = events[:len(req.tokens)]  # not an ending EOS or stop id
        payload = self._chunk(req, call, text, _FINISH.get(req.finish_reason, req.finish_reason),
                              self._logprobs(call, output, 0) if call.logprobs else None)
        payload["usage"] = self._usage(req)
        self._json(200, payload)

    def _stream(self, req: Request, call: Call) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(payload: dict | str) -> None:
            data = f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        try:
            offset = 0
            for i, event in enumerate(req):
                # An ending EOS or stop id is not output (req.tokens stops short of it), nor listed.
                lp = self._logprobs(call, [event], offset) if call.logprobs and i < len(req.tokens) else None
                offset += len(event.text or "")
                send(self._chunk(req, call, event.text or "",
                                 _FINISH.get(event.finish_reason) if event.finished else None, lp, first=i == 0))
            if call.usage:
                send({**self._chunk(req, call, "", None), "choices": [], "usage": self._usage(req)})
            send("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client left: free its slot
            req.cancel()
        except EngineError as e:  # the engine failed this request mid-stream: say so, then end the stream
            send({"error": {"message": str(e), "type": "server_error", "code": 500}})
            send("[DONE]")
            self.wfile.write(b"0\r\n\r\n")


class CompletionServer(http.server.ThreadingHTTPServer):
    """The HTTP server over a started engine; one thread per connection. `chat_template` replaces the
    tokenizer's own for chat completions; with `api_key`, /v1 routes need it as a bearer token."""

    daemon_threads = True

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8000, model_name: str = "jaxfire",
                 verbose: bool = False, chat_template: ChatTemplate | None = None, api_key: str | None = None):
        self.engine = engine
        self.api_key = api_key or None
        self.model_name = model_name
        self.verbose = verbose
        self.chat_template = chat_template
        self.created = int(time.time())
        super().__init__((host, port), _Handler)

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

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="jaxfire-server", daemon=True)
        thread.start()
        return thread


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxfire.server", description=__doc__.split("\n\n")[0].split(": ")[1])
    p.add_argument("--checkpoint", help="converted checkpoint directory (default: the built-in model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the one taken is printed)")
    p.add_argument("--slots", type=int, default=32, help="requests decoded at once")
    p.add_argument("--max-len", type=int, default=2048,
                   help="cache positions per slot, prompt plus new tokens (at most the model's positions)")
    p.add_argument("--dtype", help="float32 | bfloat16 | fp8 (default: the checkpoint's own)")
    p.add_argument("--kv-cache-dtype", help="bfloat16 | float32 | fp8 (default: the compute dtype)")
    p.add_argument("--experts-per-token", type=int, help="override the model's experts per token")
    p.add_argument("--mesh", help="mesh axis sizes over the devices, e.g. tensor=2 (default: one device)")
    p.add_argument("--chat-template", metavar="FILE",
                   help="Jinja chat template for /v1/chat/completions (default: the checkpoint's own)")
    p.add_argument("--api-key", default=os.environ.get("JAXFIRE_API_KEY"),
                   help="require this key as 'Authorization: Bearer <key>' on /v1 routes (default: "
                        "JAXFIRE_API_KEY, else none)")
    p.add_argument("--model-name", default=None, help="the name /v1/models reports (default: the checkpoint's)")
    p.add_argument("--no-warmup", action="store_true", help="compile on first use instead of before serving")
    p.add_argument("--verbose", action="store_true", help="log every HTTP request")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.slots < 1 or args.max_len < 2:
        parser.error("--slots must be at least 1 and --max-len at least 2")
    if not 0 <= args.port < 65536:
        parser.error("--port must be in [0, 65535] (0: any free port)")

    import jaxfire  # deferred so that usage errors come back fast
    from jaxfire.sharding import mesh_from_spec

    try:
        chat_template = None if args.chat_template is None else ChatTemplate.from_file(args.chat_template)
        mesh = None if args.mesh is None else mesh_from_spec(args.mesh)
        model = jaxfire.load(args.checkpoint, dtype=args.dtype, num_experts_per_tok=args.experts_per_token,
                             kv_cache_dtype=args.kv_cache_dtype, mesh=mesh, progress=True)
        engine = jaxfire.Engine(model, slots=args.slots,
                                max_len=min(args.max_len, model.config.max_position_embeddings))
    except jaxfire.JaxfireError as e:
        parser.exit(1, f"error: {e}\n")
    if chat_template is not None and model.tokenizer is not None:
        chat_template = model.bind_chat_template(chat_template)
    if not args.no_warmup:
        print("compiling every step (--no-warmup skips) ...", flush=True)
        engine.warmup()
    name = args.model_name or (model.path.name if model.path is not None else "jaxfire")
    try:
        server = CompletionServer(engine.start(), args.host, args.port, name, args.verbose, chat_template,
                                  args.api_key)
    except OSError as e:
        engine.close()
        parser.exit(1, f"error: cannot listen on {args.host}:{args.port}: {e}\n")
    print(f"serving {name} on http://{args.host}:{server.server_address[1]}/v1/completions and "
          "/v1/chat/completions", flush=True)
    # SIGTERM (a container's stop) ends serve_forever, which must be stopped from another thread.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
