"""The public API and the CLI: the built-in model, streaming, and errors a user can cause."""

import subprocess
import sys

import numpy as np
import pytest

import jaxfire
from jaxfire import checkpoint


@pytest.fixture(scope="module")
def builtin():
    return jaxfire.load()


def test_builtin_model_loads_and_generates_text(builtin):
    assert builtin.tokenizer is not None
    result = jaxfire.generate(builtin, "def fibonacci(n):", max_new_tokens=6)
    assert len(result.tokens) == 1 and 1 <= len(result.tokens[0]) <= 6
    assert isinstance(result.texts[0], str)
    assert result.finish_reasons[0] in ("eos", "length")


def test_stream_yields_the_same_tokens_as_generate(builtin):
    prompts = ["import os", "class A:"]
    result = jaxfire.generate(builtin, prompts, max_new_tokens=7, temperature=0.8, top_p=0.9, seed=3)
    streamed = [[], []]
    finished = [0, 0]
    for ev in jaxfire.generate_stream(builtin, prompts, max_new_tokens=7, temperature=0.8, top_p=0.9, seed=3):
        assert not finished[ev.index], "no event after a prompt finished"
        if ev.finish_reason != "eos":
            streamed[ev.index].append(ev.token)
        finished[ev.index] = ev.finished
    assert streamed == result.tokens and all(finished)


def test_generate_takes_logit_bias(builtin):
    """+100 on one id makes it every token of every prompt, greedy or sampled; the other arguments
    run as without it."""
    forced = 1234
    result = jaxfire.generate(builtin, ["import os", "class A:"], max_new_tokens=4, logit_bias={forced: 100.0})
    assert result.tokens == [[forced] * 4, [forced] * 4]
    sampled = jaxfire.generate(builtin, "x = ", max_new_tokens=3, temperature=1.0, seed=5, logit_bias={forced: 100})
    assert sampled.tokens == [[forced] * 3]


def test_generate_takes_sampling_penalties(builtin):
    """The penalties reach each prompt's request: a strong repetition penalty leaves no id repeated in a
    greedy reply where the plain one repeats, and equals the engine's own reply under it."""
    plain = jaxfire.generate(builtin, "class Stack:", max_new_tokens=24).tokens[0]
    assert len(set(plain)) < len(plain)
    result = jaxfire.generate(builtin, "class Stack:", max_new_tokens=24, repetition_penalty=1e4,
                              presence_penalty=2.0, frequency_penalty=2.0)
    ids = builtin.tokenizer.encode("class Stack:")
    with jaxfire.Engine(builtin, slots=1, max_len=64) as engine:
        want = engine.submit(ids, max_tokens=24, repetition_penalty=1e4, presence_penalty=2.0,
                             frequency_penalty=2.0).result(timeout=120)
    assert result.tokens[0] == want and len(set(want)) == len(want)


def test_dtype_override(builtin):
    model = jaxfire.load(dtype="float32")
    assert model.params.embed.dtype == np.float32 and builtin.params.embed.dtype == "bfloat16"
    with pytest.raises(jaxfire.JaxfireError, match="unsupported dtype 'int8'; choose one of .*fp8"):
        jaxfire.load(dtype="int8")


@pytest.mark.parametrize("kwargs, prompts, message", [
    ({"max_new_tokens": 0}, ["x"], "max_new_tokens"),
    ({"max_new_tokens": 2, "temperature": -1.0}, ["x"], "temperature"),
    ({"max_new_tokens": 2, "top_p": 0.0}, ["x"], "top_p"),
    ({"max_new_tokens": 2, "top_k": -3}, ["x"], "top_k must be an integer >= 0"),
    ({"max_new_tokens": 2, "stop_token_ids": [99999]}, ["x"], "stop_token_ids has 99999"),
    ({"max_new_tokens": 2}, [[1, 2], []], "prompt 1 is empty"),
    ({"max_new_tokens": 2}, [[1, 99999]], "token id 99999 outside the vocabulary"),
    ({"max_new_tokens": 2}, [], "no prompts"),
    ({"max_new_tokens": 1000}, ["x" * 10], "exceeds the model's 512 positions"),
    ({"max_new_tokens": 2, "logit_bias": {5: 500.0}}, ["x"], "logit_bias"),
    ({"max_new_tokens": 2, "repetition_penalty": -1.0}, ["x"], "repetition_penalty must be a number above 0"),
])
def test_generate_rejects_bad_input(builtin, kwargs, prompts, message):
    with pytest.raises(jaxfire.JaxfireError, match=message):
        jaxfire.generate(builtin, prompts, **kwargs)


