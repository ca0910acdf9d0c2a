"""Quality of a model and of its FP8 variants: perplexity, next-token KL, top-1 agreement, MMLU 5-shot.

`compare_variants` runs one text through a reference (bf16, the checkpoint's experts per token) and
through each variant (FP8 weights with or without FP8 activations, an FP8 KV cache, more experts per
token), and reports for each the perplexity of the text, the mean KL divergence of its next-token
distribution from the reference's, and how often its most likely next token is the reference's.
Variants with a KV cache run token by token through `prefill` and `decode_step`, so every prediction
reads its context back from the cache; the others run the full forward pass, which has no cache.

`evaluate_mmlu` scores the MMLU benchmark from the CSV files of its original release, 5-shot, by the
logits of the answer letters after "Answer:", as the original harness does.

Dimensions: B windows, T tokens per window, V vocab, N predictions.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import pathlib
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxfire import api
from jaxfire import model as M
from jaxfire.errors import JaxfireError
from jaxfire.kv_cache import init_cache
from jaxfire.quant import Fp8Policy


class EvaluationError(JaxfireError):
    pass


# ------------------------------------------------------------------------------------------- metrics

def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Negative log-likelihood of each target under its logits."""
    # logits: [..., V], targets: [...] -> [...]
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1)[..., 0]


def kl_divergence(ref_logits: jax.Array, logits: jax.Array) -> jax.Array:
    """KL(reference || model) of each next-token distribution, in nats."""
    # [..., V], [..., V] -> [...]
    lp = jax.nn.log_softmax(jnp.asarray(ref_logits, jnp.float32), axis=-1)
    lq = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    # Where the reference gives a token probability 0 it contributes nothing, whatever the model says.
    return jnp.sum(jnp.where(lp > -jnp.inf, jnp.exp(lp) * (lp - lq), 0.0), axis=-1)


def top1_agreement(ref_logits: jax.Array, logits: jax.Array) -> jax.Array:
    """1.0 where the model's most likely next token is the reference's, else 0.0."""
    # [..., V], [..., V] -> [...]
    return (jnp.argmax(ref_logits, -1) == jnp.argmax(logits, -1)).astype(jnp.float32)


def perplexity(logits: jax.Array, targets: jax.Array) -> float:
    """exp of the mean next-token loss."""
    return math.exp(float(jnp.mean(token_nll(logits, targets))))


# ------------------------------------------------------------------------------------------- variants

