"""The public Python API: `load`, `logits`, `generate` and `generate_stream`.

Dimensions: B prompts, T tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxfire import checkpoint, model as M
from jaxfire import params as P
from jaxfire import sharding as S
from jaxfire.chat import ChatTemplate
from jaxfire.config import Config
from jaxfire.engine import SEED_LIMIT, Engine, TokenEvent
from jaxfire.errors import JaxfireError
from jaxfire.params import Params
from jaxfire.quant import QArray
from jaxfire.tokenizer import Tokenizer

BUILTIN_DIR = pathlib.Path(__file__).resolve().parent / "builtin"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class GenerationError(JaxfireError):
    pass


@dataclasses.dataclass
class Model:
    config: Config
    params: Params
    tokenizer: Tokenizer | None
    path: pathlib.Path | None = None
    runtime: M.Runtime = M.Runtime()
    kv_cache_dtype: Any = None  # None: the model's compute dtype; "fp8" for an FP8 cache

    @property
    def dtype(self) -> Any:
        """The compute (activation) dtype; FP8 models compute in bf16."""
        return self.params.embed.dtype

    @property
    def is_fp8(self) -> bool:
        return any(isinstance(w, QArray) for w in jax.tree.leaves(self.params, is_leaf=P.is_weight))

    def bind_chat_template(self, template: ChatTemplate) -> ChatTemplate:
        """A template given by hand (`ChatTemplate.from_file`) naming this model's special tokens: its
        tokenizer files', else the tokens of the config's BOS and EOS ids."""
        if self.tokenizer is None:
            raise JaxfireError(f"{self.path} has no tokenizer, so it cannot take chat messages")
        cfg = self.config
        return template.with_special_tokens(self.tokenizer.special_tokens(
            cfg.bos_token_id, cfg.eos_token_ids[0] if cfg.eos_token_ids else None))

    def with_runtime(self, **changes: Any) -> "Model":
        """The same weights run another way (kernels, FP8 policy); nothing is copied."""
        return dataclasses.replace(self, runtime=dataclasses.replace(self.runtime, **changes))


def _resolve_dtype(dtype: Any) -> Any:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise JaxfireError(f"unsupported dtype {dtype!r}; choose one of {', '.join(_DTYPES)}, fp8")
        return _DTYPES[dtype]
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        raise JaxfireError(f"unsupported dtype {dtype!r}") from None
    if resolved not in map(jnp.dtype, _DTYPES.values()):
        raise JaxfireError(f"unsupported dtype {resolved}; choose one of {', '.join(_DTYPES)}, fp8")
    return resolved


def _dequantize(tree: Any, spec_tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda w: w.dequantize(dtype) if isinstance(w, QArray) else w, tree, is_leaf=P.is_weight)


def load(path: str | pathlib.Path | None = None, *, dtype: Any = None, num_experts_per_tok: int | None = None,
         kv_cache_dtype: Any = None, mesh: jax.sharding.Mesh | None = None, runtime: M.Runtime | None = None,
         progress: bool = False) -> Model:
    """Loads a converted checkpoint directory, or the built-in model when `path` is None.

    dtype: "float32", "bfloat16", "fp8" or a jnp dtype; defaults to the checkpoint's own. "fp8"
      quantizes a bf16/f32 checkpoint layer by layer as it loads (attention projections and experts
      to e4m3 with per-channel scales; embeddings, norms, router and LM head in bf16); a float dtype
      on an FP8 checkpoint dequantizes it.
    num_experts_per_tok: overrides how many experts each token runs (the FP8 recipe runs 3).
    kv_cache_dtype: the KV cache's dtype for generation, independent of the weights' ("fp8" for an
      FP8 cache with per-token scales); defaults to the compute dtype.
    mesh: a device mesh (`jaxfire.make_mesh`): every array is read from the checkpoint straight into
      its sharded layout (experts over "expert", attention heads over "tensor"), and the model runs
      expert-parallel over it.

    The query, key and value projections of each layer come back fused as one weight,
    `params.layers[i].attn.wqkv` (layout in `jaxfire.params.qkv_spec`; wq, wk and wv are then None),
    except on a mesh whose tensor axis does not divide the KV heads.
    """
    path = BUILTIN_DIR if path is None else pathlib.Path(path)
    meta = checkpoint.read_metadata(path)
    config = Config.from_dict(meta["config"])
    if num_experts_per_tok is not None:
        config = config.replace(num_experts_per_tok=num_experts_per_tok)
    runtime = runtime or M.Runtime()
    if mesh is not None:
        S.check_experts(mesh, config.num_experts)
        runtime = dataclasses.replace(runtime, mesh=mesh)
    stored_fp8 = bool(meta.get("fp8"))
    cast, transform = None, None
    if dtype == "fp8":
        cast = None if stored_fp8 else jnp.bfloat16
        transform = None if stored_fp8 else P.quantize
    else:
        cast = _resolve_dtype(dtype)
        if stored_fp8 and cast is not None:
            transform = functools.partial(_dequantize, dtype=cast)
    if kv_cache_dtype not in (None, "fp8"):
        kv_cache_dtype = _resolve_dtype(kv_cache_dtype)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = lambda it: tqdm(it, desc="loading", unit="layer")  # noqa: E731
    params = checkpoint.restore(path, config, fp8=stored_fp8, dtype=cast, sharding_fn=S.param_sharding_fn(mesh),
                                transform=transform, progress=bar)
    params = P.fuse_qkv(params, config, mesh)
    return Model(config=config, params=params, tokenizer=Tokenizer.from_dir(path), path=path, runtime=runtime,
                 kv_cache_dtype=kv_cache_dtype)


def _is_single_prompt(prompts) -> bool:
    """A string or one list of token ids, rather than a batch of them."""
    return isinstance(prompts, str) or bool(len(prompts) and isinstance(prompts[0], (int, np.integer)))


def _as_token_lists(model: Model, prompts: Sequence[str | Sequence[int]] | str) -> list[list[int]]:
    if _is_single_prompt(prompts):
        prompts = [prompts]
    if not len(prompts):
        raise GenerationError("no prompts given")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if model.tokenizer is None:
                raise GenerationError("this model has no tokenizer: pass prompts as lists of token ids")
            ids = model.tokenizer.encode(p)
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise GenerationError(f"prompt {i} is empty")
        bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary "
                                  f"[0, {model.config.vocab_size})")
        out.append(ids)
    return out


def logits(model: Model, tokens: Sequence[Sequence[int]] | jax.Array) -> jax.Array:
    """Full-sequence forward pass without a cache: float32 [B, T, V]."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise GenerationError(f"tokens must be [batch, length], got shape {tokens.shape}")
    return M.forward(model.params, tokens, model.config, model.runtime)


