"""The shipped built-in model: it loads, generates Python-like text, and its held-out perplexity is far below
that of an untrained model of the same shape (a guard against broken weights or a mismatched tokenizer)."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import pytest

import jaxfire
from jaxfire import evaluate as E
from jaxfire import params as P
from jaxfire.api import BUILTIN_DIR

# Standard-library files that training held out (tests/data/builtin_heldout.txt says which).
HELDOUT = pathlib.Path(__file__).parent / "data" / "builtin_heldout.txt"
TOKENS = 2048  # enough for a stable figure, small enough to stay fast


@pytest.fixture(scope="module")
def builtin():
    return jaxfire.load()


def test_builtin_is_a_trained_checkpoint(builtin):
    meta = json.loads((BUILTIN_DIR / "jaxfire.json").read_text())
    assert meta["source"] == "scripts/train_demo.py" and meta["dtypes"] == ["bfloat16"]
    c = builtin.config
    assert (c.num_experts, c.num_experts_per_tok, c.bos_token_id, c.eos_token_ids) == (8, 2, 1, (2,))
    assert builtin.tokenizer.vocab_size == c.vocab_size
    size = sum(f.stat().st_size for f in BUILTIN_DIR.rglob("*") if f.is_file())
    assert size < 8 * 2**20, f"the built-in model takes {size / 2**20:.1f} MiB"


def test_tokenizer_adds_bos_and_round_trips(builtin):
    tok = builtin.tokenizer
    assert tok.token_to_id("<s>") == 1 and tok.token_to_id("</s>") == 2
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n"
    ids = tok.encode(text)
    assert ids[0] == 1 and 1 not in ids[1:]
    assert tok.decode(ids) == text
    # The BPE merges learned Python: held-out source averages over 3 bytes a token, not one.
    heldout = HELDOUT.read_text()
    assert len(tok.encode(heldout)) < len(heldout.encode()) / 3
    assert tok.decode(tok.encode(heldout)) == heldout


def test_generates_python_like_text(builtin):
    out = jaxfire.generate(builtin, ["def fibonacci(n):", "class Stack:\n\n    def push(self, item):"],
                           max_new_tokens=32)
    for text in out.texts:
        # A block opens: the next line is indented deeper than the `def`/`class` line.
        assert text.startswith("\n    ") and text.isascii(), text
    assert "self." in out.texts[1], out.texts[1]


def test_heldout_perplexity_is_far_below_an_untrained_model(builtin):
    text = HELDOUT.read_text()
    trained = E.text_perplexity(builtin, text, window=256, max_tokens=TOKENS)
    untrained = jaxfire.Model(config=builtin.config, tokenizer=builtin.tokenizer,
                              params=P.init_params(builtin.config, jax.random.key(0), jnp.bfloat16))
    baseline = E.text_perplexity(untrained, text, window=256, max_tokens=TOKENS)
    # An untrained model is near uniform (the vocabulary size); training brings it to tens.
    assert baseline > 0.5 * builtin.config.vocab_size
    assert trained < 60 and trained < baseline / 50, (trained, baseline)


def test_model_card_figures_are_recorded():
    train = json.loads((BUILTIN_DIR / "jaxfire.json").read_text())["train"]
    for key in ("tokens_seen", "seconds", "heldout_loss_bf16", "parameters", "steps", "seed"):
        assert key in train
    assert train["heldout_ppl_bf16"] == pytest.approx(math.exp(train["heldout_loss_bf16"]), rel=1e-3)
