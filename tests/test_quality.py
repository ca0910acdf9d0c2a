"""The quality harness: metrics on known inputs, FP8 variant comparison end to end, MMLU parsing and scoring."""

import dataclasses
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfire
from jaxfire import evaluate as E
from jaxfire import model as M
from jaxfire.api import Model
from jaxfire.config import Config
from jaxfire.params import init_params
from jaxfire.tokenizer import Tokenizer, byte_level_tokenizer

MMLU = pathlib.Path(__file__).parent / "data" / "mmlu_sample"
# Answers of the sample's test questions, per subject.
SAMPLE_ANSWERS = {"astronomy": "BCAD", "computer_science": "BCBCC", "elementary_mathematics": "BBCDCB"}


# ------------------------------------------------------------------------------------------- metrics

def test_kl_of_identical_logits_is_zero():
    logits = jax.random.normal(jax.random.key(0), (3, 5, 50)) * 4
    np.testing.assert_allclose(E.kl_divergence(logits, logits), 0.0, atol=1e-6)
    # A constant shift is the same distribution.
    np.testing.assert_allclose(E.kl_divergence(logits, logits + 3.0), 0.0, atol=1e-5)


def test_kl_matches_closed_form_and_is_not_symmetric():
    p, q = np.array([0.9, 0.1]), np.array([0.5, 0.5])
    kl_pq = float(np.sum(p * np.log(p / q)))
    kl_qp = float(np.sum(q * np.log(q / p)))
    np.testing.assert_allclose(E.kl_divergence(jnp.log(p), jnp.log(q)), kl_pq, rtol=1e-5)
    np.testing.assert_allclose(E.kl_divergence(jnp.log(q), jnp.log(p)), kl_qp, rtol=1e-5)
    assert abs(kl_pq - kl_qp) > 0.1


def test_kl_ignores_tokens_the_reference_rules_out():
    ref = jnp.array([0.0, -jnp.inf, 0.0])
    np.testing.assert_allclose(E.kl_divergence(ref, jnp.array([0.0, 5.0, 0.0])),
                               math.log(0.5 / (1 / (2 + math.exp(5)))), rtol=1e-5)
    assert bool(jnp.isfinite(E.kl_divergence(ref, ref)))


def test_perplexity_of_a_uniform_model_is_the_vocab_size():
    vocab = 37
    targets = jax.random.randint(jax.random.key(1), (4, 9), 0, vocab)
    np.testing.assert_allclose(E.perplexity(jnp.zeros((4, 9, vocab)), targets), vocab, rtol=1e-5)


def test_perplexity_of_a_certain_model_is_one_and_of_a_wrong_one_large():
    targets = jnp.array([[3, 1, 4, 1, 5]])
    sure = jax.nn.one_hot(targets, 8) * 50.0
    assert E.perplexity(sure, targets) == pytest.approx(1.0, abs=1e-6)
    assert E.perplexity(sure, (targets + 1) % 8) > 1e10


def test_top1_agreement_counts_matching_argmax():
    ref = jnp.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    other = jnp.array([[0.0, 3.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 9.0], [0.0, 5.0, 0.0]])
    np.testing.assert_array_equal(E.top1_agreement(ref, other), [1.0, 0.0, 1.0, 0.0])


def test_variant_rejects_bad_settings():
    with pytest.raises(jaxfire.JaxfireError, match="weights"):
        E.Variant("x", weights="int8")
    with pytest.raises(jaxfire.JaxfireError, match="kv_cache"):
        E.Variant("x", kv_cache="float8")
    with pytest.raises(ValueError, match="activations"):
        E.Variant("x", activations="sometimes")


# ------------------------------------------------------------------------------------------- variants

def test_cached_path_reproduces_the_forward_pass(converted):
    """The token-by-token path (prefill, then decode_step per token) gives the forward pass's logits."""
    _, ckpt = converted("gqa")
    model = jaxfire.load(ckpt, dtype="float32")
    tokens = jax.random.randint(jax.random.key(2), (3, 12), 0, model.config.vocab_size)
    ref = E.variant_logits(model, tokens)
    cached = E.variant_logits(dataclasses.replace(model, kv_cache_dtype=jnp.float32), tokens)
    np.testing.assert_allclose(cached, ref, rtol=2e-4, atol=2e-4)


