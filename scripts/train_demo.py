"""Trains the built-in model: a small Mixtral on the Python standard library's own source files.

The data is on every machine with Python: the `.py` files under `sysconfig.get_paths()["stdlib"]`
(tests, demos and vendored packages left out). About one file in twenty is held out, picked by a hash
of its relative path, so the split is the same on every machine and run. A byte-level BPE tokenizer
(BOS 1, EOS 2, BOS added on encode) is trained on the training files, each file is encoded as
<s> ... </s>, and the model trains on random windows of the concatenated stream: next-token loss on
jaxfire's own layers (`forward_with_aux` is `model.forward` that also returns the Switch-Transformer
router load-balancing loss, optional with --aux-loss 0), AdamW with linear warmup and cosine decay.
On the CPU the expert matmuls run as one batched matmul over expert-pure blocks of rows, because
`ragged_dot`'s CPU lowering is about 4x slower forward and backward; a GPU runs the model's own
`ragged_dot` path. Training stops before its first step if its forward pass differs from
`model.forward`. Everything is seeded: the same flags give the same weights.

    python scripts/train_demo.py                          # the shipped model: CPU, about 30 minutes
    python scripts/train_demo.py --steps 20 --out /tmp/m  # a smoke run
    python scripts/train_demo.py --steps 20000 --batch 64 --compute-dtype bfloat16 --out ckpt/demo  # GPU
    python -m bench.quality --text $(python scripts/train_demo.py --list-heldout)  # score the held-out files

The same code runs on a GPU; only --steps/--batch (and bf16 compute) change.

Dimensions: B batch, T tokens per window, V vocab, E experts, L layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import pathlib
import platform
import sysconfig
import tempfile
import time
from typing import Any, Iterable

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


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1200
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


def model_config(vocab_size: int) -> Config:
    """The shipped geometry: 3.1M parameters (5 MB in bf16), 8 experts of which 2 run per token."""
    return Config(vocab_size=vocab_size, hidden_size=128, intermediate_size=192, num_layers=4, num_heads=4,
                  num_kv_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2, rope_theta=1e4,
                  max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
                  pad_token_id=0)


# ---------------------------------------------------------------------------------------------- data

def stdlib_files(root: pathlib.Path | None = None) -> list[pathlib.Path]:
    """The standard library's own `.py` files, sorted by relative path."""
    root = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py") if not EXCLUDED_DIRS & set(f.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def is_heldout(relpath: str) -> bool:
    """One file in HELDOUT_EVERY, by a hash of its path: the same split on every machine."""
    return int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % HELDOUT_EVERY == 0


def split_files(root: pathlib.Path | None = None) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
    root = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    held = [f for f in files if is_heldout(f.relative_to(root).as_posix())]
    train = [f for f in files if not is_heldout(f.relative_to(root).as_posix())]
    return train, held


def read_texts(files: Iterable[pathlib.Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


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


def encode_stream(tok, texts: list[str]) -> np.ndarray:
    """All files as one int32 stream, each as <s> tokens </s>."""
    eos = tok.token_to_id("</s>")
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, np.int32)


def windows(stream: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    # -> [B, length]
    return stream[starts[:, None] + np.arange(length)[None, :]]


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
    order, group_sizes = moe.dispatch(experts, e)
    xs = x[order // k]  # [A, D]
    gate_up = p.w_gate_up.reshape(e, -1, p.w_gate_up.shape[-1])  # [E, 2F, D]
    gate, up = jnp.split(blocked_grouped(xs, gate_up, group_sizes), 2, axis=-1)  # [A, F] each
    ys = blocked_grouped(jax.nn.silu(gate) * up, p.w_down, group_sizes)  # [A, D]
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(x.shape[0], k, -1)  # [T, k, D]
    return jnp.einsum("tkd,tk->td", y.astype(jnp.float32), weights).astype(x.dtype), aux


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
        h, _ = M.attention_block(layer, M.rms_norm(x, layer.attn_norm, config.rms_norm_eps), positions, None, None,
                                 config, M.Runtime())
        x = x + h
        y = M.rms_norm(x, layer.moe_norm, config.rms_norm_eps).reshape(-1, x.shape[-1])  # [B*T, D]
        y, layer_aux = moe_with_aux(layer.moe, y, config, experts_impl)
        x = x + y.reshape(x.shape)
        aux.append(layer_aux)
    return M._lm_head(params, x, config), jnp.mean(jnp.stack(aux))


def check_training_forward(params: P.Params, config: Config, experts_impl: str, tokens: np.ndarray) -> None:
    """Stops before training if the training forward pass is not `model.forward`."""
    ref = M.forward(params, jnp.asarray(tokens), config)
    got, _ = jax.jit(forward_with_aux, static_argnums=(2, 3))(params, jnp.asarray(tokens), config, experts_impl)
    err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
    if err > 1e-4:
        raise SystemExit(f"error: the training forward pass differs from model.forward (relative error {err:.2e})")


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    # logits: [B, T, V], targets: [B, T] -> [B, T]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def make_optimizer(tc: TrainConfig):
    import optax

    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup, max(tc.steps, tc.warmup + 1),
                                                  end_value=tc.lr * tc.min_lr_ratio)
    # Norm gains (1-D) are not decayed: pulling them toward zero only fights the normalisation.
    decay_mask = lambda p: jax.tree.map(lambda w: w.ndim > 1, p)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(tc.clip),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=tc.weight_decay, mask=decay_mask)), schedule


