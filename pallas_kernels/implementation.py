"""The `implementation=` switch of the kernel packages that have one Pallas backend (Triton) beside
their pure-jnp reference."""

from __future__ import annotations

from typing import Literal

import jax

Implementation = Literal["reference", "pallas", "pallas_triton"]
IMPLEMENTATIONS: tuple[str, ...] = ("reference", "pallas", "pallas_triton")


def resolve(implementation: Implementation | None) -> tuple[bool, bool]:
    """(run the reference, run the kernel in interpret mode). None picks the kernel on GPUs and the
    reference elsewhere; "pallas" / "pallas_triton" force the kernel, in interpret mode off the GPU."""
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}.")
    on_gpu = jax.default_backend() == "gpu"
    if implementation is None:
        return not on_gpu, False
    return implementation == "reference", not on_gpu
