# B batch, S cached positions, H heads (Hq query, Hkv key/value, G = Hq // Hkv), K head dim.
"""Tuning parameters of the decode-attention kernels and their heuristic default."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pallas_kernels.launch import check_launch

# H100 / H200 multiprocessor count; used when the device does not report one.
_DEFAULT_CORE_COUNT = 132
# Shared memory per multiprocessor that a kernel's buffers can use on Hopper (of 228 KiB).
_SHARED_MEMORY = 200 * 1024


@dataclasses.dataclass(frozen=True)
class DecodeAttentionConfig:
    """Block sizes and launch shape of the split-sequence (flash-decoding) kernel.

    block_s: cached positions per loop step (a power of two, >= 16).
    num_splits: programs per (sequence, KV head); each takes an equal share of the blocks that the
        sequence's length (and window) leaves, so short sequences in a long cache still spread.
    num_warps, num_stages: Triton launch width and software-pipelining depth.
    """

    block_s: int = 64
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def validate(self) -> None:
        if self.block_s < 16 or self.block_s & (self.block_s - 1):
            raise ValueError(f"config.block_s must be a power of two >= 16, got {self.block_s}.")
        check_launch(self, "config")


def _core_count() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or _DEFAULT_CORE_COUNT
    except RuntimeError:
        return _DEFAULT_CORE_COUNT


def default_config(
    batch: int,
    seq_len: int,
    num_kv_heads: int,
    head_dim: int,
    cache_dtype: jnp.dtype,
) -> DecodeAttentionConfig:
    """A config for the shapes: enough programs for a few waves, each streaming whole blocks."""
    itemsize = jnp.dtype(cache_dtype).itemsize
    # 32 KiB K tiles (128 positions of bf16 at K=128) measured best on H100; fewer positions would
    # leave too few bytes in flight per program, more would not fit three stages of K and V.
    block_s = max(16, min(128, 32768 // (head_dim * itemsize)))
    block_s = min(block_s, max(16, 1 << max(0, (seq_len - 1).bit_length())))
    num_stages = 3
    # Programs resident per multiprocessor, bounded by the K and V buffers of every stage.
    tile = block_s * head_dim * itemsize
    resident = max(1, min(4, _SHARED_MEMORY // (2 * num_stages * tile)))
    slots = _core_count() * resident
    programs = batch * num_kv_heads
    # Every split of a sequence streams the same number of blocks, so programs finish in waves: pick
    # the fewest splits whose last wave is (nearly) full. A split shorter than two blocks costs more
    # in partial results and the combine than it saves.
    most = max(1, min(256, math.ceil(seq_len / block_s) // 2))

    def fill(splits: int) -> float:
        n = programs * splits
        return n / (math.ceil(n / slots) * slots)

    best = max(fill(n) for n in range(1, most + 1))
    num_splits = min(n for n in range(1, most + 1) if fill(n) >= 0.95 * best)
    return DecodeAttentionConfig(block_s=block_s, num_splits=num_splits, num_warps=4,
                                 num_stages=num_stages)