def test_compare_variants_end_to_end(converted):
    _, ckpt = converted("gqa")
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (100,), 0, 97))
    variants = [E.Variant("bf16 cached", kv_cache="bfloat16"), E.Variant("w8", weights="fp8"),
                E.Variant("w8a8", weights="fp8", activations="always"),
                E.Variant("w8a8 kv8", weights="fp8", activations="always", kv_cache="fp8"),
                E.Variant("top3", experts_per_token=3)]
    rows = E.compare_variants(ckpt, tokens, variants, window=48, batch=2)
    by = {r["variant"]: r for r in rows}
    assert [r["variant"] for r in rows] == [E.REFERENCE.name] + [v.name for v in variants]
    assert all(r["tokens"] == 2 * 47 for r in rows)  # 2 windows of 48 (the remainder dropped): 47 predictions each
    ref = by[E.REFERENCE.name]
    assert ref["kl"] == 0.0 and ref["top1_agreement"] == 1.0 and ref["ppl_change"] == 0.0
    assert ref["experts_per_token"] == 2 and by["top3"]["experts_per_token"] == 3
    # Random weights predict random tokens at about the vocabulary's perplexity.
    assert 40 < ref["perplexity"] < 250
    for r in rows[1:]:
        assert 0.0 < r["kl"] <= r["kl_max"] and 0.5 < r["top1_agreement"] <= 1.0
        assert math.isfinite(r["perplexity"])
        assert r["ppl_change"] == pytest.approx(r["perplexity"] / ref["perplexity"] - 1)
    # Quantization moves the distribution more than bf16 rounding in the cached path does, and FP8
    # activations add to the weights' error.
    assert by["bf16 cached"]["kl"] < by["w8"]["kl"] <= by["w8a8"]["kl"] * 1.5
    assert by["w8a8 kv8"]["kl"] > by["bf16 cached"]["kl"]
    # Top-3 changes which experts run, which moves the output far more than rounding does.
    assert by["top3"]["kl"] > by["w8"]["kl"]


def test_compare_variants_over_a_mesh_matches_one_device(converted):
    _, ckpt = converted("ep8")
    tokens = list(np.random.default_rng(0).integers(0, 97, 128))
    variants = [E.Variant("w8a8 kv8", weights="fp8", activations="always", kv_cache="fp8")]
    single = E.compare_variants(ckpt, tokens, variants, window=32)
    sharded = E.compare_variants(ckpt, tokens, variants, window=32, mesh=jaxfire.make_mesh())
    for a, b in zip(single, sharded):
        assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-5)
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-3, abs=1e-7)
    assert sharded[1]["kl"] > 0


def test_compare_variants_rows_are_deterministic(converted):
    _, ckpt = converted("gqa")
    tokens = list(range(1, 60))
    a = E.compare_variants(ckpt, tokens, [E.Variant("w8", weights="fp8")], window=30)
    b = E.compare_variants(ckpt, tokens, [E.Variant("w8", weights="fp8")], window=30)
    assert a == b


def test_compare_variants_errors(converted):
    _, ckpt = converted("gqa")
    with pytest.raises(jaxfire.JaxfireError, match="unique"):
        E.compare_variants(ckpt, [1, 2, 3], [E.Variant("bf16 top-2")])
    with pytest.raises(jaxfire.JaxfireError, match="at least 2"):
        E.compare_variants(ckpt, [5], [])
    with pytest.raises(jaxfire.JaxfireError, match="no tokenizer"):
        E.compare_variants(ckpt, "some text", [])
    with pytest.raises(jaxfire.JaxfireError, match="experts_per_token 9"):
        E.compare_variants(ckpt, [1, 2, 3], [E.Variant("x", experts_per_token=9)])
    model = jaxfire.load(ckpt, dtype="bfloat16")
    with pytest.raises(jaxfire.JaxfireError, match="pass a checkpoint path"):
        E.compare_variants(model, [1, 2, 3], [E.Variant("x", weights="fp8")])
    with pytest.raises(jaxfire.JaxfireError, match="does not exist"):
        E.read_texts(["/nonexistent/text.txt"])


