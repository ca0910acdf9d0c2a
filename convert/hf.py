"""Hugging Face Mixtral checkpoints to jaxfire checkpoints, one layer at a time.

The key map below is the whole translation: each Hugging Face tensor name pattern names the jaxfire
parameter it fills. Experts arrive either one tensor per expert (`block_sparse_moe.experts.{e}.w1`, as
checkpoints on disk are) or fused (`mlp.experts.gate_up_proj`, as newer transformers keeps them in
memory); both are stacked into `w_gate_up` [E, 2, F, D] (gate, then up) and `w_down` [E, D, F].
"""

from __future__ import annotations

import os
import pathlib
import re
import warnings
from typing import Any

import jax
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from convert.readers import TensorIndex, open_model_dir
from jaxfire import checkpoint
from jaxfire import params as P
from jaxfire.config import Config
from jaxfire.errors import JaxfireError

GLOBAL_KEYS = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "final_norm",
    "lm_head.weight": "lm_head",
}

# Per-layer tensors: pattern after "model.layers.{i}." -> (path in the Layer tree, where in it).
# "where" is None for a whole tensor, ("gate"|"up"|"down", e) for one expert's slice, "gate_up" / "down"
# for a fused stack of all experts.
LAYER_KEYS: list[tuple[str, tuple[str, ...], Any]] = [
    (r"input_layernorm\.weight", ("attn_norm",), None),
    (r"post_attention_layernorm\.weight", ("moe_norm",), None),
    (r"self_attn\.q_proj\.weight", ("attn", "wq"), None),
    (r"self_attn\.k_proj\.weight", ("attn", "wk"), None),
    (r"self_attn\.v_proj\.weight", ("attn", "wv"), None),
    (r"self_attn\.o_proj\.weight", ("attn", "wo"), None),
    (r"(?:block_sparse_moe|mlp)\.gate\.weight", ("moe", "router"), None),
    (r"block_sparse_moe\.experts\.(\d+)\.w1\.weight", ("moe", "w_gate_up"), "gate"),
    (r"block_sparse_moe\.experts\.(\d+)\.w3\.weight", ("moe", "w_gate_up"), "up"),
    (r"block_sparse_moe\.experts\.(\d+)\.w2\.weight", ("moe", "w_down"), "down"),
    (r"mlp\.experts\.gate_up_proj", ("moe", "w_gate_up"), "fused"),
    (r"mlp\.experts\.down_proj", ("moe", "w_down"), "fused"),
]
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16,
          "fp8": ml_dtypes.bfloat16}  # fp8: quantizable weights in e4m3 with scales, the rest in bf16


class ConversionError(JaxfireError):
    """A source checkpoint that cannot be converted."""


def _spec_at(tree: Any, path: tuple[str, ...]) -> P.ParamSpec:
    for name in path:
        tree = getattr(tree, name)
    return tree


def _check_shape(name: str, array: np.ndarray, expected: tuple[int, ...]) -> None:
    if tuple(array.shape) != tuple(expected):
        raise ConversionError(f"tensor {name} has shape {tuple(array.shape)}, expected {tuple(expected)}")


def _group_by_layer(index: TensorIndex, config: Config) -> dict[int, list[str]]:
    by_layer: dict[int, list[str]] = {i: [] for i in range(config.num_layers)}
    for name in index.names():
        if name in GLOBAL_KEYS or IGNORED.match(name):
            continue
        m = _LAYER.fullmatch(name)
        if not m:
            raise ConversionError(f"unexpected tensor {name} in {index.file_of(name)}: not part of a Mixtral model")
        i = int(m.group(1))
        if i >= config.num_layers:
            raise ConversionError(f"tensor {name} belongs to layer {i}, but the config has {config.num_layers} layers")
        by_layer[i].append(name)
    return by_layer


