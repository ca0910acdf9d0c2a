"""jaxfire checkpoints: orbax items per layer, the config, and the tokenizer files.

Layout of a checkpoint directory:

    jaxfire.json          format version, model config, stored dtype; written last, so a directory
                          without it is not a checkpoint
    params/globals/       orbax item: embed, final_norm, lm_head
    params/layer_000/ ..  orbax item per decoder layer
    tokenizer.json ...    the tokenizer files of the source model, copied as they were

Items per layer let the converter write, and `restore` read, one layer at a time: peak host memory
stays near one layer's weights. A checkpoint is assembled in a sibling temporary directory and renamed
into place only once complete, so an interrupted write never leaves a directory that looks finished.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxfire import params as P
from jaxfire.config import Config
from jaxfire.errors import JaxfireError

FORMAT_FILE = "jaxfire.json"
FORMAT_VERSION = 2  # 2: experts' gate/up stored [E, 2, F, D] (1 stored [E, 2F, D])
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


class CheckpointError(JaxfireError):
    """A checkpoint directory that cannot be read or written."""


def _orbax():
    import orbax.checkpoint as ocp  # deferred: importing orbax costs about a second

    return ocp


def _key_name(k: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    raise TypeError(f"unsupported pytree key {k!r}")


def to_nested(tree: Any) -> dict[str, Any]:
    """A params (sub)tree as nested string-keyed dicts, the form orbax stores."""
    out: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        node = out
        names = [_key_name(k) for k in path]
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = leaf
    return out


def from_nested(template: Any, nested: dict[str, Any]) -> Any:
    """Rebuilds `template`'s structure with leaves looked up in `nested`.

    A missing leaf raises KeyError with its dotted path (e.g. "attn.wk").
    """
    paths, treedef = jax.tree_util.tree_flatten_with_path(template, is_leaf=P.is_spec)
    leaves = []
    for path, _ in paths:
        names = [_key_name(k) for k in path]
        node = nested
        try:
            for name in names:
                node = node[name]
        except (KeyError, TypeError):
            raise KeyError(".".join(names)) from None
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _globals(tree: P.Params) -> dict[str, Any]:
    g = {"embed": tree.embed, "final_norm": tree.final_norm}
    if tree.lm_head is not None:
        g["lm_head"] = tree.lm_head
    return g


def layer_item(i: int) -> str:
    return f"layer_{i:03d}"


class CheckpointWriter:
    """Writes a checkpoint item by item; the directory appears only when `close()` succeeds.

    Use as a context manager: leaving it by an exception discards everything written.
    """

    def __init__(self, out_dir: str | os.PathLike, config: Config, *, overwrite: bool = False):
        self.out = pathlib.Path(out_dir).absolute()
        if self.out.exists() and not self.out.is_dir():
            raise CheckpointError(f"output path {self.out} exists and is not a directory")
        if self.out.exists() and any(self.out.iterdir()) and not overwrite:
            raise CheckpointError(f"output directory {self.out} is not empty (pass overwrite to replace it)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        self.config = config
        self.dtypes: set[str] = set()
        self._ckptr = _orbax().StandardCheckpointer()

    def _save(self, item: str, tree: dict[str, Any]) -> None:
        for leaf in jax.tree.leaves(tree):
            self.dtypes.add(str(np.dtype(leaf.dtype)))
        self._ckptr.save(self.tmp / "params" / item, tree)
        self._ckptr.wait_until_finished()

    def write_globals(self, embed: Any, final_norm: Any, lm_head: Any = None) -> None:
        g = {"embed": embed, "final_norm": final_norm}
        if lm_head is not None:
            g["lm_head"] = lm_head
        self._save("globals", g)

    def write_layer(self, i: int, layer: P.Layer) -> None:
        self._save(layer_item(i), to_nested(layer))

    def copy_tokenizer(self, src_dir: str | os.PathLike) -> list[str]:
        copied = []
        for name in TOKENIZER_FILES:
            src = pathlib.Path(src_dir) / name
            if src.is_file():
                shutil.copy2(src, self.tmp / name)
                copied.append(name)
        return copied

    def close(self, extra: dict[str, Any] | None = None) -> pathlib.Path:
        missing = [layer_item(i) for i in range(self.config.num_layers)
                   if not (self.tmp / "params" / layer_item(i)).exists()]
        if not (self.tmp / "params" / "globals").exists():
            missing.insert(0, "globals")
        if missing:
            raise CheckpointError(f"checkpoint incomplete, items never written: {', '.join(missing)}")
        meta = {"format_version": FORMAT_VERSION, "config": self.config.to_dict(),
                "dtypes": sorted(self.dtypes), "fp8": "float8_e4m3fn" in self.dtypes, **(extra or {})}
        (self.tmp / FORMAT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def save(out_dir: str | os.PathLike, params: P.Params, config: Config, *, tokenizer_dir=None,
         overwrite: bool = False, extra: dict[str, Any] | None = None) -> pathlib.Path:
    """Writes a whole in-memory params tree as a checkpoint (with wq, wk, wv apart, as stored)."""
    if any(layer.attn.wqkv is not None for layer in params.layers):
        raise ValueError("these params hold fused query/key/value projections (attn.wqkv), a form checkpoints do "
                         "not store; save the params as restored or initialised, before jaxfire.params.fuse_qkv")
    with CheckpointWriter(out_dir, config, overwrite=overwrite) as w:
        w.write_globals(**_globals(params))
        for i, layer in enumerate(params.layers):
            w.write_layer(i, layer)
        if tokenizer_dir is not None:
            w.copy_tokenizer(tokenizer_dir)
        return w.close(extra)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    path = pathlib.Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    meta_path = path / FORMAT_FILE
    if not meta_path.is_file():
        hint = " (it looks like a Hugging Face model: convert it with `python -m convert`)" if (
            path / "config.json").is_file() else ""
        raise CheckpointError(f"{path} is not a jaxfire checkpoint: {FORMAT_FILE} is missing{hint}")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") == 1:
        raise CheckpointError(f"{meta_path}: format version 1 (experts' gate/up stored [E, 2F, D]) is no longer "
                              f"read; convert the checkpoint again with this version of jaxfire")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: unsupported format version {meta.get('format_version')!r}")
    return meta


def restore(path: str | os.PathLike, config: Config, *, fp8: bool = False, dtype: Any = None,
            sharding_fn: Callable[[P.ParamSpec], Any] | None = None,
            transform: Callable[[Any, Any], Any] | None = None,
            progress: Callable[[Iterator], Iterator] | None = None) -> P.Params:
    """Reads params item by item and places each array by `sharding_fn`.

    `fp8` says the checkpoint stores FP8 weights (`QArray`s). `dtype` casts plain weights (FP8 ones
    keep theirs). `transform(item, spec_item)` runs on each item as soon as it is read, before the
    next, so a load-time conversion (such as quantization) never holds two full copies.
    `sharding_fn(spec)` gives each array's sharding; orbax then reads every array straight into its
    sharded layout, never assembling a full copy on one device.
    """
    path = pathlib.Path(path)
    ocp = _orbax()
    ckptr = ocp.StandardCheckpointer()
    specs = P.describe(config, fp8=fp8)
    plain_specs = P.describe(config)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def target(spec: P.ParamSpec, stored) -> jax.ShapeDtypeStruct:
        if tuple(stored.shape) != spec.shape:
            raise CheckpointError(f"{path}: stored shape {tuple(stored.shape)} does not match {spec.shape}")
        sharding = sharding_fn(spec) if sharding_fn else default
        return jax.ShapeDtypeStruct(spec.shape, stored.dtype, sharding=sharding)

    def read(item: str, spec_tree: Any, plain_spec_tree: Any) -> Any:
        item_path = path / "params" / item
        if not item_path.exists():
            raise CheckpointError(f"{path}: checkpoint item params/{item} is missing")
        stored = ckptr.metadata(item_path).item_metadata
        try:
            abstract = jax.tree.map(target, spec_tree, from_nested(spec_tree, stored), is_leaf=P.is_spec)
        except KeyError as e:
            raise CheckpointError(f"{path}: params/{item} lacks the array {e.args[0]!r}") from None
        tree = from_nested(spec_tree, ckptr.restore(item_path, to_nested(abstract)))
        if dtype is not None:
            tree = P.cast(tree, dtype)
        return transform(tree, plain_spec_tree) if transform else tree

    glob = read("globals", _globals(specs), _globals(plain_specs))
    items = range(config.num_layers)
    layers = [read(layer_item(i), specs.layers[i], plain_specs.layers[i])
              for i in (progress(items) if progress else items)]
    return P.Params(embed=glob["embed"], layers=layers, final_norm=glob["final_norm"], lm_head=glob.get("lm_head"))
