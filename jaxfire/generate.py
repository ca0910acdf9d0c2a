"""python -m jaxfire.generate: generate text with a jaxfire checkpoint (the built-in model by default)."""

from __future__ import annotations

import argparse
import pathlib
import sys
import types


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxfire.generate", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("--checkpoint", help="converted checkpoint directory (default: the built-in model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts-file", help="a text file with one prompt per line (blank lines skipped)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experts-per-token", type=int, help="override the model's experts per token")
    p.add_argument("--dtype", help="float32 | bfloat16 (default: the checkpoint's own)")
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
    if args.experts_per_token is not None and args.experts_per_token < 1:
        parser.error("--experts-per-token must be at least 1")
    if args.prompts_file:
        path = pathlib.Path(args.prompts_file)
        if not path.is_file():
            parser.error(f"--prompts-file {path} does not exist")
        prompts = [line for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            parser.error(f"--prompts-file {path} holds no prompts")
    else:
        prompts = [args.prompt]

    import jaxfire  # deferred so that usage errors come back fast

    try:
        model = jaxfire.load(args.checkpoint, dtype=args.dtype, num_experts_per_tok=args.experts_per_token)
        if model.tokenizer is None:
            raise jaxfire.JaxfireError(f"{model.path} has no tokenizer, so text prompts cannot be encoded")
        streaming = len(prompts) == 1
        stats = jaxfire.Generation(tokens=[[] for _ in prompts], texts=None, finish_reasons=[""] * len(prompts),
                                   prompt_tokens=[])
        if streaming:
            print(prompts[0], end="", flush=True)
        for event in jaxfire.generate_stream(model, prompts, max_new_tokens=args.max_new_tokens,
                                             temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                             stats=stats):
            if streaming:
                print(event.text, end="", flush=True)
        if streaming:
            print()
        else:
            for i, (prompt, toks) in enumerate(zip(prompts, stats.tokens)):
                print(f"--- [{i}] {prompt}{model.tokenizer.decode(toks)}")
    except jaxfire.JaxfireError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"\nprefill: {sum(map(len, stats.prompt_tokens))} tokens in {stats.prefill_seconds * 1e3:.1f} ms "
          f"({stats.prefill_tokens_per_second:.1f} tokens/s, first call includes compilation); "
          f"decode: {stats.decode_tokens_per_second:.1f} tokens/s", file=sys.stderr)
    return 0


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
