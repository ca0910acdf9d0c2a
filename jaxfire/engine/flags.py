"""The engine's command-line flags, shared by `python -m jaxfire.server` and `python -m jaxfire.generate`:
the paged engine by default with its five flags, the contiguous one with `--contiguous`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from jaxfire.engine.base import EngineBase
from jaxfire.engine.contiguous import ContiguousEngine
from jaxfire.engine.paged import PagedEngine

if TYPE_CHECKING:
    from jaxfire.api import Model


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--contiguous", action="store_true",
                   help="serve from a contiguous [slots, max_len] KV cache, whole prompts one per call "
                        "(jaxfire.ContiguousEngine) instead of the paged engine")
    p.add_argument("--page-size", type=int, help="KV cache positions per page (default 16)")
    p.add_argument("--kv-pages", type=int,
                   help="KV cache pages (default: every slot at its longest, if memory holds it)")
    p.add_argument("--no-prefix-caching", action="store_true", help="reuse no cached prompt pages")
    p.add_argument("--max-batched-tokens", type=int, help="token rows per engine step (default: the engine's)")
    p.add_argument("--max-idle-batched-tokens", type=int,
                   help="token rows of a step in which no request decodes (default: --max-batched-tokens)")


def check_engine_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A usage error for a paged engine's flag given with --contiguous."""
    paged_only = (args.page_size is not None or args.kv_pages is not None or args.no_prefix_caching
                  or args.max_batched_tokens is not None or args.max_idle_batched_tokens is not None)
    if paged_only and args.contiguous:
        parser.error("--page-size, --kv-pages, --no-prefix-caching, --max-batched-tokens and "
                     "--max-idle-batched-tokens are the paged engine's: leave out --contiguous")


def make_engine(args: argparse.Namespace, model: "Model", slots: int, max_len: int) -> EngineBase:
    """The engine the flags ask for."""
    if args.contiguous:
        return ContiguousEngine(model, slots=slots, max_len=max_len)
    given = dict(page_size=args.page_size, kv_pages=args.kv_pages, max_batched_tokens=args.max_batched_tokens,
                 max_idle_batched_tokens=args.max_idle_batched_tokens)
    return PagedEngine(model, slots=slots, max_len=max_len, prefix_caching=not args.no_prefix_caching,
                       **{k: v for k, v in given.items() if v is not None})