def _bucket(n: int, minimum: int = 16) -> int:
    """Rounds a length up to a power of two so repeated calls reuse compiled shapes."""
    return max(minimum, 1 << (n - 1).bit_length())


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt (EOS and stop ids not included)
    texts: list[str] | None  # the streamed text per prompt (ending before a stop string), None without a tokenizer
    finish_reasons: list[str]
    prompt_tokens: list[list[int]]
    # per prompt, each token's log-probability under the model (before temperature, top-p and top-k)
    logprobs: list[list[float]] = dataclasses.field(default_factory=list)
    # per prompt and token, the `top_logprobs` likeliest (id, log-probability) pairs ([] when not asked)
    top_logprobs: list[list[tuple[tuple[int, float], ...]]] = dataclasses.field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return sum(map(len, self.prompt_tokens)) / max(self.prefill_seconds, 1e-9)

    @property
    def decode_tokens_per_second(self) -> float:
        steps = sum(map(len, self.tokens)) - len(self.tokens)  # the first token of each comes from prefill
        return max(steps, 0) / max(self.decode_seconds, 1e-9)


def generate_stream(model: Model, prompts, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                    top_k: int = 0, seed: int = 0, stop_token_ids: Sequence[int] = (), stop: str | Sequence[str] = (),
                    top_logprobs: int = 0, logit_bias: Mapping[int, float] | None = None,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0, repetition_penalty: float = 1.0,
                    min_tokens: int = 0, stats: Generation | None = None) -> Iterator[TokenEvent]:
    """Batched generation yielding each token as it is produced; stops each prompt at EOS, at one of
    `stop_token_ids` (neither is output), once its text holds one of the `stop` strings (the text
    ends before it) or at the limit. top_k 0 keeps every token. top_logprobs N (at most 20) lists the
    N likeliest ids at each position with their log-probabilities (`TokenEvent.top_logprobs`).
    logit_bias (token id -> a number in [-100, 100], at most 300 ids) is added to every prompt's
    logits before sampling, and the sampling penalties (presence and frequency in [-2, 2], repetition
    above 0) change them before that, as the engine's `submit` takes them; so does min_tokens (no EOS,
    stop id or stop string before that many tokens).

    Runs on a `jaxfire.Engine` with one slot per prompt. Prompt i samples with seed + i (mod 2**32),
    so each prompt's tokens are those it gets generated alone with that seed.
    """
    cfg = model.config
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
    ids = _as_token_lists(model, prompts)
    longest = max(map(len, ids))
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise GenerationError(f"prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the model's "
                              f"{cfg.max_position_embeddings} positions")
    engine = Engine(model, slots=len(ids), max_len=_bucket(longest + max_new_tokens))
    try:
        requests = [engine.submit(p, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                  seed=(seed + i) % SEED_LIMIT, stop_token_ids=stop_token_ids, stop=stop,
                                  top_logprobs=top_logprobs, logit_bias=logit_bias,
                                  presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                  repetition_penalty=repetition_penalty, min_tokens=min_tokens)
                    for i, p in enumerate(ids)]
        if stats is not None:
            stats.prompt_tokens = ids
            if model.tokenizer is not None:
                stats.texts = [""] * len(ids)
        started = set()
        start = time.perf_counter()
        decode_start = None
        while engine.busy:
            events = engine.step()
            now = time.perf_counter()
            for event in events:
                started.add(event.index)
                if stats is not None:
                    if event.text is not None:
                        stats.texts[event.index] += event.text
                    if event.finished:
                        stats.tokens[event.index] = requests[event.index].tokens
                        stats.logprobs[event.index] = requests[event.index].logprobs
                        stats.top_logprobs[event.index] = requests[event.index].top_logprobs
                        stats.finish_reasons[event.index] = event.finish_reason
            if stats is not None and events:
                if decode_start is None and len(started) == len(ids):
                    decode_start = now
                    stats.prefill_seconds = now - start
                elif decode_start is not None:
                    stats.decode_seconds = now - decode_start
            yield from events
    finally:
        engine.close()


def generate(model: Model, prompts, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int = 0, stop_token_ids: Sequence[int] = (),
             stop: str | Sequence[str] = (), top_logprobs: int = 0,
             logit_bias: Mapping[int, float] | None = None, presence_penalty: float = 0.0,
             frequency_penalty: float = 0.0, repetition_penalty: float = 1.0, min_tokens: int = 0) -> Generation:
    """Batched generation; prompts are strings or lists of token ids. Returns tokens, texts and timings.
    Arguments as for `generate_stream`."""
    n = 1 if _is_single_prompt(prompts) else len(prompts)
    result = Generation(tokens=[[] for _ in range(n)], texts=None, finish_reasons=[""] * n, prompt_tokens=[],
                        logprobs=[[] for _ in range(n)], top_logprobs=[[] for _ in range(n)])
    for _ in generate_stream(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             top_k=top_k, seed=seed, stop_token_ids=stop_token_ids, stop=stop,
                             top_logprobs=top_logprobs, logit_bias=logit_bias, presence_penalty=presence_penalty,
                             frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
                             min_tokens=min_tokens, stats=result):
        pass
    return result