def convert_layer(index: TensorIndex, names: list[str], i: int, config: Config, dtype) -> P.Layer:
    """Assembles decoder layer i from its tensors, checking every shape against the description."""
    spec = P.describe_layer(config)
    f, e_count = config.intermediate_size, config.num_experts
    values: dict[tuple[str, ...], np.ndarray] = {}
    filled: dict[tuple[str, ...], np.ndarray] = {}  # expert slices seen per stacked tensor
    prefix = f"model.layers.{i}."
    for name in names:
        rest = name[len(prefix):]
        for pattern, path, where in LAYER_KEYS:
            m = re.fullmatch(pattern, rest)
            if m:
                break
        else:
            raise ConversionError(f"unexpected tensor {name}: not part of a Mixtral decoder layer")
        target = _spec_at(spec, path)
        array = index.load(name)
        if where is None or where == "fused":
            # The fused gate_up_proj stacks gate and up along one axis of 2F rows.
            gate_up = where == "fused" and path[-1] == "w_gate_up"
            shape = (target.shape[0], 2 * f, *target.shape[3:]) if gate_up else target.shape
            _check_shape(name, array, shape)
            values[path] = array.reshape(target.shape).astype(dtype)
            continue
        e = int(m.group(1))
        if e >= e_count:
            raise ConversionError(f"tensor {name} is expert {e}, but the config has {e_count} experts")
        if path not in values:
            values[path] = np.empty(target.shape, dtype)
            filled[path] = np.zeros((e_count, 2 if path[-1] == "w_gate_up" else 1), bool)
        stacked, seen = values[path], filled[path]
        if where == "down":
            _check_shape(name, array, target.shape[1:])
            stacked[e], seen[e, 0] = array, True
        else:
            _check_shape(name, array, (f, config.hidden_size))
            half = 0 if where == "gate" else 1
            stacked[e, half], seen[e, half] = array, True
    for path, seen in filled.items():
        if not seen.all():
            e, part = map(int, np.argwhere(~seen)[0])
            what = {("w_gate_up", 0): "w1", ("w_gate_up", 1): "w3", ("w_down", 0): "w2"}[(path[-1], part)]
            raise ConversionError(f"missing tensor {prefix}block_sparse_moe.experts.{e}.{what}.weight")
    nested: dict[str, Any] = {}
    for path, array in values.items():
        node = nested
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = array
    try:
        return checkpoint.from_nested(spec, nested)
    except KeyError as e:
        raise ConversionError(f"missing tensor for layer {i}: {e.args[0]} "
                              f"(expected a Hugging Face tensor under {prefix})") from None


def _source_dtype(index: TensorIndex) -> Any:
    name = "model.embed_tokens.weight"
    return index.load(name).dtype if name in index else np.dtype(np.float32)


def convert_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str | None = None,
               overwrite: bool = False, progress: bool = True) -> pathlib.Path:
    """Converts a Hugging Face Mixtral directory into a jaxfire checkpoint at `out_dir`.

    `dtype` ("float32", "bfloat16", "float16", "fp8") defaults to the source's own precision. "fp8"
    stores attention projections and experts as float8_e4m3fn with per-output-channel scales (the same
    quantization `jaxfire.load(..., dtype="fp8")` applies) and everything else in bf16.
    """
    hf_dir = pathlib.Path(hf_dir)
    config = Config.from_hf(hf_dir)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"unsupported --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    index = open_model_dir(hf_dir)
    target = DTYPES[dtype] if dtype else _source_dtype(index)
    by_layer = _group_by_layer(index, config)
    specs = P.describe(config)

    def global_tensor(name: str, spec: P.ParamSpec) -> np.ndarray:
        if name not in index:
            raise ConversionError(f"missing tensor {name} in {hf_dir}")
        array = index.load(name)
        _check_shape(name, array, spec.shape)
        return array.astype(target)

    has_tokenizer = any((hf_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))
    if not has_tokenizer:
        warnings.warn(f"{hf_dir} has no tokenizer files; the converted model will work on token ids only",
                      stacklevel=2)
    with checkpoint.CheckpointWriter(out_dir, config, overwrite=overwrite) as writer:
        steps = tqdm(total=config.num_layers + 1, desc="converting", unit="layer", disable=not progress)
        with steps:
            writer.write_globals(
                embed=global_tensor("model.embed_tokens.weight", specs.embed),
                final_norm=global_tensor("model.norm.weight", specs.final_norm),
                lm_head=None if config.tie_word_embeddings else global_tensor("lm_head.weight", specs.lm_head),
            )
            steps.update()
            for i in range(config.num_layers):
                layer = convert_layer(index, by_layer[i], i, config, target)
                if dtype == "fp8":
                    with jax.default_device(jax.devices("cpu")[0]):
                        layer = P.quantize(layer, P.describe_layer(config))
                writer.write_layer(i, layer)
                steps.update()
        writer.copy_tokenizer(hf_dir)
        return writer.close({"source": str(hf_dir)})