@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of running a checkpoint.

    weights: "bfloat16" or "fp8" (e4m3 per-channel weights, quantized at load unless stored so).
    activations: the FP8 activation policy of FP8 weights ("never": weight-only, "always": FP8 x FP8).
    kv_cache: None runs the full forward pass; "bfloat16" or "fp8" runs token by token through that cache.
    experts_per_token: None keeps the checkpoint's.
    """

    name: str
    weights: str = "bfloat16"
    activations: str = "never"
    kv_cache: str | None = None
    experts_per_token: int | None = None

    def __post_init__(self):
        if self.weights not in ("bfloat16", "fp8"):
            raise EvaluationError(f"variant {self.name!r}: weights must be 'bfloat16' or 'fp8', got {self.weights!r}")
        if self.kv_cache not in (None, "bfloat16", "fp8"):
            raise EvaluationError(f"variant {self.name!r}: kv_cache must be None, 'bfloat16' or 'fp8', "
                                  f"got {self.kv_cache!r}")
        Fp8Policy(self.activations)  # validates

    def apply(self, model: api.Model) -> api.Model:
        """This variant of a model loaded with `self.weights` (nothing is copied)."""
        if self.experts_per_token is not None:
            if not 1 <= self.experts_per_token <= model.config.num_experts:
                raise EvaluationError(f"variant {self.name!r}: experts_per_token {self.experts_per_token} is not "
                                      f"in [1, {model.config.num_experts}]")
            model = dataclasses.replace(model, config=model.config.replace(
                num_experts_per_tok=self.experts_per_token))
        model = model.with_runtime(fp8=Fp8Policy(self.activations))
        kv = {None: None, "bfloat16": jnp.bfloat16, "fp8": "fp8"}[self.kv_cache]
        return dataclasses.replace(model, kv_cache_dtype=kv)


REFERENCE = Variant("bf16 top-2")
VARIANTS = (
    Variant("bf16 top-2, bf16 KV cache", kv_cache="bfloat16"),  # the cached path's own rounding floor
    Variant("fp8 weight-only", weights="fp8", activations="never"),
    Variant("fp8 x fp8", weights="fp8", activations="always"),
    Variant("bf16, fp8 KV cache", kv_cache="fp8"),
    Variant("fp8 x fp8, fp8 KV cache", weights="fp8", activations="always", kv_cache="fp8"),
    Variant("bf16 top-3", experts_per_token=3),
    Variant("fp8 weight-only top-3", weights="fp8", activations="never", experts_per_token=3),
    Variant("fp8 x fp8 top-3", weights="fp8", activations="always", experts_per_token=3),
    Variant("fp8 x fp8 top-3, fp8 KV cache", weights="fp8", activations="always", kv_cache="fp8",
            experts_per_token=3),
)


def variant_logits(model: api.Model, tokens: jax.Array) -> jax.Array:
    """Next-token logits at every position of each window, through the cache when the model has one."""
    # tokens: [B, T] -> [B, T, V] float32
    if model.kv_cache_dtype is None:
        return M.forward(model.params, tokens, model.config, model.runtime)
    b, t = tokens.shape
    cache = init_cache(model.config, b, t, model.kv_cache_dtype, model.runtime.mesh)
    first, cache = M.prefill(model.params, cache, tokens[:, :1], jnp.ones((b,), jnp.int32), model.config,
                             model.runtime)
    out = [first]
    for i in range(1, t):
        logits, cache = M.decode_step(model.params, cache, tokens[:, i], model.config, None, model.runtime)
        out.append(logits)
    return jnp.stack(out, axis=1)


# ------------------------------------------------------------------------------------------- texts

def read_texts(paths: Iterable[str | os.PathLike]) -> str:
    """The files' text, concatenated."""
    parts = []
    for p in paths:
        p = pathlib.Path(p)
        if not p.is_file():
            raise EvaluationError(f"text file {p} does not exist")
        parts.append(p.read_text(encoding="utf-8", errors="replace"))
    return "".join(parts)


def text_windows(model: api.Model, text: str | Sequence[int], window: int, max_tokens: int | None = None) -> np.ndarray:
    """The text's tokens cut into consecutive windows of `window` tokens; a shorter remainder is dropped.

    A text shorter than one window is one window of its own length.
    """
    # -> [B, T] int32
    if isinstance(text, str):
        if model.tokenizer is None:
            raise EvaluationError("this model has no tokenizer: pass the text as token ids")
        ids = np.asarray(model.tokenizer.encode(text), np.int32)
    else:
        ids = np.asarray(text, np.int32)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise EvaluationError(f"the text has {len(ids)} token(s); at least 2 are needed to score a prediction")
    if window < 2:
        raise EvaluationError(f"window must be at least 2 tokens, got {window}")
    window = min(window, len(ids), model.config.max_position_embeddings)
    n = len(ids) // window
    return ids[:n * window].reshape(n, window)


# ------------------------------------------------------------------------------------------- comparison

def _load(checkpoint: str | os.PathLike | None | api.Model, weights: str, mesh: Any = None) -> api.Model:
    if isinstance(checkpoint, api.Model):
        if (weights == "fp8") != checkpoint.is_fp8:
            raise EvaluationError(f"a loaded model serves only {'fp8' if checkpoint.is_fp8 else 'bfloat16'} "
                                  f"variants; pass a checkpoint path to compare {weights} weights")
        return checkpoint
    return api.load(checkpoint, dtype=weights, mesh=mesh)


