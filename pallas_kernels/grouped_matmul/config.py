"""Tuning parameters of the grouped matmul kernels and their heuristic defaults.

Shapes: T rows of lhs (tokens sorted by expert), K contraction, N output columns, E experts.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes of one kernel launch.

    block_m:   rows of lhs per tile. Triton: rows per program (the whole decode batch on the
               bandwidth-bound path). Mosaic: rows per CTA.
    block_n:   output columns per tile. Mosaic: per compute warpgroup (a CTA holds two), for
               `grouped_matmul_swiglu` F columns of gate and of up.
    block_k:   contraction depth of one pipeline step.
    num_stages: shared-memory pipeline depth.
    num_warps: Triton only.
    grid_tile_width: Mosaic only: tiles of one N-band visited together, for L2 reuse of lhs.
    """

    block_m: int
    block_n: int
    block_k: int
    num_stages: int = 4
    num_warps: int = 4
    grid_tile_width: int = 8

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k", "num_stages", "num_warps", "grid_tile_width"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"Config.{name} must be a positive int, got {v!r}.")


def _pow2_at_least(x: int, lo: int) -> int:
    p = lo
    while p < x:
        p *= 2
    return p


def _largest_pow2_divisor(x: int, cap: int) -> int:
    p = 1
    while p < cap and x % (2 * p) == 0:
        p *= 2
    return p


def triton_config(num_rows: int, k: int, n: int, *, swiglu: bool) -> Config:
    """Streams each expert's weights once: one program per (row block, column band)."""
    # Few rows: one row block holds every row, so each weight tile is read exactly once.
    block_m = min(_pow2_at_least(num_rows, 16), 64)
    # Narrow column bands keep >= 4 programs per SM busy on 132 SMs at N=4096 with 8 experts.
    block_n = 32 if swiglu else 64
    block_k = max(min(_largest_pow2_divisor(k, 512), 512), 16) if k >= 16 else 16
    if block_m > 32:
        block_k = min(block_k, 256)
    return Config(block_m=block_m, block_n=block_n, block_k=block_k, num_stages=4, num_warps=4)


def mosaic_config(num_rows: int, k: int, n: int, *, itemsize: int, swiglu: bool) -> Config:
    """Warp-specialised wgmma: a CTA of two compute warpgroups and one TMA warpgroup."""
    # One pipeline step moves 128 bytes of K per row: the widest swizzle.
    block_k = 128 // itemsize
    block_n = 128
    block_m = 128
    return Config(block_m=block_m, block_n=block_n, block_k=block_k, num_stages=4 if itemsize == 1 else 4,
                  grid_tile_width=8)