def test_text_prompt_needs_a_tokenizer(builtin):
    model = jaxfire.Model(config=builtin.config, params=builtin.params, tokenizer=None)
    with pytest.raises(jaxfire.JaxfireError, match="no tokenizer"):
        jaxfire.generate(model, "hello", max_new_tokens=2)
    assert len(jaxfire.generate(model, [[1, 5, 6]], max_new_tokens=2).tokens[0]) >= 1


def test_load_errors_name_the_path(tmp_path, hf_model_dir):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        jaxfire.load(tmp_path / "missing")
    with pytest.raises(checkpoint.CheckpointError, match="convert it with"):
        jaxfire.load(hf_model_dir("gqa"))


def test_version_1_checkpoints_are_refused_with_the_fix(tmp_path):
    """Format 1 stored the experts' gate/up as [E, 2F, D]; reading it is refused in one sentence."""
    import json
    import shutil

    old = tmp_path / "v1"
    shutil.copytree(jaxfire.api.BUILTIN_DIR, old)
    meta = json.loads((old / checkpoint.FORMAT_FILE).read_text())
    (old / checkpoint.FORMAT_FILE).write_text(json.dumps(dict(meta, format_version=1)))
    with pytest.raises(checkpoint.CheckpointError, match="format version 1 .* convert the checkpoint again"):
        jaxfire.load(old)


def test_generate_module_import_keeps_the_api_function():
    import jaxfire.generate as cli

    assert callable(cli.main)
    assert callable(jaxfire.generate)
    result = jaxfire.generate(jaxfire.load(), [[1, 40, 41]], max_new_tokens=2)
    assert isinstance(result, jaxfire.Generation)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxfire.generate", *args], capture_output=True, text=True)