def test_text_perplexity_is_the_reference_rows(converted):
    _, ckpt = converted("gqa")
    tokens = list(np.random.default_rng(0).integers(0, 97, 100))
    rows = E.compare_variants(ckpt, tokens, [], window=50)
    model = jaxfire.load(ckpt, dtype="bfloat16")
    assert E.text_perplexity(model, tokens, window=50) == pytest.approx(rows[0]["perplexity"], rel=1e-6)


# ------------------------------------------------------------------------------------------- MMLU

def test_mmlu_sample_parses():
    assert E.mmlu_subjects(MMLU) == sorted(SAMPLE_ANSWERS)
    for subject, answers in SAMPLE_ANSWERS.items():
        test = E.read_mmlu_csv(MMLU / "test" / f"{subject}_test.csv")
        assert "".join(q.answer for q in test) == answers
        assert len(E.read_mmlu_csv(MMLU / "dev" / f"{subject}_dev.csv")) == 5
    # Quoted fields keep their commas, doubled quotes and newlines.
    cs = E.read_mmlu_csv(MMLU / "test" / "computer_science_test.csv")
    assert cs[2].question == 'Which value does the Python expression len("abc") return?'
    assert cs[3].question.count("\n") == 2 and cs[3].options == ("1", "2", "3", "an error")


def test_mmlu_prompt_is_the_original_harness_format():
    dev = E.read_mmlu_csv(MMLU / "dev" / "astronomy_dev.csv")
    q = E.read_mmlu_csv(MMLU / "test" / "astronomy_test.csv")[0]
    prompt = E.mmlu_prompt("astronomy", dev[:1], q)
    assert prompt == ("The following are multiple choice questions (with answers) about  astronomy.\n\n"
                      "Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\nAnswer: B\n\n"
                      "Which is the largest planet in the Solar System?\nA. Earth\nB. Jupiter\nC. Mars\nD. Venus\n"
                      "Answer:")
    assert E.mmlu_prompt("high_school_biology", [], q).startswith("The following are multiple choice questions "
                                                                 "(with answers) about  high school biology.\n\n")


def _byte_tokenizer(tmp_path) -> Tokenizer:
    path = tmp_path / "tokenizer.json"
    byte_level_tokenizer().save(str(path))
    return Tokenizer(path)


def rigged_model(tokenizer: Tokenizer, token_id: int) -> Model:
    """A model whose every next-token distribution peaks at `token_id`, whatever the context.

    Attention and experts write nothing, so the last hidden state is the token's embedding, whose
    dominant feature 0 is the same for every token; only `token_id`'s output row reads it.
    """
    config = Config.preset("tiny").replace(vocab_size=tokenizer.vocab_size, max_position_embeddings=2048)
    p = init_params(config, jax.random.key(0), jnp.float32)
    p.embed = p.embed.at[:, 0].set(1.0)
    for layer in p.layers:
        layer.attn.wo = jnp.zeros_like(layer.attn.wo)
        layer.moe.w_down = jnp.zeros_like(layer.moe.w_down)
    p.lm_head = jnp.zeros_like(p.lm_head).at[token_id, 0].set(1.0)
    return Model(config=config, params=p, tokenizer=tokenizer)


def test_answer_tokens_follow_the_tokenizer(tmp_path):
    tok = _byte_tokenizer(tmp_path)  # no merges: " A" is two tokens, so the bare letter is used
    assert E.answer_token_ids(tok) == [tok.token_to_id(c) for c in "ABCD"]
    builtin = Tokenizer(jaxfire.api.BUILTIN_DIR / "tokenizer.json")
    ids = E.answer_token_ids(builtin)
    assert [builtin.decode([i]) for i in ids] in ([" A", " B", " C", " D"], ["A", "B", "C", "D"])


@pytest.mark.parametrize("letter", ["A", "B"])
def test_mmlu_rigged_model_scores_the_share_of_its_letter(tmp_path, letter):
    tok = _byte_tokenizer(tmp_path)
    model = rigged_model(tok, E.answer_token_ids(tok)["ABCD".index(letter)])
    res = E.evaluate_mmlu(model, MMLU, batch=4)
    expected = {s: a.count(letter) / len(a) for s, a in SAMPLE_ANSWERS.items()}
    assert res["questions"] == 15 and res["shots"] == 5 and res["truncated"] == 0
    assert {s: d["accuracy"] for s, d in res["subjects"].items()} == pytest.approx(expected)
    assert res["accuracy"] == pytest.approx(sum(a.count(letter) for a in SAMPLE_ANSWERS.values()) / 15)
    assert res["macro_accuracy"] == pytest.approx(np.mean(list(expected.values())))