def build_step(config: Config, tc: TrainConfig, optimizer, compute_dtype: Any, experts_impl: str):
    def loss_fn(params, batch):
        # batch: [B, T+1]
        run = P.cast(params, compute_dtype)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits, aux = forward_with_aux(run, inputs, config, experts_impl)
        ce = jnp.mean(token_nll(logits, targets))
        return ce + tc.aux_loss * aux, (ce, aux)

    @jax.jit
    def step(params, opt_state, batch):
        import optax

        (_, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, ce, aux, optax.global_norm(grads)

    return step


def heldout_loss(params: P.Params, config: Config, stream: np.ndarray, n_windows: int, seq_len: int,
                 compute_dtype: Any = jnp.float32, batch: int = 16) -> float:
    """Mean next-token loss over `n_windows` fixed, evenly spaced windows of the held-out stream."""
    starts = np.linspace(0, len(stream) - seq_len - 2, n_windows).astype(np.int64)
    run = P.cast(params, compute_dtype)
    total = 0.0
    for i in range(0, n_windows, batch):
        w = jnp.asarray(windows(stream, starts[i:i + batch], seq_len + 1))
        logits = M.forward(run, w[:, :-1], config)
        total += float(jnp.sum(token_nll(logits, w[:, 1:])))
    return total / (n_windows * seq_len)


# ---------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = TrainConfig()
    ap.add_argument("--out", default=str(BUILTIN_DIR), help="checkpoint directory (default: the built-in model)")
    ap.add_argument("--steps", type=int, default=defaults.steps)
    ap.add_argument("--batch", type=int, default=defaults.batch)
    ap.add_argument("--seq-len", type=int, default=defaults.seq_len)
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--warmup", type=int, default=defaults.warmup)
    ap.add_argument("--aux-loss", type=float, default=defaults.aux_loss, help="router load-balancing weight (0: off)")
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--eval-every", type=int, default=defaults.eval_every)
    ap.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size, specials included")
    ap.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="activation dtype; the master weights and optimizer state stay float32")
    ap.add_argument("--experts", default="auto", choices=["auto", "ragged", "blocked"],
                    help="expert matmuls while training: the model's ragged_dot path, or expert-pure blocks "
                         "(same result, faster on the CPU); auto picks blocked on the CPU")
    ap.add_argument("--stdlib", help="source tree to train on (default: this Python's standard library)")
    ap.add_argument("--heldout-text", help="also write the held-out files, concatenated, to this path")
    ap.add_argument("--list-heldout", action="store_true", help="print the held-out files' paths and exit")
    args = ap.parse_args()
    if args.list_heldout:
        print("\n".join(str(f) for f in split_files(args.stdlib and pathlib.Path(args.stdlib))[1]))
        return
    tc = TrainConfig(steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr, warmup=args.warmup,
                     aux_loss=args.aux_loss, seed=args.seed, eval_every=args.eval_every)
    compute_dtype = jnp.dtype(args.compute_dtype)
    experts_impl = args.experts
    if experts_impl == "auto":
        experts_impl = "blocked" if jax.default_backend() == "cpu" else "ragged"

    from tqdm.auto import tqdm

    root = pathlib.Path(args.stdlib or sysconfig.get_paths()["stdlib"])
    train_files, held_files = split_files(root)
    if not train_files or not held_files:
        raise SystemExit(f"error: no Python sources found under {root}")
    train_texts, held_texts = read_texts(train_files), read_texts(held_files)
    t0 = time.perf_counter()
    tok = train_tokenizer(train_texts, args.vocab)
    train_stream, held_stream = encode_stream(tok, train_texts), encode_stream(tok, held_texts)
    print(f"{len(train_files)} training files ({len(train_stream):,} tokens), {len(held_files)} held out "
          f"({len(held_stream):,} tokens); tokenizer {tok.get_vocab_size()} tokens in {time.perf_counter() - t0:.0f}s")
    if args.heldout_text:
        pathlib.Path(args.heldout_text).write_text("".join(held_texts))

    config = model_config(tok.get_vocab_size())
    params = P.init_params(config, jax.random.key(tc.seed), jnp.float32)
    check_training_forward(params, config, experts_impl, train_stream[:65][None])
    optimizer, schedule = make_optimizer(tc)
    opt_state = optimizer.init(params)
    step = build_step(config, tc, optimizer, compute_dtype, experts_impl)
    rng = np.random.default_rng(tc.seed)
    print(f"model: {config.param_count():,} parameters; {tc.steps} steps of {tc.batch} x {tc.seq_len} tokens")

    history = []
    start = time.perf_counter()
    bar = tqdm(range(1, tc.steps + 1), desc="training", unit="step")
    smooth = None
    for i in bar:
        starts = rng.integers(0, len(train_stream) - tc.seq_len - 1, tc.batch)
        batch = jnp.asarray(windows(train_stream, starts, tc.seq_len + 1))
        params, opt_state, ce, aux, gnorm = step(params, opt_state, batch)
        ce = float(ce)
        smooth = ce if smooth is None else 0.95 * smooth + 0.05 * ce
        bar.set_postfix(loss=f"{smooth:.3f}", aux=f"{float(aux):.3f}", gnorm=f"{float(gnorm):.2f}",
                        lr=f"{float(schedule(i - 1)):.1e}")
        if i % tc.eval_every == 0 or i == tc.steps:
            held = heldout_loss(params, config, held_stream, tc.eval_windows, tc.seq_len, compute_dtype)
            history.append({"step": i, "train_loss": round(smooth, 4), "heldout_loss": round(held, 4),
                            "minutes": round((time.perf_counter() - start) / 60, 2)})
            bar.write(f"step {i}: train {smooth:.3f}, held-out {held:.3f} (ppl {math.exp(held):.1f})")
    seconds = time.perf_counter() - start

    bf16_params = P.cast(params, jnp.bfloat16)
    held = heldout_loss(bf16_params, config, held_stream, tc.eval_windows, tc.seq_len)
    info = {
        "source": "scripts/train_demo.py",
        "train": {**dataclasses.asdict(tc), "experts": experts_impl, "vocab": tok.get_vocab_size(),
                  "compute_dtype": args.compute_dtype,
                  "parameters": config.param_count(), "tokens_seen": tc.steps * tc.batch * tc.seq_len,
                  "train_files": len(train_files), "train_tokens": int(len(train_stream)),
                  "heldout_files": len(held_files), "heldout_tokens": int(len(held_stream)),
                  "python": platform.python_version(),
                  "machine": f"{platform.machine()} {jax.devices()[0].device_kind}",
                  "seconds": round(seconds), "heldout_loss_bf16": round(held, 4),
                  "heldout_ppl_bf16": round(math.exp(held), 2), "history": history},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(str(pathlib.Path(tmp) / "tokenizer.json"))
        out = checkpoint.save(args.out, bf16_params, config, tokenizer_dir=tmp, overwrite=True, extra=info)
    print(f"wrote {out}: held-out loss {held:.3f} (perplexity {math.exp(held):.1f}) after {seconds / 60:.1f} min")
    print(json.dumps(info["train"], indent=1))


if __name__ == "__main__":
    main()
