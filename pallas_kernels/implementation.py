"""The `implementation=` switch of the kernel packages: their Pallas kernels (Triton; Mosaic GPU opt-in
where a package has one) beside their pure-jnp reference."""

from __future__ import annotations

from typing import Literal

import jax

Implementation = Literal["reference", "pallas", "pallas_triton"]
IMPLEMENTATIONS: tuple[str, ...] = ("reference", "pallas", "pallas_triton")


# The kernels written in Triton itself (`pallas_kernels.triton_call`), by how a GPU launches them: as
# XLA's own Triton custom call, or through jax-triton's.
TRITON_LAUNCHERS: dict[str, str] = {"triton": "xla", "jax_triton": "jax-triton"}


def resolve(implementation: Implementation | Literal["pallas_mosaic", "triton", "jax_triton"] | None, *,
            mosaic: bool = False, triton: bool = False) -> tuple[bool, bool]:
    """(run the reference, run the kernel in interpret mode). None picks the kernel on GPUs and the
    reference elsewhere; "pallas" / "pallas_triton" force the kernel, in interpret mode off the GPU.
    With `mosaic`, a package that has a Mosaic GPU kernel beside its Triton one also takes
    "pallas_mosaic"; with `triton`, one that has a kernel written in Triton itself
    (`pallas_kernels.triton_call`) takes "triton" (launched as XLA's Triton custom call) and "jax_triton"
    (launched through jax-triton); all resolve as "pallas" (the caller picks the kernel)."""
    names = IMPLEMENTATIONS + (("pallas_mosaic",) if mosaic else ()) + (tuple(TRITON_LAUNCHERS) if triton else ())
    if implementation is not None and implementation not in names:
        raise ValueError(f"implementation must be one of {names} or None, got {implementation!r}.")
    on_gpu = jax.default_backend() == "gpu"
    if implementation is None:
        return not on_gpu, False
    return implementation == "reference", not on_gpu