def test_mmlu_last_logits_match_the_forward_pass(converted):
    """Prompts of different lengths, padded into one prefill, score as each would alone."""
    _, ckpt = converted("mqa_window_tied")
    model = jaxfire.load(ckpt, dtype="float32")
    prompts = [model.tokenizer.encode(t) for t in ("Answer:", "What is 2 + 2?\nA. 3\nB. 4\nAnswer:", "x")]
    got = E.last_logits(model, prompts)
    for p, row in zip(prompts, got):
        ref = M.forward(model.params, jnp.asarray([p]), model.config)[0, -1]
        np.testing.assert_allclose(row, ref, rtol=1e-4, atol=1e-4)


def test_mmlu_end_to_end_drops_shots_that_do_not_fit(converted):
    _, ckpt = converted("mqa_window_tied")  # 256 positions and a byte-level tokenizer: 5 shots never fit
    model = jaxfire.load(ckpt)
    res = E.evaluate_mmlu(model, MMLU, subjects=["astronomy", "computer_science"], limit=3)
    assert res["questions"] == 6 and set(res["subjects"]) == {"astronomy", "computer_science"}
    assert 0.0 <= res["accuracy"] <= 1.0
    assert res["truncated"] == 0  # every question fits once its shots are dropped
    cut = E.evaluate_mmlu(model, MMLU, subjects=["computer_science"], max_length=40, limit=2)
    assert cut["truncated"] == 2


def _copy_sample(tmp_path) -> pathlib.Path:
    out = tmp_path / "mmlu"
    shutil.copytree(MMLU, out)
    return out


@pytest.mark.parametrize("content, message", [
    ("Q?,a,b,c,D\n", "expected 6 columns"),
    ("Q?,a,b,c,d,E\n", "must be one of A, B, C, D"),
    (",a,b,c,d,A\n", "question is empty"),
    ("\n", "holds no questions"),
])
def test_mmlu_malformed_rows_are_named(tmp_path, content, message):
    data = _copy_sample(tmp_path)
    path = data / "test" / "astronomy_test.csv"
    path.write_text("Which planet is closest to the Sun?,Venus,Mercury,Earth,Mars,B\n" * (content != "\n") + content)
    with pytest.raises(jaxfire.JaxfireError, match=message) as e:
        E.evaluate_mmlu(rigged_model(_byte_tokenizer(tmp_path), 3), data)
    assert "astronomy_test.csv" in str(e.value)
    if content != "\n":
        assert "line 2" in str(e.value)


def test_mmlu_missing_files_are_named(tmp_path):
    model = rigged_model(_byte_tokenizer(tmp_path), 3)
    with pytest.raises(jaxfire.JaxfireError, match="does not exist"):
        E.evaluate_mmlu(model, tmp_path / "nowhere")
    with pytest.raises(jaxfire.JaxfireError, match="no test/ folder"):
        E.evaluate_mmlu(model, tmp_path)
    data = _copy_sample(tmp_path)
    (data / "dev" / "astronomy_dev.csv").unlink()
    with pytest.raises(jaxfire.JaxfireError, match="astronomy_dev.csv does not exist"):
        E.evaluate_mmlu(model, data)
    assert E.evaluate_mmlu(model, data, shots=0)["questions"] == 15  # zero-shot needs no dev files
    with pytest.raises(jaxfire.JaxfireError, match="physics_test.csv does not exist"):
        E.evaluate_mmlu(model, data, subjects=["physics"])
    (data / "dev" / "astronomy_dev.csv").write_text("Q?,a,b,c,d,A\n")
    with pytest.raises(jaxfire.JaxfireError, match="has 1 questions; 5-shot needs 5"):
        E.evaluate_mmlu(model, data)
    for f in (data / "test").iterdir():
        f.unlink()
    with pytest.raises(jaxfire.JaxfireError, match="no <subject>_test.csv files"):
        E.evaluate_mmlu(model, data)