def compare_variants(checkpoint: str | os.PathLike | None | api.Model, text: str | Sequence[int],
                     variants: Sequence[Variant] = VARIANTS, *, reference: Variant = REFERENCE, window: int = 256,
                     max_tokens: int | None = 32768, batch: int = 16, mesh: Any = None,
                     progress: Callable[[Iterable, str], Iterable] | None = None) -> list[dict[str, Any]]:
    """Perplexity of the text under the reference and each variant, and each variant's KL divergence from
    the reference and top-1 agreement with it, over every next-token prediction inside the windows.

    checkpoint: a checkpoint directory (None: the built-in model), or a loaded `Model` (then only
    variants of its own weight precision). The model is loaded once per weight precision, one at a
    time (over `mesh` if given), so a large model needs memory for one copy; the reference's
    log-probabilities wait on the host (N x V float32; `max_tokens` bounds N).
    `progress(batches, variant_name)` may wrap the batch loop.
    Returns one row per run, the reference first: variant, weights, activations, kv_cache,
    experts_per_token, tokens (predictions scored), nll, perplexity, kl, kl_max, top1_agreement and
    ppl_change (relative to the reference).
    """
    runs = [reference, *variants]
    names = [v.name for v in runs]
    if len(set(names)) != len(names):
        raise EvaluationError(f"variant names must be unique, got {names}")
    ref_lp: list[np.ndarray] = []  # per batch: [b, T-1, V] reference log-probabilities
    stats: dict[str, dict[str, Any]] = {}
    windows = None
    # The reference's precision first, so its log-probabilities exist before any variant needs them.
    order = sorted(range(len(runs)), key=lambda i: (runs[i].weights != reference.weights, i))
    loaded: tuple[str, api.Model] | None = None
    model = None
    for i in order:
        v = runs[i]
        if loaded is None or loaded[0] != v.weights:
            loaded = model = None  # frees the other precision's weights before this one loads
            loaded = (v.weights, _load(checkpoint, v.weights, mesh))
        model = v.apply(loaded[1])
        if windows is None:
            windows = text_windows(model, text, window, max_tokens)
        acc = {"nll": 0.0, "kl": 0.0, "kl_max": 0.0, "top1": 0.0, "n": 0}
        starts = range(0, len(windows), batch)
        for j, s in enumerate(progress(starts, v.name) if progress else starts):
            tokens = jnp.asarray(windows[s:s + batch])
            logits = variant_logits(model, tokens)[:, :-1]  # [b, T-1, V]
            acc["nll"] += float(jnp.sum(token_nll(logits, tokens[:, 1:])))
            acc["n"] += logits.shape[0] * logits.shape[1]
            if v is reference:
                ref_lp.append(np.asarray(jax.nn.log_softmax(logits, -1)))
                continue
            ref = jnp.asarray(ref_lp[j])
            kl = kl_divergence(ref, logits)
            acc["kl"] += float(jnp.sum(kl))
            acc["kl_max"] = max(acc["kl_max"], float(jnp.max(kl)))
            acc["top1"] += float(jnp.sum(top1_agreement(ref, logits)))
        n = acc["n"]
        stats[v.name] = {
            "variant": v.name, "weights": v.weights,
            "activations": v.activations if v.weights == "fp8" else None, "kv_cache": v.kv_cache,
            "experts_per_token": model.config.num_experts_per_tok, "tokens": n,
            "nll": acc["nll"] / n, "perplexity": math.exp(acc["nll"] / n),
            "kl": 0.0 if v is reference else acc["kl"] / n, "kl_max": acc["kl_max"],
            "top1_agreement": 1.0 if v is reference else acc["top1"] / n,
        }
    ref_ppl = stats[reference.name]["perplexity"]
    rows = [stats[name] for name in names]
    for row in rows:
        row["ppl_change"] = row["perplexity"] / ref_ppl - 1.0
    return rows


