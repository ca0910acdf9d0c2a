# Z page size, R = Hq // Hkv query heads per KV head.
"""Tuning parameters of the ragged paged attention kernel and their heuristic default."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PagedAttentionConfig:
    """Block sizes and launch shape of the kernel.

    block_q: token rows of one sequence per program (a power of two). A program's tile holds
        block_q x R' query rows (R' = R padded to a power of two), which must be at least 16 (the
        smallest tensor-core tile); decode rows fill one row of it, prompt chunks all of them.
    num_splits: programs per (block, KV head), each taking an equal share of the pages the block's
        rows see (flash-decoding: a few long sequences still spread over the multiprocessors).
    pages_per_step: pages each loop step loads (a power of two): small pages are read in key blocks
        of pages_per_step x Z positions rather than Z.
    num_warps, num_stages: Triton launch width and software-pipelining depth.
    """

    block_q: int = 16
    num_splits: int = 1
    pages_per_step: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def validate(self) -> None:
        if self.block_q < 1 or self.block_q & (self.block_q - 1):
            raise ValueError(f"config.block_q must be a power of two, got {self.block_q}.")
        if self.num_splits < 1:
            raise ValueError(f"config.num_splits must be >= 1, got {self.num_splits}.")
        if self.pages_per_step < 1 or self.pages_per_step & (self.pages_per_step - 1):
            raise ValueError(f"config.pages_per_step must be a power of two, got {self.pages_per_step}.")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"config.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}.")
        if self.num_stages < 1:
            raise ValueError(f"config.num_stages must be >= 1, got {self.num_stages}.")


def query_heads_padded(group: int) -> int:
    return 1 << max(0, (group - 1).bit_length())


# H100 / H200 multiprocessor count.
_CORES = 132


def default_config(group: int, page_size: int, rows: int | None = None, seqs: int | None = None,
                   pages_per_seq: int | None = None, kv_heads: int = 1) -> PagedAttentionConfig:
    """About 64 query rows per program: enough to keep the tensor cores busy on prompt chunks while the
    [64, W] logits and the [64, K] accumulator stay in registers; at least 16.

    Splits from the static shapes (`rows` T, `seqs` S, `pages_per_seq` M, when given): a step of few
    sequences (at most min(S, T) blocks hold a sequence's only rows) gets enough splits for about two
    programs per multiprocessor over its blocks and `kv_heads`, each split keeping at least four steps.
    """
    heads = query_heads_padded(group)
    block_q = max(1, 64 // heads, 16 // heads)
    splits = 1
    if rows and seqs and pages_per_seq:
        blocks = min(seqs, rows)
        splits = max(1, min(-(-2 * _CORES // (blocks * kv_heads)), pages_per_seq // 4, 16))
    # Key blocks of at least 64 positions, as the contiguous kernel's (64-128) stream well.
    pages_per_step = max(1, 64 // page_size)
    if pages_per_seq:
        splits = max(1, min(splits, pages_per_seq // (4 * pages_per_step)))
    return PagedAttentionConfig(block_q=block_q, num_splits=splits, pages_per_step=pages_per_step,
                                num_warps=4 if page_size * pages_per_step <= 64 else 8, num_stages=2)
