"""The shipped built-in model: an FP8 checkpoint that loads, scores the README's figure on Python it never
saw, and completes a function header with code that parses (guards against broken weights, a lost
quantization or a mismatched tokenizer)."""

import ast
import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import pytest

import jaxfire
from jaxfire import evaluate as E
from jaxfire import params as P
from jaxfire.api import BUILTIN_DIR
from jaxfire.quant import QArray

ROOT = pathlib.Path(__file__).parents[1]
# CPython's Lib/test/test_bisect.py: the CPython tests were never trained on.
SAMPLE = pathlib.Path(__file__).parent / "data" / "builtin_heldout.txt"
TOKENS = 2048  # enough for a stable figure, small enough to stay fast
HEADER = "def is_prime(n):"


@pytest.fixture(scope="module")
def builtin():
    return jaxfire.load()


def readme_sample_perplexity() -> float:
    section = (ROOT / "README.md").read_text().split("## Built-in model", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"builtin_heldout\.txt`[^\n]*?perplexity \*\*([\d.]+)\*\*", section)
    assert m, "the README's built-in section gives no perplexity for tests/data/builtin_heldout.txt"
    return float(m.group(1))


def test_builtin_is_an_fp8_checkpoint(builtin):
    meta = json.loads((BUILTIN_DIR / "jaxfire.json").read_text())
    assert meta["source"] == "scripts/train_demo.py" and meta["fp8"]
    assert set(meta["dtypes"]) == {"bfloat16", "float8_e4m3fn", "float32"}, meta["dtypes"]
    c = builtin.config
    assert (c.num_experts, c.num_experts_per_tok, c.bos_token_id, c.eos_token_ids) == (8, 2, 1, (2,))
    assert builtin.tokenizer.vocab_size == c.vocab_size
    layer = builtin.params.layers[0]
    for w in (layer.moe.w_gate_up, layer.moe.w_down, layer.attn.wqkv, layer.attn.wo):
        assert isinstance(w, QArray) and w.value.dtype == jnp.float8_e4m3fn and w.scale.dtype == jnp.float32
    assert builtin.params.embed.dtype == jnp.bfloat16 and layer.attn_norm.dtype == jnp.bfloat16
    size = sum(f.stat().st_size for f in BUILTIN_DIR.rglob("*") if f.is_file())
    assert size <= 16e6, f"the built-in model takes {size / 1e6:.1f} MB"


def test_tokenizer_adds_bos_and_round_trips(builtin):
    tok = builtin.tokenizer
    assert tok.token_to_id("<s>") == 1 and tok.token_to_id("</s>") == 2
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n"
    ids = tok.encode(text)
    assert ids[0] == 1 and 1 not in ids[1:]
    assert tok.decode(ids) == text
    # The BPE merges learned Python: held-out source averages over 2.5 bytes a token, not one (3.3 over
    # the training files; the sample's tables of numbers take more tokens).
    sample = SAMPLE.read_text()
    assert len(tok.encode(sample)) < len(sample.encode()) / 2.5
    assert tok.decode(tok.encode(sample)) == sample


def test_sample_perplexity_is_the_readme_figure(builtin):
    measured = E.text_perplexity(builtin, SAMPLE.read_text(), window=256, max_tokens=TOKENS)
    assert measured == pytest.approx(readme_sample_perplexity(), rel=0.05)
    # and far below an untrained model of the same shape, which is near uniform over the vocabulary
    untrained = jaxfire.Model(config=builtin.config, tokenizer=builtin.tokenizer,
                              params=P.init_params(builtin.config, jax.random.key(0), jnp.bfloat16))
    assert E.text_perplexity(untrained, SAMPLE.read_text(), window=256, max_tokens=512) > 20 * measured


def test_greedy_completion_of_a_header_parses(builtin):
    out = jaxfire.generate(builtin, [HEADER], max_new_tokens=64)
    text = HEADER + out.texts[0]
    # the function up to its end, or to its last whole line where the tokens ran out
    lines = text.split("\n")[:-1] if out.finish_reasons[0] == "length" else text.split("\n")
    body = []
    for line in lines[1:]:
        if line.strip() and not line.startswith(" "):
            break
        body.append(line)
    assert any(line.strip() for line in body), text
    ast.parse("\n".join([HEADER, *body]))
    lines = [line.strip() for line in body if line.strip()]
    assert max(lines.count(line) for line in lines) < 3, text


def test_model_card_figures_are_recorded():
    meta = json.loads((BUILTIN_DIR / "jaxfire.json").read_text())
    train, figures = meta["train"], meta["eval"]
    for key in ("tokens_seen", "seconds", "parameters", "steps", "seed", "machine", "jax", "history"):
        assert key in train
    assert figures["test_ppl_stored"] <= 12 and figures["headers_reading"] >= 0.8 * figures["headers"]
    assert figures["sample_ppl"] == pytest.approx(readme_sample_perplexity(), rel=1e-3)
    assert math.isfinite(train["history"][-1]["heldout_loss"])
