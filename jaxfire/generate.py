"""python -m jaxfire.generate: generate text with a jaxfire checkpoint (the built-in model by default)."""

from __future__ import annotations

import argparse
import pathlib
import sys
import types

from jaxfire.compile_cache import add_compile_cache_flags, enable_from_flags
from jaxfire.engine.flags import add_engine_flags, check_engine_flags, make_engine


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxfire.generate", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("--checkpoint", help="converted checkpoint directory (default: the built-in model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts-file", help="a text file with one prompt per line (blank lines skipped)")
    p.add_argument("--chat", action="store_true",
                   help="send each prompt as a user message through the model's chat template")
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system message before each prompt")
    p.add_argument("--chat-template", metavar="FILE",
                   help="with --chat: this Jinja chat template instead of the checkpoint's own")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: no limit)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtracted once from the logit of each token already generated, in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtracted from a generated token's logit per time it was generated, in [-2, 2]")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divides the positive logits (multiplies the negative) of tokens seen in the prompt or "
                        "generated; 1: none")
    p.add_argument("--min-tokens", type=int, default=0,
                   help="generate at least this many tokens before EOS or a stop (vLLM's min_tokens)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a prompt's generation before this text (repeat for several)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experts-per-token", type=int, help="override the model's experts per token")
    p.add_argument("--dtype", help="float32 | bfloat16 | fp8 (default: the checkpoint's own)")
    p.add_argument("--kv-cache-dtype", help="bfloat16 | float32 | fp8 (default: the compute dtype)")
    p.add_argument("--slots", type=int,
                   help="prompts decoded at once (default: all); the rest wait for a free slot")
    p.add_argument("--mesh", help="spread the model over the devices: mesh axis sizes, e.g. tensor=2 or "
                   "expert=4,tensor=2 (default: one device)")
    add_engine_flags(p)
    add_compile_cache_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    if not 0 < args.top_p <= 1:
        parser.error("--top-p must be in (0, 1]")
    if args.top_k < 0:
        parser.error("--top-k must be >= 0 (0: no limit)")
    if any(not text for text in args.stop):
        parser.error("--stop takes a non-empty text")
    if args.experts_per_token is not None and args.experts_per_token < 1:
        parser.error("--experts-per-token must be at least 1")
    if args.slots is not None and args.slots < 1:
        parser.error("--slots must be at least 1")
    if (args.system is not None or args.chat_template is not None) and not args.chat:
        parser.error("--system and --chat-template go with --chat")
    check_engine_flags(parser, args)
    if args.prompts_file:
        path = pathlib.Path(args.prompts_file)
        if not path.is_file():
            parser.error(f"--prompts-file {path} does not exist")
        prompts = [line for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            parser.error(f"--prompts-file {path} holds no prompts")
    else:
        prompts = [args.prompt]
    enable_from_flags(args, file=sys.stderr)  # stdout holds the generated text alone

    import jaxfire  # deferred so that usage errors come back fast
    from jaxfire.chat import ChatTemplate
    from jaxfire.sharding import mesh_from_spec

    try:
        template = None if args.chat_template is None else ChatTemplate.from_file(args.chat_template)
        mesh = None if args.mesh is None else mesh_from_spec(args.mesh)
        model = jaxfire.load(args.checkpoint, dtype=args.dtype, num_experts_per_tok=args.experts_per_token,
                             kv_cache_dtype=args.kv_cache_dtype, mesh=mesh)
        tok = model.tokenizer
        if tok is None:
            raise jaxfire.JaxfireError(f"{model.path} has no tokenizer, so text prompts cannot be encoded")
        if args.chat:
            template = None if template is None else model.bind_chat_template(template)
            system = [] if args.system is None else [{"role": "system", "content": args.system}]
            ids = [tok.encode_chat(system + [{"role": "user", "content": p}], template=template) for p in prompts]
        else:
            ids = [tok.encode(p) for p in prompts]
        need = max(map(len, ids)) + args.max_new_tokens
        engine = make_engine(args, model, min(args.slots or len(prompts), len(prompts)),
                             max(16, 1 << (need - 1).bit_length()))
        requests = []
        for i, p in enumerate(ids):
            try:
                # Prompt i gets seed + i, as in jaxfire.generate: the same tokens either way.
                requests.append(engine.submit(p, max_tokens=args.max_new_tokens, temperature=args.temperature,
                                              top_p=args.top_p, top_k=args.top_k, seed=(args.seed + i) % 2**32,
                                              stop=args.stop, presence_penalty=args.presence_penalty,
                                              frequency_penalty=args.frequency_penalty,
                                              repetition_penalty=args.repetition_penalty,
                                              min_tokens=args.min_tokens))
            except jaxfire.JaxfireError as e:
                raise jaxfire.JaxfireError(f"prompt {i}: {e}") from None
        if len(prompts) == 1:
            print(prompts[0], end="", flush=True)
            for event in requests[0]:
                print(event.text, end="", flush=True)
            print()
        else:
            for i, (prompt, req) in enumerate(zip(prompts, requests)):
                print(f"--- [{i}] {prompt}{model.tokenizer.decode(req.result())}")
        engine.close()
    except jaxfire.JaxfireError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(_summary([r.metrics for r in requests], [len(r.tokens) for r in requests]), file=sys.stderr)
    return 0


def _summary(metrics: list, generated: list[int]) -> str:
    """Time to first token and the decode rate from the requests' timestamps."""
    first = [m.token_times[0] for m in metrics if m.token_times]
    last = [m.token_times[-1] for m in metrics if m.token_times]
    ttft = sum(m.ttft for m in metrics if m.token_times) / max(len(first), 1)
    decode_tokens = sum(generated) - len(first)  # each request's first token comes from its prefill
    decode_s = max(last) - min(first) if first else 0.0
    return (f"\nprefill: {sum(m.prompt_tokens for m in metrics)} tokens, first token after {ttft * 1e3:.1f} ms "
            f"on average (the first call includes compilation); decode: {decode_tokens / max(decode_s, 1e-9):.1f} "
            f"tokens/s")


class _CallableModule(types.ModuleType):
    """`jaxfire.generate` names both the API function and this module; importing the module rebinds
    the package attribute to it, so the module forwards calls to the function."""

    def __call__(self, *args, **kwargs):
        from jaxfire.api import generate

        return generate(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
