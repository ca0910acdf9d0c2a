"""Checks of the Triton launch fields that the attention kernels' configs share."""

from __future__ import annotations


def check_launch(c, name: str) -> None:
    """A config's splits, warps and stages (`c.num_splits`, `c.num_warps`, `c.num_stages`), each refused
    with one sentence naming `name.field`."""
    if c.num_splits < 1:
        raise ValueError(f"{name}.num_splits must be >= 1, got {c.num_splits}.")
    if c.num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"{name}.num_warps must be 1, 2, 4, 8 or 16, got {c.num_warps}.")
    if c.num_stages < 1:
        raise ValueError(f"{name}.num_stages must be >= 1, got {c.num_stages}.")
