"""Trains the built-in model: a small Mixtral on Python source, on the CPU or, larger, on one GPU.

Two presets share one code path. `cpu` is the original demo: 3.1M parameters trained 30 minutes on
the standard library. `gpu` is the shipped model: 12.8M parameters trained on one H200 on the
standard library and the site-packages of the environment running the script, stored in FP8.

Data: every `.py` file of the sources except tests (no `test`/`tests` folder anywhere in the path,
no `test_*.py`, `*_test.py` or `conftest.py`), demos and files over MAX_FILE_BYTES, each content
once. About one file in twenty is held out, picked by a hash of its relative path, so the split is
the same on every machine and run. CPython's own tests (`Lib/test/test_*.py`) are never trained on:
they are the measure (32 evenly spaced windows of 256 tokens). A byte-level BPE tokenizer (BOS 1,
EOS 2, BOS added on encode) is trained on the training files, each file is encoded as <s> ... </s>,
and the model trains on random windows of the concatenated stream: next-token loss on jaxfire's own
layers (`forward_with_aux` is `model.forward` that also returns the Switch-Transformer router
load-balancing loss), AdamW with linear warmup and cosine decay. On the CPU the expert matmuls run
as one batched matmul over expert-pure blocks of rows, because `ragged_dot`'s CPU lowering is about
4x slower forward and backward. Training stops before its first step if its forward pass differs
from `model.forward`. Everything is seeded: the same flags give the same data order, initial
weights and schedule (and on the CPU the same weights; GPU scatter-adds may differ in the last bit).

With a time budget the run times its warmup steps, then fixes the step count that fits the budget
and prints it; `--steps N --time-budget 0` repeats that schedule exactly.

    python scripts/train_demo.py                                    # the CPU demo, about 30 minutes
    python scripts/train_demo.py --steps 20 --out /tmp/m            # a smoke run
    python scripts/train_demo.py --preset gpu --prepare .gpu/data   # tokenizer and token ids (CPU)
    python scripts/train_demo.py --preset gpu --data .gpu/data --export out/  # train on the GPU
    python scripts/train_demo.py --preset gpu --finish out/         # FP8 checkpoint, figures, plot
    python scripts/train_demo.py --list-heldout                     # the held-out files

Dimensions: B batch, T tokens per window, V vocab, E experts, L layers.
"""

from __future__ import annotations

import argparse
import ast
import codeop
import dataclasses
import hashlib
import json
import math
import pathlib
import platform
import re
import sysconfig
import tempfile
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxfire import checkpoint, moe, quant
from jaxfire import model as M
from jaxfire import params as P
from jaxfire.api import BUILTIN_DIR
from jaxfire.config import Config

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: pad/unk, BOS, EOS as the config says
# Tests, demos and third-party code are not the standard library's own style, and the test suite
# alone would double the data with repetitive fixtures.
EXCLUDED_DIRS = {"test", "tests", "idlelib", "turtledemo", "site-packages", "lib2to3", "__pycache__", "ensurepip",
                 "venv"}
HELDOUT_EVERY = 20
MAX_FILE_BYTES = 512 * 1024
# The measures the shipped model is held to: CPython's tests, never trained on.
TEST_WINDOWS, TEST_WINDOW = 32, 256
HEADERS, HEADER_TOKENS = 24, 64


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1200  # with a time budget: the most steps
    batch: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0
    aux_loss: float = 0.01  # router load-balancing weight; 0 trains on cross-entropy alone
    seed: int = 0
    eval_every: int = 250
    eval_windows: int = 64
    time_budget: float = 0.0  # seconds of training (evaluations included); 0: run `steps`


def cpu_model_config(vocab_size: int) -> Config:
    """The CPU demo's geometry: 3.1M parameters (5 MB in bf16), 8 experts of which 2 run per token."""
    return Config(vocab_size=vocab_size, hidden_size=128, intermediate_size=192, num_layers=4, num_heads=4,
                  num_kv_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2, rope_theta=1e4,
                  max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
                  pad_token_id=0)


def gpu_model_config(vocab_size: int) -> Config:
    """The shipped geometry: 12.8M parameters, 11.6 MiB in FP8, 8 experts of which 2 run per token.

    Sized to the CPU: decoding reads every expert's weights each step, and past about 13M
    parameters they stop fitting the 2-core test machine's cache and decoding drops below 40 tokens/s.
    """
    return Config(vocab_size=vocab_size, hidden_size=384, intermediate_size=160, num_layers=6, num_heads=6,
                  num_kv_heads=2, head_dim=64, num_experts=8, num_experts_per_tok=2, rope_theta=1e4,
                  max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
                  pad_token_id=0)


