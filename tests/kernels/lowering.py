"""Lowering GPU kernels for an H100 on the CPU: catches layout-inference, shared-memory-budget and
Triton-lowering errors before a GPU run, with every Triton module run through the MLIR verifier
(which XLA would otherwise apply only on a GPU)."""

from __future__ import annotations

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
