"""The command lines' persistent compilation cache: where it goes, its flags, that JAX writes and reads it
on CPU, and that a cache it cannot write or --no-compile-cache leaves JAX as it was."""

import jax
import jax.numpy as jnp
import pytest
from jax._src import compilation_cache

import jaxfire.generate as generate_cli
from jaxfire import compile_cache
from jaxfire.server import __main__ as server_cli

SETTINGS = ["jax_compilation_cache_dir", *compile_cache._KEEP_EVERY_PROGRAM]
CLIS = {"server": (server_cli._parser, []), "generate": (generate_cli._parser, ["--prompt", "x"])}


def settings() -> dict:
    return {name: jax.config.values[name] for name in SETTINGS}


@pytest.fixture
def jax_config():
    """JAX's cache settings put back and its cache let go after the test; JAX opens the cache once per
    process, at the first compilation after a directory is set."""
    saved = settings()
    compilation_cache.reset_cache()
    yield saved
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture
def env(monkeypatch, tmp_path):
    for name in ("JAXFIRE_CACHE_DIR", "XDG_CACHE_HOME", *map(str.upper, SETTINGS)):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


@pytest.mark.parametrize("variables, want", [
    ({}, "home/.cache/jaxfire/xla"),
    ({"XDG_CACHE_HOME": "{tmp}/xdg"}, "xdg/jaxfire/xla"),
    ({"XDG_CACHE_HOME": "{tmp}/xdg", "JAXFIRE_CACHE_DIR": "{tmp}/mine"}, "mine"),
    ({"XDG_CACHE_HOME": ""}, "home/.cache/jaxfire/xla"),
])
def test_default_dir_is_jaxfire_s_then_xdg_then_home(env, tmp_path, variables, want):
    for name, value in variables.items():
        env.setenv(name, value.format(tmp=tmp_path))
    assert compile_cache.default_dir() == tmp_path / want


@pytest.mark.parametrize("cli", CLIS)
def test_both_command_lines_take_the_flags(cli):
    parser, required = CLIS[cli]
    default = parser().parse_args(required)
    assert default.compile_cache is None and not default.no_compile_cache
    assert parser().parse_args(required + ["--compile-cache", "/c"]).compile_cache == "/c"
    assert parser().parse_args(required + ["--no-compile-cache"]).no_compile_cache
    with pytest.raises(SystemExit):
        parser().parse_args(required + ["--compile-cache", "/c", "--no-compile-cache"])


def test_a_compiled_program_is_written_and_read_back(jax_config, env, tmp_path):
    cache = tmp_path / "made" / "xla"
    assert compile_cache.enable(cache) == str(cache)

    def probe(x):  # [3]
        return jnp.sin(x) * 2 + 1

    x = jnp.arange(3.0)
    jax.jit(probe)(x).block_until_ready()
    entries = [p.name for p in cache.iterdir() if p.name.startswith("jit_probe-")]
    assert len(entries) == 1, sorted(p.name for p in cache.iterdir())

    hits = []
    listener = lambda event, **kwargs: hits.append(event)  # noqa: E731
    jax.monitoring.register_event_listener(listener)
    try:
        jax.clear_caches()  # the next call compiles again, as a fresh process would
        jax.jit(probe)(x).block_until_ready()
    finally:
        jax.monitoring.unregister_event_listener(listener)
    assert "/jax/compilation_cache/cache_hits" in hits


def test_a_directory_that_cannot_be_made_warns_and_leaves_jax_alone(jax_config, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert compile_cache.enable(blocker / "xla") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: no compilation cache") and str(blocker) in err
    assert settings() == jax_config


def test_no_compile_cache_leaves_jax_alone(jax_config, env, tmp_path, capsys):
    env.setenv("JAXFIRE_CACHE_DIR", str(tmp_path / "c"))
    assert compile_cache.enable_from_flags(server_cli._parser().parse_args(["--no-compile-cache"])) is None
    assert settings() == jax_config and not (tmp_path / "c").exists() and capsys.readouterr().out == ""


@pytest.mark.parametrize("flag, jax_own, want", [
    ([], None, "jaxfire"),
    ([], "jax-own", "jax-own"),
    (["--compile-cache", "{tmp}/flag"], "jax-own", "flag"),
])
def test_the_flag_then_jax_s_own_directory_then_the_default(jax_config, env, tmp_path, capsys, flag, jax_own, want):
    env.setenv("JAXFIRE_CACHE_DIR", str(tmp_path / "jaxfire"))
    if jax_own is not None:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / jax_own))
    args = server_cli._parser().parse_args([f.format(tmp=tmp_path) for f in flag])
    assert compile_cache.enable_from_flags(args) == str(tmp_path / want)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / want) and (tmp_path / want).is_dir()
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    assert capsys.readouterr().out == f"compilation cache: {tmp_path / want} (--no-compile-cache turns it off)\n"