def text_perplexity(model: api.Model, text: str | Sequence[int], *, window: int = 256, max_tokens: int | None = None,
                    batch: int = 16) -> float:
    """Perplexity of the text under the model as it runs (its runtime, experts and KV cache)."""
    windows = text_windows(model, text, window, max_tokens)
    total, n = 0.0, 0
    for s in range(0, len(windows), batch):
        tokens = jnp.asarray(windows[s:s + batch])
        logits = variant_logits(model, tokens)[:, :-1]
        total += float(jnp.sum(token_nll(logits, tokens[:, 1:])))
        n += logits.shape[0] * logits.shape[1]
    return math.exp(total / n)


# ------------------------------------------------------------------------------------------- MMLU

CHOICES = ("A", "B", "C", "D")


@dataclasses.dataclass(frozen=True)
class Question:
    question: str
    options: tuple[str, str, str, str]
    answer: str  # one of CHOICES


def read_mmlu_csv(path: str | os.PathLike) -> list[Question]:
    """Rows of an MMLU CSV file: no header; question, A, B, C, D, answer letter."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise EvaluationError(f"MMLU file {path} does not exist")
    out = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 6:
                raise EvaluationError(f"{path}, line {line}: expected 6 columns (question, A, B, C, D, answer), "
                                      f"found {len(row)}")
            answer = row[5].strip()
            if answer not in CHOICES:
                raise EvaluationError(f"{path}, line {line}: the answer must be one of A, B, C, D, got {row[5]!r}")
            if not row[0].strip():
                raise EvaluationError(f"{path}, line {line}: the question is empty")
            out.append(Question(row[0], tuple(row[1:5]), answer))
    if not out:
        raise EvaluationError(f"MMLU file {path} holds no questions")
    return out


def mmlu_subjects(data_dir: str | os.PathLike) -> list[str]:
    """The subjects of an MMLU directory: every test/{subject}_test.csv."""
    test_dir = pathlib.Path(data_dir) / "test"
    if not test_dir.is_dir():
        raise EvaluationError(f"MMLU directory {data_dir} has no test/ folder (expected test/<subject>_test.csv "
                              f"and dev/<subject>_dev.csv)")
    subjects = sorted(p.name[:-len("_test.csv")] for p in test_dir.glob("*_test.csv"))
    if not subjects:
        raise EvaluationError(f"no <subject>_test.csv files in {test_dir}")
    return subjects


def format_question(q: Question, with_answer: bool) -> str:
    text = q.question + "".join(f"\n{letter}. {option}" for letter, option in zip(CHOICES, q.options)) + "\nAnswer:"
    return text + f" {q.answer}\n\n" if with_answer else text


def mmlu_prompt(subject: str, shots: Sequence[Question], question: Question) -> str:
    # The subject keeps the original harness's leading space ("about  college biology"): scores are
    # comparable with published ones only if the prompt is byte for byte the same.
    subject_words = "".join(" " + w for w in subject.split("_"))
    header = f"The following are multiple choice questions (with answers) about {subject_words}.\n\n"
    return header + "".join(format_question(s, True) for s in shots) + format_question(question, False)


def answer_token_ids(tokenizer) -> list[int]:
    """The token each answer letter is written as after "Answer:": " A" where that is one token (byte-level
    BPE), else the last token of "A" (SentencePiece, where it already carries the word boundary)."""
    ids = []
    for letter in CHOICES:
        spaced = tokenizer.encode(" " + letter, add_special_tokens=False)
        ids.append(spaced[0] if len(spaced) == 1 else tokenizer.encode(letter, add_special_tokens=False)[-1])
    if len(set(ids)) != len(ids):
        raise EvaluationError(f"the tokenizer maps the answer letters to the same tokens {ids}")
    return ids


def last_logits(model: api.Model, prompts: Sequence[Sequence[int]]) -> np.ndarray:
    """Each prompt's next-token logits, through `prefill` with the model's runtime and KV cache dtype."""
    # -> [B, V] float32
    b = len(prompts)
    t = max(map(len, prompts))
    padded = max(16, 1 << (t - 1).bit_length())  # powers of two: few compiled shapes
    tokens = np.full((b, padded), model.config.pad_token_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    cache = init_cache(model.config, b, padded, model.kv_cache_dtype or model.dtype, model.runtime.mesh)
    logits, _ = M.prefill(model.params, cache, jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32),
                          model.config, model.runtime, fresh=True)
    return np.asarray(logits)


def evaluate_mmlu(model: api.Model, data_dir: str | os.PathLike, *, subjects: Sequence[str] | None = None,
                  shots: int = 5, max_length: int | None = 2048, batch: int = 8, limit: int | None = None,
                  progress: Callable[[Iterable], Iterable] | None = None) -> dict[str, Any]:
    """MMLU accuracy: each test question after the first `shots` dev questions of its subject.

    The prediction is the answer letter with the highest logit after "Answer:". A prompt longer than
    `max_length` tokens (default 2048, as the original harness; capped by the model's positions) drops
    shots one at a time, then keeps only its last tokens.
    Returns {"accuracy": over all questions, "macro_accuracy": mean over subjects, "questions",
    "subjects": {subject: {"accuracy", "questions", "correct"}}, "truncated": prompts cut}.
    """
    if model.tokenizer is None:
        raise EvaluationError("MMLU needs a model with a tokenizer")
    if shots < 0:
        raise EvaluationError(f"shots must be >= 0, got {shots}")
    data_dir = pathlib.Path(data_dir)
    if not data_dir.is_dir():
        raise EvaluationError(f"MMLU directory {data_dir} does not exist")
    subjects = list(subjects) if subjects is not None else mmlu_subjects(data_dir)
    limit_len = min(max_length or model.config.max_position_embeddings, model.config.max_position_embeddings)
    letters = np.asarray(answer_token_ids(model.tokenizer))
    tok = model.tokenizer

    # Read and check every file before the first forward pass: a malformed row fails fast.
    data = {}
    for subject in subjects:
        test = read_mmlu_csv(data_dir / "test" / f"{subject}_test.csv")
        dev = read_mmlu_csv(data_dir / "dev" / f"{subject}_dev.csv") if shots else []
        if len(dev) < shots:
            raise EvaluationError(f"{data_dir / 'dev' / f'{subject}_dev.csv'} has {len(dev)} questions; "
                                  f"{shots}-shot needs {shots}")
        data[subject] = (dev[:shots], test[:limit] if limit else test)

    truncated = 0
    items: list[tuple[str, list[int], str]] = []
    for subject, (dev, test) in data.items():
        for q in test:
            k = shots
            ids = tok.encode(mmlu_prompt(subject, dev[:k], q))
            while len(ids) > limit_len and k > 0:
                k -= 1
                ids = tok.encode(mmlu_prompt(subject, dev[:k], q))
            if len(ids) > limit_len:
                ids, truncated = ids[-limit_len:], truncated + 1
            items.append((subject, ids, q.answer))

    # Similar lengths together, so padding wastes little.
    order = sorted(range(len(items)), key=lambda i: len(items[i][1]))
    predictions: dict[int, str] = {}
    starts = range(0, len(order), batch)
    for s in progress(starts) if progress else starts:
        chunk = order[s:s + batch]
        logits = last_logits(model, [items[i][1] for i in chunk])  # [b, V]
        picks = np.argmax(logits[:, letters], axis=-1)
        for i, p in zip(chunk, picks):
            predictions[i] = CHOICES[int(p)]

    per_subject: dict[str, dict[str, Any]] = {}
    for i, (subject, _, answer) in enumerate(items):
        d = per_subject.setdefault(subject, {"questions": 0, "correct": 0})
        d["questions"] += 1
        d["correct"] += int(predictions[i] == answer)
    for d in per_subject.values():
        d["accuracy"] = d["correct"] / d["questions"]
    total = sum(d["questions"] for d in per_subject.values())
    return {
        "accuracy": sum(d["correct"] for d in per_subject.values()) / total,
        "macro_accuracy": float(np.mean([d["accuracy"] for d in per_subject.values()])),
        "questions": total,
        "subjects": per_subject,
        "truncated": truncated,
        "shots": shots,
    }
