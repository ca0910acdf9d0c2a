"""Lowering GPU kernels for an H100 on the CPU: catches layout-inference, shared-memory-budget and
Triton-lowering errors before a GPU run, with every Triton module run through the MLIR verifier
(which XLA would otherwise apply only on a GPU)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax

H100 = dict(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")


def verify_triton_modules(monkeypatch) -> list[bool]:
    """Wraps Pallas's Triton lowering so each module it builds is verified; returns the verdicts."""
    from jax._src.pallas.triton import pallas_call_registration

    lowering = pallas_call_registration.lowering
    lower = lowering.lower_jaxpr_to_triton_module
    verified: list[bool] = []

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        verified.append(result.module.operation.verify())
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    return verified


def lower_for_h100(fn: Callable[..., Any], *args: Any) -> str:
    """The StableHLO text of jit(fn) lowered for CUDA on an abstract H100 (no GPU needed)."""
    from jax._src.mesh import AbstractDevice, AbstractMesh

    h100 = AbstractDevice(**H100)
    with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=h100)):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@dataclasses.dataclass(frozen=True)
class XlaTritonCall:
    """One `__gpu$xla.gpu.triton` custom call of a lowered program, its TTIR read back."""

    name: str
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int
    operands: int
    results: int
    aliased: tuple[tuple[int, int], ...]  # (operand, result)
    pointer_params: int  # of the kernel the call names
    ttir: str


def xla_triton_calls(fn: Callable[..., Any], *args: Any) -> list[XlaTritonCall]:
    """The Triton custom calls XLA would compile in jit(fn) lowered for CUDA (no GPU needed), each
    kernel's TTIR parsed and verified by jaxlib's Triton dialect, the version XLA compiles with."""
    from jax._src.lib.mlir import ir

    from pallas_kernels.triton_lowering import ir_context

    module = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
    ops = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for o in block.operations:
                    ops.append(o)
                    walk(o.operation)

    walk(module.operation)
    ctx = ir_context()
    calls = []
    for op in ops:
        if op.operation.name != "stablehlo.custom_call":
            continue
        if ir.StringAttr(op.attributes["call_target_name"]).value != "__gpu$xla.gpu.triton":
            continue
        config = ir.DictAttr(op.attributes["mhlo.backend_config"])
        ints = {k: ir.IntegerAttr(config[k]).value for k in ("grid_x", "grid_y", "grid_z", "num_warps", "num_stages")}
        name = ir.StringAttr(config["name"]).value
        aliases = ()
        if "output_operand_aliases" in op.attributes:
            text = str(op.attributes["output_operand_aliases"])
            aliases = tuple((int(o), int(r or 0)) for r, o in re.findall(
                r"output_tuple_indices = \[(\d*)\], operand_index = (\d+)", text))
        with ctx:
            kernel_module = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
            assert kernel_module.operation.verify()
            [func] = [f for f in kernel_module.body.operations if ir.StringAttr(f.attributes["sym_name"]).value == name]
            params = [ir.Type(a.type) for a in func.regions[0].blocks[0].arguments]
            pointers = sum(str(t).startswith("!tt.ptr") for t in params)
            text = str(kernel_module)
        calls.append(XlaTritonCall(name, (ints["grid_x"], ints["grid_y"], ints["grid_z"]), ints["num_warps"],
                                   ints["num_stages"], len(op.operands), len(op.results), aliases, pointers, text))
    return calls