@dataclasses.dataclass(frozen=True)
class Preset:
    sources: tuple[str, ...]
    vocab: int
    model: Callable[[int], Config]
    train: TrainConfig
    compute_dtype: str
    fp8: bool  # store e4m3 experts and projections with scales


PRESETS = {
    "cpu": Preset(("stdlib",), 4096, cpu_model_config, TrainConfig(), "float32", fp8=False),
    "gpu": Preset(("stdlib", "site-packages"), 4096, gpu_model_config,
                  TrainConfig(steps=40000, batch=128, seq_len=512, lr=3e-3, warmup=200, eval_every=250,
                              time_budget=370.0), "bfloat16", fp8=True),
}


@dataclasses.dataclass(frozen=True)
class SourceFile:
    source: str  # "stdlib" or "site-packages"
    rel: str  # path under the source's folder: the held-out split hashes it
    path: pathlib.Path
    text: str


# ---------------------------------------------------------------------------------------------- data

def source_roots(sources: tuple[str, ...], stdlib: pathlib.Path | None = None) -> list[tuple[str, pathlib.Path]]:
    """(name, folder) of each source: "stdlib" is this Python's standard library, "site-packages"
    the packages of the environment running the script (the project's `.venv`)."""
    folders = {"stdlib": pathlib.Path(stdlib or sysconfig.get_paths()["stdlib"]),
               "site-packages": pathlib.Path(sysconfig.get_paths()["purelib"])}
    return [(name, folders[name]) for name in sources]


def is_source(rel: pathlib.PurePath, excluded_dirs: set[str]) -> bool:
    """A library's own code: no test folder, test file or excluded folder anywhere in its path."""
    name = rel.name
    is_test_file = name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py"
    return not (excluded_dirs & set(rel.parts[:-1])) and not is_test_file


def source_files(sources: tuple[str, ...] = ("stdlib",), stdlib: pathlib.Path | None = None) -> list[SourceFile]:
    """The `.py` files of the sources, sorted by source then relative path, each content once.

    A file whose text already appeared (vendored copies, files shipped twice) is dropped, and so
    is one over MAX_FILE_BYTES (generated tables, not code anyone wrote).
    """
    out, seen = [], set()
    for name, root in source_roots(sources, stdlib):
        excluded = EXCLUDED_DIRS if name == "stdlib" else EXCLUDED_DIRS - {"site-packages"}
        paths = sorted((f for f in root.rglob("*.py") if is_source(f.relative_to(root), excluded)),
                       key=lambda f: f.relative_to(root).as_posix())
        for f in paths:
            if not f.is_file() or f.stat().st_size > MAX_FILE_BYTES:
                continue
            text = f.read_text(encoding="utf-8", errors="replace")
            digest = hashlib.sha256(text.encode()).digest()
            if not text.strip() or digest in seen:
                continue
            seen.add(digest)
            out.append(SourceFile(name, f.relative_to(root).as_posix(), f, text))
    return out


def is_heldout(relpath: str) -> bool:
    """One file in HELDOUT_EVERY, by a hash of its path: the same split on every machine."""
    return int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % HELDOUT_EVERY == 0


def split_files(sources: tuple[str, ...] = ("stdlib",),
                stdlib: pathlib.Path | None = None) -> tuple[list[SourceFile], list[SourceFile]]:
    files = source_files(sources, stdlib)
    return [f for f in files if not is_heldout(f.rel)], [f for f in files if is_heldout(f.rel)]


def cpython_tests(stdlib: pathlib.Path | None = None) -> list[pathlib.Path]:
    """CPython's own test modules, `Lib/test/test_*.py`: Python no preset ever trains on."""
    root = pathlib.Path(stdlib or sysconfig.get_paths()["stdlib"]) / "test"
    return sorted(root.glob("test_*.py"))

