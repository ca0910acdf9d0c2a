"""Device meshes and the one table that maps logical axis names to mesh axes.

The mesh has three axes:
- "data": independent replicas of the whole model, each serving its own sequences;
- "expert": experts split across devices (expert parallelism); sequences are split over it too, so
  attention runs data-parallel across the expert group and the MoE block exchanges tokens with
  all_to_all (see `jaxfire.moe`);
- "tensor": tensor parallelism. Attention heads are split across its devices, and so is every
  expert's width F: each device holds a slice of each of its experts' gate/up rows and down columns,
  runs its slice for all the group's tokens, and one psum adds the partial outputs.

Every parameter and cache array names its dimensions with logical axes (`jaxfire.params.ParamSpec`,
`jaxfire.kv_cache`); `RULES` places them. A dimension that its mesh axes do not divide is
replicated instead (for example the single KV head of an MQA model under tensor parallelism).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxfire.errors import JaxfireError

AXES = ("data", "expert", "tensor")

# logical axis -> mesh axes it is split over (None: replicated)
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "expert"),
    "tokens": ("data", "expert"),  # the MoE block's flat token axis (whole on every tensor device)
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "experts": ("expert",),
    "vocab": None,
    "embed": None,
    "mlp": ("tensor",),
    "cache_seq": None,
    "head_dim": None,
}


# Compiler options of every program that runs the model. XLA's one-shot all-reduce kernel (off by
# default in jax 0.11) has each device read its peers' partial sums over NVLink in one kernel, where
# NCCL runs a ring: small all-reduces (a decode step's psums over "tensor") take a fraction of the
# time. On 2 H100s (tensor=2, FP8, bench/results/decode.jsonl) a decode step went 14.8 -> 12.2 ms at
# batch 1, 13.7 -> 13.3 at 8 and 15.8 -> 15.4 at 32. Large all-reduces, other platforms and one
# device are unaffected.
COMPILER_OPTIONS = {"xla_gpu_unsupported_use_all_reduce_one_shot_kernel": True}


class MeshError(JaxfireError):
    pass


def make_mesh(devices: Sequence[jax.Device] | None = None, *, expert: int | None = None, tensor: int | None = None,
              data: int | None = None) -> Mesh:
    """A ("data", "expert", "tensor") mesh over `devices` (default: all).

    Axes left out take what the others leave; with none given, every device goes to the expert axis
    (expert parallelism, the layout that spreads Mixtral's weights evenly).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {"data": data, "expert": expert, "tensor": tensor}
    for name, size in sizes.items():
        if size is not None and (not isinstance(size, int) or size < 1):
            raise MeshError(f"mesh axis {name} must be a positive integer, got {size!r}")
    known = math.prod(s for s in sizes.values() if s is not None)
    missing = [k for k, s in sizes.items() if s is None]
    if n % known:
        raise MeshError(f"mesh axes {sizes} do not divide the {n} devices")
    if missing:
        fill = "expert" if "expert" in missing else missing[0]
        for k in missing:
            sizes[k] = n // known if k == fill else 1
    if math.prod(sizes.values()) != n:
        raise MeshError(f"mesh axes data={sizes['data']} x expert={sizes['expert']} x tensor={sizes['tensor']} "
                        f"use {math.prod(sizes.values())} devices, but {n} were given")
    grid = np.asarray(devices, dtype=object).reshape(sizes["data"], sizes["expert"], sizes["tensor"])
    return Mesh(grid, AXES)


def mesh_from_spec(text: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """`make_mesh` from axis sizes written as text, as the command lines take them: "tensor=2",
    "expert=4,tensor=2"."""
    axes: dict[str, int] = {}
    for pair in (p.strip() for p in text.split(",") if p.strip()):
        name, _, size = pair.partition("=")
        name = name.strip()
        if name not in AXES:
            raise MeshError(f"mesh axis {name!r} in {text!r} is not one of {', '.join(AXES)}")
        try:
            axes[name] = int(size)
        except ValueError:
            raise MeshError(f"mesh axis sizes are written axis=size (e.g. tensor=2), got {pair!r}") from None
    if not axes:
        raise MeshError(f"no mesh axes in {text!r}: write axis=size pairs, e.g. tensor=2")
    return make_mesh(devices, **axes)


def partition_spec(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int],
                   blocks: Sequence[int] | None = None) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes; axes that do not divide are replicated.

    `blocks[i]` is the unit a split of axis i must not cut (head_dim for a flattened head axis).
    """
    out: list[Any] = []
    for i, (name, dim) in enumerate(zip(logical_axes, shape)):
        dim //= blocks[i] if blocks else 1
        axes = RULES.get(name) if name else None
        if axes:
            # Drop trailing mesh axes until the rest divide the dimension (largest split that fits).
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            while axes and dim % math.prod(mesh.shape[a] for a in axes):
                axes = axes[:-1]
        out.append(axes[0] if axes and len(axes) == 1 else (axes or None))
    return PartitionSpec(*out)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int],
                   blocks: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(mesh, logical_axes, shape, blocks))


def param_sharding_fn(mesh: Mesh | None):
    """The `sharding_fn` that `jaxfire.params.init_params` and checkpoint restore take: each weight
    placed by its logical axes (None without a mesh: the default device)."""
    if mesh is None:
        return None
    return lambda spec: named_sharding(mesh, spec.logical_axes, spec.shape, spec.blocks)


def check_experts(mesh: Mesh, num_experts: int) -> None:
    size = mesh.shape["expert"]
    if num_experts % size:
        raise MeshError(f"the model's {num_experts} experts cannot be split evenly over an expert axis of {size} "
                        f"devices; choose an expert axis size that divides {num_experts}")


def token_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in RULES["tokens"])
