"""The model's weights, described once.

`describe(config)` returns the parameter pytree with a `ParamSpec` (shape, logical axes, initializer,
whether FP8 may quantize it) at every leaf. Initialisation, sharding, the converter's shape checks and
checkpoint restore all derive from that one description.

Dimensions: V vocab, D model width, H query heads, G key/value heads, K head dim, E experts,
F expert width, L layers. Every matrix is stored [out, in] (the Hugging Face layout), which is also the
K-major layout that Hopper runs FP8 matmuls fastest in; `quant.dense` computes x @ w.T.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxfire import sharding as S
from jaxfire.config import Config
from jaxfire.quant import QArray, quantize_weight


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    logical_axes: tuple[str | None, ...]
    init: str = "normal"  # "normal" (std 0.02, as Hugging Face initialises Mixtral) or "ones"
    quantizable: bool = False  # FP8 may store it (attention projections and experts)
    # Per axis, the size of the unit a split must not cut: head_dim for the flattened head axes, so a
    # mesh splits whole heads or replicates (one KV head under tensor parallelism).
    blocks: tuple[int, ...] | None = None


def _register(cls):
    return jax.tree_util.register_dataclass(dataclasses.dataclass(cls))


@_register
class Attention:
    wq: Any  # [H*K, D]; None once fused into wqkv
    wk: Any  # [G*K, D]; None once fused into wqkv
    wv: Any  # [G*K, D]; None once fused into wqkv
    wo: Any  # [D, H*K]
    wqkv: Any = None  # [G*(R+2)*K, D], the three above as one weight (`fuse_qkv`); not stored in checkpoints


@_register
class MoE:
    router: Any  # [E, D]
    w_gate_up: Any  # [E, 2, F, D]: gate (w1), then up (w3); F splits over the tensor axis with both halves
    w_down: Any  # [E, D, F]


@_register
class Layer:
    attn_norm: Any  # [D]
    attn: Attention
    moe_norm: Any  # [D]
    moe: MoE


@_register
class Params:
    embed: Any  # [V, D]
    layers: list[Layer]
    final_norm: Any  # [D]
    lm_head: Any  # [V, D], None when tied to the embedding


# Logical axes of the expert weights (the MoE block's shard_map places its operands by them too).
GATE_UP_AXES = ("experts", None, "mlp", "embed")  # [E, 2, F, D]
DOWN_AXES = ("experts", "embed", "mlp")  # [E, D, F]


def describe_layer(c: Config) -> Layer:
    d, hk, gk, e, f = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_experts, c.intermediate_size
    heads_in, heads_out = (c.head_dim, 1), (1, c.head_dim)
    return Layer(
        attn_norm=ParamSpec((d,), ("embed",), init="ones"),
        attn=Attention(
            wq=ParamSpec((hk, d), ("heads", "embed"), quantizable=True, blocks=heads_in),
            wk=ParamSpec((gk, d), ("kv_heads", "embed"), quantizable=True, blocks=heads_in),
            wv=ParamSpec((gk, d), ("kv_heads", "embed"), quantizable=True, blocks=heads_in),
            wo=ParamSpec((d, hk), ("embed", "heads"), quantizable=True, blocks=heads_out),
        ),
        moe_norm=ParamSpec((d,), ("embed",), init="ones"),
        moe=MoE(
            router=ParamSpec((e, d), (None, "embed")),
            w_gate_up=ParamSpec((e, 2, f, d), GATE_UP_AXES, quantizable=True),
            w_down=ParamSpec((e, d, f), DOWN_AXES, quantizable=True),
        ),
    )


def qkv_spec(c: Config) -> ParamSpec:
    """The fused query/key/value projection: per KV head g, rows for its R query heads, its key head and
    its value head, (R + 2) * K rows in all. A split over whole groups gives each device the heads of
    all three projections that its share of the attention needs."""
    per_group = (c.num_heads // c.num_kv_heads + 2) * c.head_dim
    return ParamSpec((c.num_kv_heads * per_group, c.hidden_size), ("kv_heads", "embed"), quantizable=True,
                     blocks=(per_group, 1))


def fuse_qkv(params: Params, c: Config, mesh: Any = None) -> Params:
    """Every layer's wq, wk and wv as one `wqkv` weight (layout in `qkv_spec`): one matmul a layer reads
    the three, which a step of a few tokens runs near the bandwidth that three narrow ones cannot reach
    (and an FP8 prefill quantizes its activations once). On a mesh whose tensor axis does not divide the
    KV heads (one KV head replicated while query heads split) the weights stay apart."""
    if mesh is not None and c.num_kv_heads % mesh.shape["tensor"]:
        return params
    spec = qkv_spec(c)
    placements = {False: None, True: None}  # by FP8: the weight's placement, or its (value, scale) ones
    if mesh is not None:
        place, q = S.param_sharding_fn(mesh), quantized_spec(spec)
        placements = {False: place(spec), True: (place(q.value), place(q.scale))}
    layers = []
    for layer in params.layers:
        a = layer.attn
        if a.wqkv is None:
            wqkv = _fuser(c.num_kv_heads, placements[isinstance(a.wq, QArray)])(a.wq, a.wk, a.wv)
            a = Attention(wq=None, wk=None, wv=None, wo=a.wo, wqkv=wqkv)
        layers.append(dataclasses.replace(layer, attn=a))
    return dataclasses.replace(params, layers=layers)


@functools.lru_cache(maxsize=None)
def _fuser(groups: int, out_shardings: Any) -> Callable:
    def interleave(wq, wk, wv):  # [H*K, ...], [G*K, ...], [G*K, ...] (values or per-row scales)
        rest = wq.shape[1:]
        parts = [w.reshape(groups, -1, *rest) for w in (wq, wk, wv)]  # [G, R*K | K | K, ...]
        return jnp.concatenate(parts, axis=1).reshape(-1, *rest)

    def fuse(wq, wk, wv):
        return jax.tree.map(interleave, wq, wk, wv)

    if isinstance(out_shardings, tuple):  # an FP8 weight: a QArray of two placements
        out_shardings = QArray(value=out_shardings[0], scale=out_shardings[1])
    return jax.jit(fuse, out_shardings=out_shardings)


def quantized_spec(spec: ParamSpec) -> QArray:
    """An FP8 weight's description: values shaped as the weight, one scale per output channel."""
    blocks = spec.blocks[:-1] if spec.blocks else None
    return QArray(value=spec, scale=ParamSpec(spec.shape[:-1], spec.logical_axes[:-1], init="ones", blocks=blocks))


