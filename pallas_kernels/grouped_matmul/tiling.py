"""Row tiling of a ragged lhs: which rows and which expert each row tile of a kernel works on.

Shapes: T rows, E experts, P row tasks (an upper bound known at trace time).

An expert's rows are cut into tiles of `block_m` rows; the first tile starts at the expert's first
row rounded down to a multiple of `align` (TMA-friendly), so no tile serves two experts and no
row is computed twice. Rows past sum(group_sizes) form one more group, numbered E, whose tiles
the kernels fill with zeros without reading any weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowTasks:
    group: jax.Array  # [P] int32, expert of the task; E for the zero-filled tail
    start: jax.Array  # [P] int32, first row of the tile, a multiple of align
    offset: jax.Array  # [P] int32, first row of the task inside the tile (< align)
    size: jax.Array  # [P] int32, rows of the task, 0 for padding tasks

    @property
    def num_tasks(self) -> int:
        return self.group.shape[0]


def max_row_tasks(num_rows: int, num_groups: int, block_m: int, align: int = 1) -> int:
    # Over the G <= min(E+1, T) non-empty groups of x_g = s_g + (start_g mod align) rows:
    # sum_g cdiv(x_g, bm) <= (sum_g x_g + G(bm-1)) / bm <= (T + G(align-1) + G(bm-1)) / bm.
    # A decode step of fewer rows than experts so gets one task a row at bm=1, not T + E.
    live = min(num_groups + 1, num_rows)
    tight = (num_rows + live * (align + block_m - 2)) // block_m
    loose = -(-(num_rows + (num_groups + 1) * (align - 1)) // block_m) + num_groups
    return max(min(tight, loose), 1)


def row_tasks(group_sizes: jax.Array, num_rows: int, block_m: int, align: int = 1) -> RowTasks:
    num_groups = group_sizes.shape[0]
    p = max_row_tasks(num_rows, num_groups, block_m, align)
    # Sizes that overrun T are clipped, so no kernel reads or writes past the last row.
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), num_rows)  # [E]
    ends = jnp.concatenate([ends, jnp.full((1,), num_rows, jnp.int32)])  # [E+1]
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])  # [E+1]
    tile_starts = starts // align * align  # [E+1]
    blocks = jnp.where(ends > starts, (ends - tile_starts + block_m - 1) // block_m, 0)  # [E+1]
    last = jnp.cumsum(blocks)  # [E+1]: one past each group's last task
    first = last - blocks  # [E+1]
    # Task i belongs to the first group whose tasks end past i: a compare and a sum, one small
    # fusion where `jnp.repeat` costs a scatter and a scan (this runs in every layer of a decode
    # step). Padding tasks repeat the last group past its end and so get size 0.
    task = jnp.arange(p, dtype=jnp.int32)  # [P]
    group = jnp.minimum(jnp.sum(last[None, :] <= task[:, None], axis=1, dtype=jnp.int32), num_groups)  # [P]
    start = tile_starts[group] + (task - first[group]) * block_m  # [P]
    lo = jnp.maximum(start, starts[group])  # [P]
    hi = jnp.minimum(start + block_m, ends[group])  # [P]
    size = jnp.maximum(hi - lo, 0)  # [P]
    offset = jnp.where(size > 0, lo - start, 0)  # [P]
    start = jnp.minimum(start, num_rows)
    return RowTasks(group=group, start=start, offset=offset, size=size)


def tile_efficiency(group_sizes, num_rows: int, block_m: int, align: int = 1) -> float:
    """Real rows over the rows a kernel's row tasks compute (each task a whole `block_m`-row tile): on
    the host, for benchmarks. Each group's last tile is padded, so 8 groups of 256 rows on 128-row
    tiles lose nothing, while the random top-2 routing of a 1024-token prompt (groups of about 256 +-
    20) leaves about a fifth of the computed rows empty, and half of 512 rows to one group a quarter."""
    tasks = row_tasks(jnp.asarray(group_sizes, jnp.int32), num_rows, block_m, align)
    computed = int(jnp.sum((tasks.size > 0) & (tasks.group < len(group_sizes)))) * block_m  # the zero tail aside
    return min(int(np.sum(group_sizes)), num_rows) / max(computed, 1)
