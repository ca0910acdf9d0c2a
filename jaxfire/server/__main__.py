"""The command: python -m jaxfire.server --checkpoint DIR [--port 8000] ..."""

from __future__ import annotations

import argparse
import os

from jaxfire.chat import ChatTemplate
from jaxfire.compile_cache import add_compile_cache_flags, enable_from_flags
from jaxfire.engine.flags import add_engine_flags, check_engine_flags, make_engine


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxfire.server",
                                description="OpenAI-compatible completions and chat completions over the serving "
                                            "engine")
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
                   help="require this key as 'Authorization: Bearer <key>' (default: JAXFIRE_API_KEY, else none)")
    p.add_argument("--model-name", default=None, help="the name /v1/models reports (default: the checkpoint's)")
    p.add_argument("--max-concurrent-requests", type=int, default=512,
                   help="generation requests in flight at once; beyond: HTTP 429 with Retry-After")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds a generation request may take, queueing included (default: no limit)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for requests in flight before stopping")
    add_engine_flags(p)
    p.add_argument("--no-warmup", action="store_true", help="compile on first use instead of before serving")
    p.add_argument("--compile-workers", type=int, default=1,
                   help="threads compiling the paged engine's steps side by side at warm-up (default 1)")
    add_compile_cache_flags(p)
    p.add_argument("--verbose", action="store_true", help="log every HTTP request")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.slots < 1 or args.max_len < 2:
        parser.error("--slots must be at least 1 and --max-len at least 2")
    if not 0 <= args.port < 65536:
        parser.error("--port must be in [0, 65535] (0: any free port)")
    if args.max_concurrent_requests < 1:
        parser.error("--max-concurrent-requests must be at least 1")
    if (args.request_timeout is not None and not args.request_timeout > 0) or not args.shutdown_timeout >= 0:
        parser.error("--request-timeout must be positive and --shutdown-timeout at least 0")
    check_engine_flags(parser, args)
    if args.compile_workers < 1:
        parser.error("--compile-workers must be at least 1")
    if args.contiguous and args.compile_workers != 1:
        parser.error("--compile-workers is the paged engine's: leave out --contiguous")
    enable_from_flags(args)

    import jaxfire  # deferred so that usage errors come back fast
    from jaxfire.server.app import CompletionServer
    from jaxfire.sharding import mesh_from_spec

    try:
        chat_template = None if args.chat_template is None else ChatTemplate.from_file(args.chat_template)
        mesh = None if args.mesh is None else mesh_from_spec(args.mesh)
        model = jaxfire.load(args.checkpoint, dtype=args.dtype, num_experts_per_tok=args.experts_per_token,
                             kv_cache_dtype=args.kv_cache_dtype, mesh=mesh, progress=True)
        engine = make_engine(args, model, args.slots, min(args.max_len, model.config.max_position_embeddings))
    except jaxfire.JaxfireError as e:
        parser.exit(1, f"error: {e}\n")
    if chat_template is not None and model.tokenizer is not None:
        chat_template = model.bind_chat_template(chat_template)
    if not args.no_warmup:
        from tqdm.auto import tqdm

        print("compiling every step (--no-warmup skips) ...", flush=True)
        bar = lambda programs: tqdm(programs, desc="compiling", unit="program")  # noqa: E731
        if args.contiguous:
            engine.warmup(progress=bar)
        else:
            engine.warmup(progress=bar, compile_workers=args.compile_workers)
    name = args.model_name or (model.path.name if model.path is not None else "jaxfire")
    try:
        server = CompletionServer(engine.start(), args.host, args.port, name, args.verbose, chat_template,
                                  args.api_key, max_concurrent_requests=args.max_concurrent_requests,
                                  request_timeout=args.request_timeout, shutdown_timeout=args.shutdown_timeout)
    except OSError as e:
        engine.close()
        parser.exit(1, f"error: cannot listen on {args.host}:{args.port}: {e}\n")
    print(f"serving {name} on http://{args.host}:{server.server_address[1]}/v1/completions and "
          "/v1/chat/completions", flush=True)
    try:
        server.run()  # until SIGTERM or Ctrl-C has drained it
    finally:
        server.server_close()
        engine.close()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