def describe(c: Config, fp8: bool = False) -> Params:
    """The abstract parameter tree of a model: a `ParamSpec` at every leaf.

    With `fp8`, each quantizable weight is a `QArray` of two specs (values and scales).
    """
    v, d = c.vocab_size, c.hidden_size
    layer = describe_layer(c)
    if fp8:
        layer = map_specs(lambda s: quantized_spec(s) if s.quantizable else s, layer)
    return Params(
        embed=ParamSpec((v, d), ("vocab", "embed")),
        layers=[layer for _ in range(c.num_layers)],
        final_norm=ParamSpec((d,), ("embed",), init="ones"),
        lm_head=None if c.tie_word_embeddings else ParamSpec((v, d), ("vocab", "embed")),
    )


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def map_specs(fn: Callable[[ParamSpec], Any], tree: Any) -> Any:
    return jax.tree.map(fn, tree, is_leaf=is_spec)


_quantize_weight = jax.jit(quantize_weight)  # one fused pass per weight: no float32 copy of it in memory


def param_count(c: Config) -> int:
    return sum(math.prod(s.shape) for s in jax.tree.leaves(describe(c), is_leaf=is_spec))


def init_params(c: Config, key: jax.Array, dtype: Any = jnp.float32, std: float = 0.02, fp8: bool = False,
                sharding_fn: Callable[[ParamSpec], Any] | None = None) -> Params:
    """Random weights drawn as Hugging Face initialises Mixtral (normal(0, std), norms at one).

    With `fp8`, quantizable weights are quantized as they are drawn, so a full-size FP8 model never
    exists in `dtype` all at once. `sharding_fn(spec)` places each weight as it is drawn (each device
    draws only its own part), so a model larger than one device can be built on a mesh.
    """
    specs = describe(c)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))

    def one(spec: ParamSpec, k: jax.Array) -> Any:
        sharding = sharding_fn(spec) if sharding_fn else None
        scale = 0.0 if spec.init == "ones" else std
        w = _draw(k, spec.shape, scale, jnp.dtype(dtype), sharding)
        return _quantize_weight(w) if fp8 and spec.quantizable else w

    return jax.tree.unflatten(treedef, [one(s, k) for s, k in zip(leaves, keys)])


@functools.lru_cache(maxsize=None)
def _drawer(shape: tuple[int, ...], std: float, dtype: Any, sharding: Any) -> Callable:
    def draw(key):
        if std == 0.0:
            return jnp.ones(shape, dtype)
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return jax.jit(draw, out_shardings=sharding)


def _draw(key, shape, std, dtype, sharding) -> jax.Array:
    return _drawer(shape, std, dtype, sharding)(key)


def is_weight(x: Any) -> bool:
    """Leaves of a params tree as the model sees them: arrays and whole `QArray`s."""
    return isinstance(x, QArray)


def cast(tree: Any, dtype: Any) -> Any:
    """Casts plain weights to `dtype`; FP8 weights keep their values and float32 scales."""
    return jax.tree.map(lambda w: w if isinstance(w, QArray) else w.astype(dtype), tree, is_leaf=is_weight)


def quantize(tree: Any, spec_tree: Any, dtype: Any = jnp.bfloat16) -> Any:
    """FP8 (e4m3, per-output-channel scales) for every quantizable weight; the rest cast to `dtype`."""
    def one(spec: ParamSpec, w: Any) -> Any:
        if isinstance(w, QArray):
            return w
        return _quantize_weight(w) if spec.quantizable else w.astype(dtype)

    return jax.tree.map(one, spec_tree, tree, is_leaf=is_spec)
