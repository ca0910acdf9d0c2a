"""The persistent XLA compilation cache of `python -m jaxfire.server` and `python -m jaxfire.generate`: a
second start loads the engine's step programs from disk instead of compiling them again. Only those entry
points turn it on; the library leaves JAX's configuration alone."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
from typing import TextIO

import jax

# Every program is kept: a start spends its time on the engine's step programs, and whether a small one
# takes more than JAX's default second to compile depends on the device.
_KEEP_EVERY_PROGRAM = {"jax_persistent_cache_min_compile_time_secs": 0.0,
                       "jax_persistent_cache_min_entry_size_bytes": -1}


def default_dir() -> pathlib.Path:
    """$JAXFIRE_CACHE_DIR, else $XDG_CACHE_HOME/jaxfire/xla, else ~/.cache/jaxfire/xla."""
    if os.environ.get("JAXFIRE_CACHE_DIR"):
        return pathlib.Path(os.environ["JAXFIRE_CACHE_DIR"]).expanduser()
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "jaxfire" / "xla"


def add_compile_cache_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--compile-cache", metavar="DIR",
                       help="keep compiled programs in DIR for the next start (default: JAX_COMPILATION_CACHE_DIR "
                            "if set, else $JAXFIRE_CACHE_DIR, else $XDG_CACHE_HOME/jaxfire/xla or "
                            "~/.cache/jaxfire/xla)")
    group.add_argument("--no-compile-cache", action="store_true",
                       help="no persistent compilation cache: every start compiles every program")


def enable_from_flags(args: argparse.Namespace, file: TextIO | None = None) -> str | None:
    """Turns the cache the flags ask for on and prints its directory to `file` (default: stdout); the
    directory, or None where there is none. JAX's own setting (JAX_COMPILATION_CACHE_DIR) comes before
    the default directory, and JAX_ENABLE_COMPILATION_CACHE=false turns the cache off as --no-compile-cache
    does; --no-compile-cache leaves JAX's configuration as it is."""
    if args.no_compile_cache or not jax.config.jax_enable_compilation_cache:
        return None
    path = enable(args.compile_cache or jax.config.jax_compilation_cache_dir or default_dir())
    if path is not None:
        print(f"compilation cache: {path} (--no-compile-cache turns it off)", file=file or sys.stdout, flush=True)
    return path


def enable(path: str | os.PathLike) -> str | None:
    """Turns JAX's persistent compilation cache on in `path`, made if missing, keeping every program (where
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS or JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES is set, that
    setting stays). Returns the directory, or None after one warning line on stderr where it cannot be made
    or written: a start never fails for want of a cache."""
    path = pathlib.Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        print(f"warning: no compilation cache, every program compiles: cannot write to {path} "
              f"({e.strerror or e})", file=sys.stderr, flush=True)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    for name, value in _KEEP_EVERY_PROGRAM.items():
        if name.upper() not in os.environ:
            jax.config.update(name, value)
    return str(path)