def test_cli_runs_the_builtin_model(tmp_path):
    out = run_cli("--prompt", "def fibonacci(n):", "--max-new-tokens", "5", "--compile-cache", str(tmp_path / "xla"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("def fibonacci(n):")
    assert "tokens/s" in out.stderr
    # The engine's step programs are in the cache for the next start, and only the generated text on stdout.
    assert f"compilation cache: {tmp_path / 'xla'}" in out.stderr and "compilation cache" not in out.stdout
    assert any(p.name.startswith("jit__step_fn-") for p in (tmp_path / "xla").iterdir())


def test_cli_contiguous_engine_gives_the_default_engines_tokens():
    args = ("--prompt", "def fibonacci(n):", "--max-new-tokens", "6")
    paged = run_cli(*args, "--page-size", "32", "--max-batched-tokens", "32", "--max-idle-batched-tokens", "64")
    contiguous = run_cli(*args, "--contiguous")
    assert paged.returncode == 0 and contiguous.returncode == 0, paged.stderr + contiguous.stderr
    assert paged.stdout == contiguous.stdout and len(paged.stdout) > len("def fibonacci(n):\n")


def test_cli_sampling_penalties():
    """The penalties reach the engine (greedy text changes, and equals the engine's own for them); the
    contiguous engine, which has none, refuses them in one line."""
    args = ("--prompt", "def fibonacci(n):", "--max-new-tokens", "8")
    out = run_cli(*args, "--repetition-penalty", "2.5", "--frequency-penalty", "0.5")
    assert out.returncode == 0, out.stderr
    model = jaxfire.load()
    ids = model.tokenizer.encode("def fibonacci(n):")
    with jaxfire.Engine(model, slots=1, max_len=64) as engine:
        plain = engine.submit(ids, max_tokens=8).result(timeout=120)
        penalized = engine.submit(ids, max_tokens=8, repetition_penalty=2.5, frequency_penalty=0.5).result(timeout=120)
    assert plain != penalized and out.stdout == "def fibonacci(n):" + model.tokenizer.decode(penalized) + "\n"
    refused = run_cli(*args, "--contiguous", "--presence-penalty", "1")
    assert refused.returncode == 1 and "ContiguousEngine has no sampling penalties" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_cli_prompts_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("import sys\n\nfor i in\n")
    out = run_cli("--prompts-file", str(f), "--max-new-tokens", "3", "--temperature", "0.7", "--top-p", "0.9",
                  "--top-k", "40", "--stop", "\n\n")
    assert out.returncode == 0, out.stderr
    assert "[0] import sys" in out.stdout and "[1] for i in" in out.stdout


@pytest.mark.parametrize("args, message", [
    ([], "one of the arguments --prompt --prompts-file is required"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--prompt", "x", "--top-p", "2"], "--top-p must be in"),
    (["--prompt", "x", "--top-k", "-1"], "--top-k must be >= 0"),
    (["--prompt", "x", "--stop", ""], "--stop takes a non-empty text"),
    (["--prompts-file", "/nonexistent/p.txt"], "does not exist"),
    (["--prompt", "x", "--max-new-tokens", "many"], "invalid int value"),
    (["--prompt", "x", "--system", "Be brief."], "--system and --chat-template go with --chat"),
    (["--prompt", "x", "--contiguous", "--page-size", "32"], "leave out --contiguous"),
    (["--prompt", "x", "--contiguous", "--no-prefix-caching"], "leave out --contiguous"),
    (["--prompt", "x", "--contiguous", "--max-idle-batched-tokens", "64"], "leave out --contiguous"),
])
def test_cli_usage_errors(args, message):
    out = run_cli(*args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_cli_chat_through_a_template(tmp_path):
    from jaxfire.chat import ChatTemplate
    from tests.hf_models import CHAT_TEMPLATE

    out = run_cli("--prompt", "def add(a, b):", "--chat")
    assert out.returncode == 1 and "has no chat template" in out.stderr and "Traceback" not in out.stderr
    path = tmp_path / "chat.jinja"
    path.write_text(CHAT_TEMPLATE)
    out = run_cli("--prompt", "def add(a, b):", "--chat", "--chat-template", str(path), "--system", "Be brief.",
                  "--max-new-tokens", "6")
    assert out.returncode == 0, out.stderr
    model = jaxfire.load()
    text = ChatTemplate(CHAT_TEMPLATE, model.tokenizer.special_tokens(1, 2)).render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}])
    assert text.startswith("<s> [INST] Be brief.\n\ndef add(a, b): [/INST]")
    want = jaxfire.generate(model, [model.tokenizer.encode(text, add_special_tokens=False)], max_new_tokens=6)
    assert out.stdout == "def add(a, b):" + want.texts[0] + "\n"


def test_cli_runs_on_a_mesh_with_the_same_tokens():
    args = ("--prompt", "def add(a, b):", "--max-new-tokens", "6", "--dtype", "float32")
    one, mesh = run_cli(*args), run_cli(*args, "--mesh", "expert=2,tensor=2")
    assert one.returncode == 0 and mesh.returncode == 0, mesh.stderr
    assert mesh.stdout == one.stdout


@pytest.mark.parametrize("spec, message", [
    ("pipeline=2", "mesh axis 'pipeline' in 'pipeline=2' is not one of data, expert, tensor"),
    ("tensor=two", "written axis=size"),
    ("expert=3", "do not divide the 8 devices"),
])
def test_cli_bad_mesh_is_one_line(spec, message):
    out = run_cli("--prompt", "x", "--mesh", spec)
    assert out.returncode == 1 and "Traceback" not in out.stderr and message in out.stderr, out.stderr


def test_cli_bad_checkpoint_is_one_line(tmp_path):
    out = run_cli("--checkpoint", str(tmp_path), "--prompt", "x", "--no-compile-cache")  # whose line comes first
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == f"error: {tmp_path} is not a jaxfire checkpoint: jaxfire.json is missing"