def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with <unk>/<s>/</s> at ids 0-2 and a post-processor that prepends <s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def encode_stream(tok, texts: list[str], chunk: int = 512) -> np.ndarray:
    """All texts as one uint16 stream, each as <s> tokens </s> (a few hundred files at a time:
    the tokenizer's per-file objects for all of site-packages would not fit in memory)."""
    eos = tok.token_to_id("</s>")
    parts = []
    for i in range(0, len(texts), chunk):
        for enc in tok.encode_batch(texts[i:i + chunk]):
            parts.append(np.asarray(enc.ids + [eos], np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def windows(stream: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    # -> [B, length] int32
    return stream[starts[:, None] + np.arange(length)[None, :]].astype(np.int32)


@dataclasses.dataclass
class Data:
    """A preset's tokenizer and token streams: what training needs, and all a GPU machine is sent."""

    tokenizer: Any  # tokenizers.Tokenizer
    train: np.ndarray  # uint16 stream of the training files
    heldout: np.ndarray  # the held-out files
    tests: np.ndarray  # CPython's Lib/test/test_*.py, the measure (may be empty where not installed)
    info: dict[str, Any]

    @classmethod
    def build(cls, preset: Preset, stdlib: pathlib.Path | None = None) -> "Data":
        t0 = time.perf_counter()
        train_files, held_files = split_files(preset.sources, stdlib)
        if not train_files or not held_files:
            raise SystemExit(f"error: no Python sources found in {', '.join(preset.sources)}")
        train_texts = [f.text for f in train_files]
        tok = train_tokenizer(train_texts, preset.vocab)
        tests = cpython_tests(stdlib)
        data = cls(tok, encode_stream(tok, train_texts), encode_stream(tok, [f.text for f in held_files]),
                   encode_stream(tok, [f.read_text(encoding="utf-8", errors="replace") for f in tests]), {})
        data.info = {"sources": list(preset.sources), "train_files": len(train_files),
                     "train_bytes": sum(len(t.encode()) for t in train_texts), "train_tokens": int(len(data.train)),
                     "heldout_files": len(held_files), "heldout_tokens": int(len(data.heldout)),
                     "test_files": len(tests), "test_tokens": int(len(data.tests)),
                     "files_by_source": {s: sum(f.source == s for f in train_files + held_files)
                                         for s in preset.sources},
                     "python": platform.python_version(), "vocab": tok.get_vocab_size()}
        print(f"{len(train_files)} training files ({len(data.train):,} tokens), {len(held_files)} held out "
              f"({len(data.heldout):,} tokens), {len(tests)} CPython test files ({len(data.tests):,} tokens); "
              f"{time.perf_counter() - t0:.0f}s")
        return data

    def save(self, out: pathlib.Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(out / "tokenizer.json"))
        np.savez_compressed(out / "tokens.npz", train=self.train, heldout=self.heldout, tests=self.tests)
        (out / "data.json").write_text(json.dumps(self.info, indent=1))

    @classmethod
    def load(cls, folder: pathlib.Path) -> "Data":
        from tokenizers import Tokenizer

        with np.load(folder / "tokens.npz") as z:
            streams = {k: z[k] for k in ("train", "heldout", "tests")}
        return cls(Tokenizer.from_file(str(folder / "tokenizer.json")), **streams,
                   info=json.loads((folder / "data.json").read_text()))


# ---------------------------------------------------------------------------------------------- model

def blocked_grouped(xs: jax.Array, w: jax.Array, group_sizes: jax.Array, block: int = 128) -> jax.Array:
    """`quant.grouped` for plain weights as one batched matmul over expert-pure blocks of rows.

    Each expert's rows are padded to a multiple of `block`, so every block belongs to one expert and
    the whole product is a dense batched einsum (no row is dropped; the padding costs at most E
    blocks). On the CPU its forward and backward run about 4x faster than `ragged_dot_general`.
    """
    # xs: [A, K] sorted by expert, w: [E, N, K], group_sizes: [E] -> [A, N]
    a, k = xs.shape
    e = w.shape[0]
    nb = a // block + e  # an upper bound on sum(ceil(g / block)), static
    padded = (group_sizes + block - 1) // block * block  # [E]
    padded_start = jnp.cumsum(padded) - padded
    start = jnp.cumsum(group_sizes) - group_sizes
    expert_of_row = jnp.repeat(jnp.arange(e), group_sizes, total_repeat_length=a)  # [A]
    dest = padded_start[expert_of_row] + jnp.arange(a) - start[expert_of_row]  # [A]
    blocks = jnp.zeros((nb * block, k), xs.dtype).at[dest].set(xs).reshape(nb, block, k)  # [nb, block, K]
    block_expert = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(nb) * block, side="right")
    ws = w[jnp.minimum(block_expert, e - 1)].astype(xs.dtype)  # [nb, N, K]
    y = jnp.einsum("bck,bnk->bcn", blocks, ws, preferred_element_type=jnp.float32)  # [nb, block, N]
    return y.reshape(nb * block, -1)[dest].astype(xs.dtype)


def moe_with_aux(p: P.MoE, x: jax.Array, config: Config, experts_impl: str) -> tuple[jax.Array, jax.Array]:
    """`moe.moe_block` (route, dispatch, SwiGLU experts, combine) plus the Switch load-balancing loss."""
    # x: [T, D] -> [T, D], aux []
    k, e = config.num_experts_per_tok, config.num_experts
    probs = jax.nn.softmax(quant.dense(x, p.router).astype(jnp.float32), axis=-1)  # [T, E]
    weights, experts = moe.route(p.router, x, k)  # [T, k]
    share = jnp.mean(jax.nn.one_hot(experts, e).sum(1), 0) / k  # [E]: fraction of assignments per expert
    aux = e * jnp.sum(share * jnp.mean(probs, 0))  # 1 when balanced
    if experts_impl == "ragged":
        return moe.moe_block(p, x, k), aux
    order, position, group_sizes = moe.dispatch(experts, e)
    xs = x[order // k]  # [A, D]
    gate_up = p.w_gate_up.reshape(e, -1, p.w_gate_up.shape[-1])  # [E, 2F, D]
    gate, up = jnp.split(blocked_grouped(xs, gate_up, group_sizes), 2, axis=-1)  # [A, F] each
    ys = blocked_grouped(jax.nn.silu(gate) * up, p.w_down, group_sizes)  # [A, D]
    return moe.combine(ys, position, weights, x.dtype), aux


def forward_with_aux(params: P.Params, tokens: jax.Array, config: Config,
                     experts_impl: str = "ragged") -> tuple[jax.Array, jax.Array]:
    """`model.forward`'s logits plus the load-balancing loss averaged over layers.

    Built from the model's own layers, so the trained weights are what `model.forward` runs;
    `main` checks the two agree before training starts.
    """
    # tokens: [B, T] -> logits [B, T, V], aux []
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = params.embed[tokens]  # [B, T, D]
    aux = []
    for layer in params.layers:
        (h,), _ = M.attention_block(layer, [M.rms_norm(x, layer.attn_norm, config.rms_norm_eps)],
                                    [M.Segment(tokens, positions)], [None], config, M.Runtime())
        x = x + h
        y = M.rms_norm(x, layer.moe_norm, config.rms_norm_eps).reshape(-1, x.shape[-1])  # [B*T, D]
        y, layer_aux = moe_with_aux(layer.moe, y, config, experts_impl)
        x = x + y.reshape(x.shape)
        aux.append(layer_aux)
    return M._lm_head(params, x, config), jnp.mean(jnp.stack(aux))


def check_training_forward(params: P.Params, config: Config, experts_impl: str, tokens: np.ndarray) -> None:
    """Stops before training if the training forward pass is not `model.forward`."""
    with jax.default_matmul_precision("highest"):  # GPUs would otherwise multiply float32 in TF32
        ref = M.forward(params, jnp.asarray(tokens), config)
        got, _ = jax.jit(forward_with_aux, static_argnums=(2, 3))(params, jnp.asarray(tokens), config, experts_impl)
    err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
    if err > 1e-4:
        raise SystemExit(f"error: the training forward pass differs from model.forward (relative error {err:.2e})")


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    # logits: [B, T, V], targets: [B, T] -> [B, T]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def make_optimizer(tc: TrainConfig):
    """AdamW whose learning rate is an argument of each step (`schedule` gives it), so the step
    count can be fixed after the warmup has been timed without recompiling."""
    import optax

    def adamw(learning_rate):
        # Norm gains (1-D) are not decayed: pulling them toward zero only fights the normalisation.
        decay_mask = lambda p: jax.tree.map(lambda w: w.ndim > 1, p)  # noqa: E731
        return optax.chain(optax.clip_by_global_norm(tc.clip),
                           optax.adamw(learning_rate, b1=0.9, b2=0.95, weight_decay=tc.weight_decay,
                                       mask=decay_mask))

    return optax.inject_hyperparams(adamw)(learning_rate=0.0)


def schedule(tc: TrainConfig, step: int, total: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `total`; the warmup does
    not depend on `total`."""
    if step < tc.warmup:
        return tc.lr * step / tc.warmup
    frac = min(1.0, (step - tc.warmup) / max(1, total - tc.warmup))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def build_step(config: Config, tc: TrainConfig, optimizer, compute_dtype: Any, experts_impl: str):
    def loss_fn(params, batch):
        # batch: [B, T+1]
        run = P.cast(params, compute_dtype)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits, aux = forward_with_aux(run, inputs, config, experts_impl)
        ce = jnp.mean(token_nll(logits, targets))
        return ce + tc.aux_loss * aux, (ce, aux)

    @jax.jit
    def step(params, opt_state, batch, lr):
        import optax

        (_, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        opt_state.hyperparams["learning_rate"] = lr
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, ce, aux, optax.global_norm(grads)

    return step


def heldout_loss(params: P.Params, config: Config, stream: np.ndarray, n_windows: int, seq_len: int,
                 compute_dtype: Any = jnp.float32, batch: int = 16) -> float:
    """Mean next-token loss over `n_windows` fixed, evenly spaced windows of the stream."""
    starts = np.linspace(0, len(stream) - seq_len - 2, n_windows).astype(np.int64)
    run = P.cast(params, compute_dtype)
    total = 0.0
    for i in range(0, n_windows, batch):
        w = jnp.asarray(windows(stream, starts[i:i + batch], seq_len + 1))
        logits = M.forward(run, w[:, :-1], config)
        total += float(jnp.sum(token_nll(logits, w[:, 1:])))
    return total / (n_windows * seq_len)


def train(params: P.Params, config: Config, tc: TrainConfig, data: Data, compute_dtype: Any,
          experts_impl: str) -> tuple[P.Params, dict[str, Any]]:
    """The training loop; returns the trained float32 weights and the run's record (history included)."""
    optimizer = make_optimizer(tc)
    opt_state = optimizer.init(params)
    step = build_step(config, tc, optimizer, compute_dtype, experts_impl)
    rng = np.random.default_rng(tc.seed)
    tokens_per_step = tc.batch * tc.seq_len
    print(f"model: {config.param_count():,} parameters; up to {tc.steps} steps of {tc.batch} x {tc.seq_len} tokens"
          + (f", {tc.time_budget:.0f}s budget" if tc.time_budget else ""), flush=True)

    def evaluate(i: int, smooth: float, seconds: float) -> dict[str, Any]:
        row = {"step": i, "tokens": i * tokens_per_step, "train_loss": round(smooth, 4),
               "heldout_loss": round(heldout_loss(params, config, data.heldout, tc.eval_windows, TEST_WINDOW,
                                                  compute_dtype), 4)}
        if len(data.tests):
            row["test_loss"] = round(heldout_loss(params, config, data.tests, TEST_WINDOWS, TEST_WINDOW,
                                                  compute_dtype), 4)
        row["minutes"] = round(seconds / 60, 2)
        print(f"step {i} ({seconds:.0f}s): train {smooth:.3f}, held-out {row['heldout_loss']:.3f} "
              f"(ppl {math.exp(row['heldout_loss']):.1f})"
              + (f", CPython tests ppl {math.exp(row['test_loss']):.2f}" if "test_loss" in row else ""), flush=True)
        return row

    total, history, smooth = tc.steps, [], None
    start = time.perf_counter()
    timed_from = None  # (step, time) once compilation is behind
    i = 0
    while i < total:
        i += 1
        starts = rng.integers(0, len(data.train) - tc.seq_len - 1, tc.batch)
        batch = jnp.asarray(windows(data.train, starts, tc.seq_len + 1))
        params, opt_state, ce, aux, gnorm = step(params, opt_state, batch, jnp.float32(schedule(tc, i - 1, total)))
        if i % 10 == 0 or i == total or i == 1:  # reading the loss waits for the step: not every step
            ce = float(ce)
            smooth = ce if smooth is None else 0.8 * smooth + 0.2 * ce
        if i == 5:
            jax.block_until_ready(params)
            timed_from = (i, time.perf_counter())
        timing = i == max(tc.warmup, 25) and i < total
        if timing:
            jax.block_until_ready(params)
            per_step = (time.perf_counter() - timed_from[1]) / (i - timed_from[0])
            print(f"{per_step * 1e3:.1f} ms a step ({tokens_per_step / per_step:,.0f} tokens/s)", flush=True)
        if i % tc.eval_every == 0 or i == total or (timing and tc.time_budget):
            history.append(evaluate(i, smooth, time.perf_counter() - start))
        if timing and tc.time_budget:  # the first evaluation (it compiles) is behind: the rest cost little
            left = tc.time_budget - (time.perf_counter() - start)
            total = max(i, min(tc.steps, i + int(0.93 * left / per_step)))
            print(f"{total} steps fit the {tc.time_budget:.0f}s budget (--steps {total} --time-budget 0 repeats "
                  f"this run)", flush=True)
        elif i % 100 == 0:
            print(f"step {i}: loss {smooth:.3f}, aux {float(aux):.3f}, gnorm {float(gnorm):.2f}, "
                  f"lr {schedule(tc, i - 1, total):.2e}, {time.perf_counter() - start:.0f}s", flush=True)
        if tc.time_budget and i < total and time.perf_counter() - start > 1.1 * tc.time_budget:
            print(f"stopping at step {i} of {total}: past the time budget", flush=True)
            if not history or history[-1]["step"] != i:
                history.append(evaluate(i, smooth, time.perf_counter() - start))
            break
    seconds = time.perf_counter() - start
    record = {**dataclasses.asdict(tc), "steps": i, "scheduled_steps": total, "experts": experts_impl,
              "compute_dtype": jnp.dtype(compute_dtype).name, "parameters": config.param_count(),
              "tokens_seen": i * tokens_per_step, "seconds": round(seconds),
              "machine": f"{platform.machine()} {jax.devices()[0].device_kind}", "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "history": history}
    return params, record


# ---------------------------------------------------------------------------------------------- measures

def function_headers(tests: list[pathlib.Path], n: int = HEADERS) -> list[str]:
    """`n` one-line `def` headers (dedented) spread evenly over CPython's test modules, in file order."""
    found = []
    for f in tests:
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            m = re.fullmatch(r"\s*(def \w+\(.*\)( -> .+)?:)\s*", line)
            if m and m.group(1) not in found:
                found.append(m.group(1))
    if len(found) < n:
        return found
    return [found[int(k)] for k in np.linspace(0, len(found) - 1, n)]


def completion_reads(header: str, completion: str, finished: bool) -> tuple[bool, str]:
    """Whether a completion of `header` parses as Python without repeating a line three times.

    The function is taken up to its end (the first line back at the header's indentation) or, where
    the tokens ran out first, up to its last complete line. It parses when that is whole Python or a
    valid unfinished prefix of it (`codeop`: a docstring or bracket still open), and has a body.
    """
    lines = (header + completion).split("\n")
    if not finished:
        lines = lines[:-1]  # the line the token budget cut
    body = []
    for line in lines[1:]:
        if line.strip() and not line.startswith((" ", "\t")):
            break
        body.append(line)
    if not any(line.strip() for line in body):
        return False, "no body"
    counts: dict[str, int] = {}
    for line in body:
        if line.strip():
            counts[line.strip()] = counts.get(line.strip(), 0) + 1
    if max(counts.values()) >= 3:
        return False, "repeats a line"
    code = "\n".join([lines[0], *body]) + "\n"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in generated strings
        try:
            ast.parse(code)
            return True, "parses"
        except SyntaxError:
            pass
        try:
            return (codeop.compile_command(code, symbol="exec") is None), "unfinished"
        except (SyntaxError, ValueError, OverflowError):
            return False, "syntax error"


def header_completions(model, headers: list[str], max_new_tokens: int = HEADER_TOKENS) -> list[dict[str, Any]]:
    import jaxfire

    out = jaxfire.generate(model, headers, max_new_tokens=max_new_tokens, temperature=0.0)
    rows = []
    for header, text, reason in zip(headers, out.texts, out.finish_reasons):
        ok, why = completion_reads(header, text, finished=reason != "length")
        rows.append({"header": header, "completion": text, "reads": ok, "why": why})
    return rows


def measure(model_dir: pathlib.Path, bf16_dir: pathlib.Path, stdlib: pathlib.Path | None = None,
            sample: pathlib.Path | None = None) -> dict[str, Any]:
    """The shipped model's figures: CPython-test perplexity of the bf16 original (`bf16_dir`) and as
    stored (FP8), header completions and decode speed as stored, and the test sample's perplexity as
    the tests measure it."""
    import jaxfire
    from jaxfire import evaluate as E

    tests = cpython_tests(stdlib)
    stored = jaxfire.load(model_dir)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    stream = encode_stream(tok, [f.read_text(encoding="utf-8", errors="replace") for f in tests])
    figures: dict[str, Any] = {"test_files": len(tests), "test_tokens": int(len(stream))}
    for name, model in (("bf16", jaxfire.load(bf16_dir)), ("stored", stored)):
        loss = heldout_loss(model.params, model.config, stream, TEST_WINDOWS, TEST_WINDOW)
        figures[f"test_ppl_{name}"] = round(math.exp(loss), 3)
    rows = header_completions(stored, function_headers(tests))
    figures["headers"] = len(rows)
    figures["headers_reading"] = sum(r["reads"] for r in rows)
    figures["header_rows"] = rows
    if sample is not None:
        figures["sample_ppl"] = round(E.text_perplexity(stored, sample.read_text(), window=256, max_tokens=2048), 3)
    speeds = []
    for _ in range(3):
        g = jaxfire.generate(stored, ["def fibonacci(n):"], max_new_tokens=48)
        speeds.append(g.decode_tokens_per_second)
    figures["decode_tokens_per_second"] = round(max(speeds), 1)
    return figures


# ---------------------------------------------------------------------------------------------- outputs

EXPORT_FILE_BYTES = 12 * 2**20  # a GPU machine sends back files of at most 16 MiB


def export_params(params: P.Params, out: pathlib.Path) -> list[str]:
    """The weights in bf16 (as uint16 bit patterns, which plain numpy reads) over as few files as fit."""
    leaves = [np.asarray(jnp.asarray(w, jnp.bfloat16)).view(np.uint16) for w in jax.tree.leaves(params)]
    files, chunk, size = [], {}, 0
    for k, w in enumerate(leaves):
        if chunk and size + w.nbytes > EXPORT_FILE_BYTES:
            files.append(chunk)
            chunk, size = {}, 0
        chunk[f"{k:04d}"], size = w, size + w.nbytes
    files.append(chunk)
    names = []
    for j, c in enumerate(files):
        names.append(f"params_{j}.npz")
        np.savez(out / names[-1], **c)
    return names


def import_params(folder: pathlib.Path, config: Config) -> P.Params:
    arrays = {}
    for f in sorted(folder.glob("params_*.npz")):
        with np.load(f) as z:
            arrays.update({k: z[k] for k in z.files})
    treedef = jax.tree.structure(P.init_params(config, jax.random.key(0), jnp.bfloat16))
    if len(arrays) != treedef.num_leaves:
        raise SystemExit(f"error: {folder} holds {len(arrays)} weights, the model has {treedef.num_leaves}")
    leaves = [jnp.asarray(arrays[f"{k:04d}"].view(jnp.bfloat16)) for k in range(treedef.num_leaves)]
    return jax.tree.unflatten(treedef, leaves)


def save_model(out: pathlib.Path, params: P.Params, config: Config, tokenizer_json: pathlib.Path, fp8: bool,
               info: dict[str, Any]) -> pathlib.Path:
    """The checkpoint jaxfire.load reads: bf16, or FP8 (e4m3 projections and experts with per-channel
    scales; embeddings, norms and router bf16)."""
    params = P.cast(params, jnp.bfloat16)
    if fp8:
        params = P.quantize(params, P.describe(config))
    with tempfile.TemporaryDirectory() as tmp:
        (pathlib.Path(tmp) / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
        return checkpoint.save(out, params, config, tokenizer_dir=tmp, overwrite=True, extra=info)


def plot_history(history: list[dict[str, Any]], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    for key, label in (("train_loss", "training windows"), ("heldout_loss", "held-out library files"),
                       ("test_loss", "CPython Lib/test (never trained on)")):
        if all(key in h for h in history):
            ax.plot(steps, [h[key] for h in history], marker=".", label=label)
    ax.axhline(math.log(12), color="grey", linestyle=":", label="perplexity 12")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finish(folder: pathlib.Path, preset: Preset, out: pathlib.Path, results: pathlib.Path,
           sample: pathlib.Path | None) -> None:
    """Turns a GPU run's export into the shipped checkpoint and its bf16 original (`folder`/bf16, which
    `bench.quality` compares FP8 against), measures them, and writes the results."""
    record = json.loads((folder / "train.json").read_text())
    config = Config.from_dict(record["config"])
    params = import_params(folder, config)
    info = {"source": "scripts/train_demo.py", "train": record["train"], "data": record["data"]}
    save_model(folder / "bf16", params, config, folder / "tokenizer.json", False, info)
    save_model(out, params, config, folder / "tokenizer.json", preset.fp8, info)
    figures = measure(out, folder / "bf16", sample=sample)
    info["eval"] = {k: v for k, v in figures.items() if k != "header_rows"}
    save_model(out, params, config, folder / "tokenizer.json", preset.fp8, info)
    results.mkdir(parents=True, exist_ok=True)
    (results / "builtin_train.json").write_text(json.dumps({**record, "eval": figures}, indent=1) + "\n")
    t = record["train"]
    plot_history(t["history"], results / "builtin_train_loss.png",
                 f"{t['parameters'] / 1e6:.1f}M-parameter Mixtral, {t['machine']}, jax {t['jax']}, {t['date']}")
    print(json.dumps(info["eval"], indent=1))
    for r in figures["header_rows"]:
        print(f"--- {r['why']}\n{r['header']}{r['completion']}")


# ---------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                    help="cpu: the 3.1M demo trained here; gpu: the shipped 12.8M model")
    ap.add_argument("--out", default=str(BUILTIN_DIR), help="checkpoint directory (default: the built-in model)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--aux-loss", type=float, help="router load-balancing weight (0: off)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--time-budget", type=float, help="seconds of training; 0: run --steps")
    ap.add_argument("--vocab", type=int, help="BPE vocabulary size, specials included")
    ap.add_argument("--compute-dtype", choices=["float32", "bfloat16"],
                    help="activation dtype; the master weights and optimizer state stay float32")
    ap.add_argument("--experts", default="auto", choices=["auto", "ragged", "blocked"],
                    help="expert matmuls while training: the model's ragged_dot path, or expert-pure blocks "
                         "(same result, faster on the CPU); auto picks blocked on the CPU")
    ap.add_argument("--stdlib", type=pathlib.Path, help="standard library to read (default: this Python's)")
    ap.add_argument("--prepare", type=pathlib.Path, metavar="DIR",
                    help="write the tokenizer and token ids to DIR and exit (what a GPU machine is sent)")
    ap.add_argument("--data", type=pathlib.Path, metavar="DIR", help="train on a --prepare folder")
    ap.add_argument("--export", type=pathlib.Path, metavar="DIR",
                    help="write bf16 weights, tokenizer and the run's record to DIR instead of a checkpoint")
    ap.add_argument("--finish", type=pathlib.Path, metavar="DIR",
                    help="an --export folder to the checkpoint (--out), figures and plot (--results)")
    ap.add_argument("--results", type=pathlib.Path, default=pathlib.Path("bench/results"))
    ap.add_argument("--sample", type=pathlib.Path, default=pathlib.Path("tests/data/builtin_heldout.txt"),
                    help="the test sample whose perplexity tests/test_builtin.py checks")
    ap.add_argument("--heldout-text", help="also write the held-out files, concatenated, to this path")
    ap.add_argument("--list-heldout", action="store_true", help="print the held-out files' paths and exit")
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    if args.list_heldout:
        print("\n".join(str(f.path) for f in split_files(preset.sources, args.stdlib)[1]))
        return
    if args.finish:
        finish(args.finish, preset, pathlib.Path(args.out), args.results, args.sample)
        return
    flags = {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
             "warmup": args.warmup, "aux_loss": args.aux_loss, "seed": args.seed, "eval_every": args.eval_every,
             "time_budget": args.time_budget}
    tc = dataclasses.replace(preset.train, **{k: v for k, v in flags.items() if v is not None})
    if args.vocab:
        preset = dataclasses.replace(preset, vocab=args.vocab)
    compute_dtype = jnp.dtype(args.compute_dtype or preset.compute_dtype)
    experts_impl = args.experts
    if experts_impl == "auto":
        experts_impl = "blocked" if jax.default_backend() == "cpu" else "ragged"

    if args.data:
        data = Data.load(args.data)
    else:
        data = Data.build(preset, args.stdlib)
    if args.prepare:
        data.save(args.prepare)
        print(f"wrote {args.prepare}")
        return
    if args.heldout_text:
        files = split_files(preset.sources, args.stdlib)[1]
        pathlib.Path(args.heldout_text).write_text("".join(f.text for f in files))

    config = preset.model(data.tokenizer.get_vocab_size())
    params = P.init_params(config, jax.random.key(tc.seed), jnp.float32)
    check_training_forward(params, config, experts_impl, data.train[:65][None].astype(np.int32))
    params, record = train(params, config, tc, data, compute_dtype, experts_impl)
    record["preset"] = args.preset
    last = record["history"][-1]
    print(f"held-out loss {last['heldout_loss']:.3f} (perplexity {math.exp(last['heldout_loss']):.1f}) "
          f"after {record['seconds'] / 60:.1f} min")
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = pathlib.Path(tmp) / "tokenizer.json"
        data.tokenizer.save(str(tok_path))
        if args.export:
            args.export.mkdir(parents=True, exist_ok=True)
            export_params(params, args.export)
            (args.export / "tokenizer.json").write_bytes(tok_path.read_bytes())
            (args.export / "train.json").write_text(json.dumps(
                {"config": config.to_dict(), "train": record, "data": data.info}, indent=1) + "\n")
            print(f"wrote {args.export}")
        else:
            info = {"source": "scripts/train_demo.py", "train": record, "data": data.info}
            out = save_model(pathlib.Path(args.out), params, config, tok_path, preset.fp8, info)
            print(f"wrote {out}")


if __name__ == "__main__":
    main()
