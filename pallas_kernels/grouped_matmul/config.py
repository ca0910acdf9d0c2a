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
    grid_tile_width: Mosaic only: tiles of one N-band visited together, for L2 reuse of lhs; at least
               the column tiles: each row task's tiles in turn (`mosaic.tile_order`).
    swap_ab:   Triton only: multiply weights [BN, BK] by lhs^T so the MMA's M side is BN, not the
               few live rows of a decode step.
    split_k:   Triton only: programs that share one output tile's K range, each writing f32 partial
               sums that a reduction adds: more programs reading weights when bands x row tasks are
               too few to occupy the GPU.
    gemv:      Triton only: multiply-adds instead of an MMA, for tasks of one to four rows (`block_m`):
               the rows of one expert in a small decode step.
    """

    block_m: int
    block_n: int
    block_k: int
    num_stages: int = 4
    num_warps: int = 4
    grid_tile_width: int = 8
    swap_ab: bool = False
    split_k: int = 1
    gemv: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k", "num_stages", "num_warps", "grid_tile_width", "split_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"Config.{name} must be a positive int, got {v!r}.")
        if self.gemv and self.block_m > 4:
            raise ValueError(f"Config.gemv multiplies one to four rows per task, got block_m={self.block_m}.")


def _largest_pow2_divisor(x: int, cap: int) -> int:
    p = 1
    while p < cap and x % (2 * p) == 0:
        p *= 2
    return p


TASK_MAJOR = 1 << 12  # a Mosaic grid_tile_width past any layer's column tiles: each row task's tiles in turn
TASK_MAJOR_MAX_ROWS = 1024  # FP8 rows up to which the wgmma kernel's tiles go task-major (`mosaic_config`)

SM_COUNT = 132  # an H100 SXM's multiprocessors, which the decode heuristic fills with programs


GEMV_MAX_ROWS = 3  # one token's rows at top-k <= 3: each live expert gets exactly one
DENSE_GEMV_MAX_ROWS = 1  # a projection of one token (a batch-1 step)


def gemv_config(num_rows: int, k: int, n: int, *, num_groups: int, swiglu: bool = False) -> Config | None:
    """The multiply-add kernel's blocks for one token through the experts or through a projection, or
    None where the MMA kernel serves (more rows).

    Measured on H200s, kernels inside a profiled batch-1 step of the whole model (bench/profile.py,
    the most repeatable figures; the in-program sweep of kernels alone, study=gemv-sweep, moved by
    up to 40% between runs for one config): one token's fused gate/up of two experts (2 x 28672 x 4096
    FP8) took 78 us a layer with 32x256 tiles split 2 (3.0 TB/s), against 92 us with 128x128 tiles
    split 4 (the best of one sweep, the worst in the model) and about 80-95 us for the MMA kernel; the
    down projection 40 us split 4 or 8 alike. Its tensor-parallel half (2 x 14336 x 4096) reads faster
    with 64x256 tiles split 4 (36 against 38 us alone; a two-GPU batch-1 step 5.9 -> 5.6 ms), where
    32-wide tiles would leave the grid short. One token's attention projections took 12.6 us (q/k/v,
    6144 x 4096) and 7.9 us (o) against 13.7 and 10.2 on the MMA kernel; four rows of a projection
    took 17 us against 8 alone, so projections of more than one row keep the MMA kernel. The split
    doubles until the grid has some 800 programs (six a multiprocessor) while every program keeps four
    K steps.
    """
    if num_rows > (DENSE_GEMV_MAX_ROWS if num_groups == 1 else GEMV_MAX_ROWS):
        return None
    target = 6 * SM_COUNT
    block_n, block_k = 32, 256
    if swiglu and -(-n // block_n) * num_rows * 2 < 2 * target:  # a narrow gate/up: wider, fewer K steps
        block_n = 64
    block_k = max(min(block_k, _largest_pow2_divisor(k, block_k)), 16)
    programs = -(-n // block_n) * num_rows
    steps = -(-k // block_k)
    split = 2
    while programs * split < target and steps >= 8 * split:
        split *= 2
    return Config(block_m=1, block_n=block_n, block_k=block_k, num_stages=3, num_warps=4, split_k=split, gemv=True)


def triton_config(num_rows: int, k: int, n: int, *, swiglu: bool, num_groups: int = 1,
                  weight_itemsize: int = 2, gemv: bool = True) -> Config:
    """Decode: stream each active expert's weights once; prefill (fallback): wide MMA tiles.

    Measured on an H100 (bench/results/grouped_matmul.jsonl, study=sweep): at T=32 these blocks
    read fp8 weights at ~2.4 TB/s and bf16 at ~2.9 TB/s; swap_ab and 32-row blocks were slower
    for fp8. Past 256 rows, 128x128x64 tiles on 8 warps were the fastest of four (weight-only fp8).

    With few column bands x live experts (a one-token projection, a batch-1 step whose token uses two
    of eight experts) the grid cannot keep every multiprocessor reading, so split K adds programs, as
    long as each keeps four K steps and the f32 partial sums move under a quarter of the weight bytes.
    Measured on an H100 (study=decode-sweep, weight-only FP8): at batch 1 (2 rows, 2 live experts) the
    down projection took 67-76 us split 4-8 against 101-110 unsplit, the fused gate/up 110-115 us with
    128-column bands split 2-4 against 134 (64 columns, unsplit); at batch 32 (8 rows an expert)
    splitting only slowed both, so problems with a row per expert or more aim at two programs per
    multiprocessor (narrower bands first: the down projection of 4 local experts on one of two
    expert-parallel GPUs read at 1.6 TB/s with 256 programs, the 8-expert one at 2.4 with 512),
    fewer rows than experts at four.

    One token through the experts takes the multiply-add kernel instead (`gemv_config`) unless `gemv`
    is False.
    """
    if gemv and (config := gemv_config(num_rows, k, n, num_groups=num_groups, swiglu=swiglu)) is not None:
        return config
    if num_rows > 256:
        return Config(block_m=128, block_n=128, block_k=64, num_stages=3, num_warps=8)
    # One 16-row block covers a decode step's rows of most experts, so each weight tile is read
    # once and few MMA rows are wasted.
    sparse = num_rows < num_groups  # most experts idle: batch-1-like
    block_n = 128 if sparse or not swiglu else 64
    block_k = max(min(128, _largest_pow2_divisor(k, 128)), 16)
    live = min(num_rows, num_groups)  # experts a step can touch
    target = 4 * SM_COUNT if sparse else 2 * SM_COUNT
    if not swiglu and -(-n // block_n) * live < target:
        block_n = 64
    programs = -(-n // block_n) * live
    steps = -(-k // block_k)
    width = 2 * n if swiglu else n
    weight_bytes = live * width * k * weight_itemsize
    split = 1
    while (programs * split < target and steps >= 8 * split
           and 2 * split * num_rows * width * 4 * 2 <= weight_bytes / 4):
        split *= 2
    return Config(block_m=16, block_n=block_n, block_k=block_k, num_stages=4, num_warps=8, split_k=split)


def mosaic_config(num_rows: int, k: int, n: int, *, itemsize: int, swiglu: bool) -> Config:
    """Warp-specialised wgmma: a CTA of two compute warpgroups and one TMA warpgroup.

    Swept on an H100 at T=4096 (bench/results/grouped_matmul.jsonl, study=sweep): four stages beat
    three by 10-12%, and visiting N-bands eight tiles wide was best or within 1% of it. At decode
    sizes (8-64 FP8 rows over 8 experts, one H200, study=decode-alt) 128-column tiles beat 64 by 10-60%,
    and the down projection ran on 64-row tiles (114-156 us; 128-row tiles were not timed there).
    The fused gate/up at those sizes (study=decode-tiles, run S4): 64-row tiles with the warpgroups
    splitting F took 222-231 us (4.07-4.23 TB/s) with 4 or 5 stages, 128-row tiles 277-296 (128
    columns) and 358-438 (64 columns), 64 rows x 2 x 128 columns (two stages fit) 273-276. The down
    projection gained nothing from a fifth stage (113 / 146 us at 8 / 32 rows against 114 / 150).
    Its row tasks (eight experts and the trace-time bound's padding) times 32 column tiles fill some SMs
    twice and leave others idle in bands of 8 tiles; visited task-major (`TASK_MAJOR`), every SM holds
    at most one real tile: 32 and 64 rows took 120 us (3.91 TB/s) against 155-157 in the same runs
    (run S5). The same holds for a prefill chunk's step, where the trace-time bound counts 12 row tasks
    for 8 real ones at 512 rows (a 256-token serving step) and 16 at 544 rows of a 1024-row bucket: the
    latter took 135 us (down) and 272 (gate/up) task-major against 193 and 287 in bands, and 64-row
    tiles lost there (152 / 316 us); the serving sweep's p90 inter-token latency at 4-10 requests/s fell
    from 20.4-21.7 to 17.5-18.7 ms. At 1088 of 2048 rows bands were level or ahead (down 196 / 195,
    gate/up 423 against 443), and there lhs reuse in the L2 starts to count.
    """
    # One pipeline step moves 128 bytes of K per row: the widest swizzle.
    if num_rows <= 64 and itemsize == 1:
        if swiglu:  # 64-row tiles, the warpgroups splitting F: half the lhs bytes, a fifth stage
            return Config(block_m=64, block_n=64, block_k=128, num_stages=5, grid_tile_width=8)
        return Config(block_m=64, block_n=128, block_k=128, num_stages=4, grid_tile_width=TASK_MAJOR)
    width = TASK_MAJOR if num_rows <= TASK_MAJOR_MAX_ROWS and itemsize == 1 else 8
    return Config(block_m=128, block_n=128, block_k=128 // itemsize, num_stages=4, grid_tile_width=width)
