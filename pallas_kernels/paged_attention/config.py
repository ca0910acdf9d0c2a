# Z page size, R = Hq // Hkv query heads per KV head (R' padded to a power of two), K head dim.
"""Tuning parameters of the ragged paged attention kernel and their heuristic default."""

from __future__ import annotations

import dataclasses

from pallas_kernels.launch import check_launch

GATHERS = ("pages", "rows")
KERNELS = ("triton", "mosaic")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """The decode launch: rows that are their sequence's only row of the step.

    One program per (KV head, work item), a work item being one row's share of its keys: the row's R'
    query heads padded to a 16-row tile (the smallest tensor-core tile), as in
    `pallas_kernels.decode_attention`, rather than block_q x R' rows of which R' are live. How many
    splits each row takes is chosen on the device from the decode rows actually present, so a step
    with few live rows among many page-table rows still fills the machine.

    num_splits: the most work items one row is cut into (each a share of its key steps).
    block_kv: positions each loop step reads (a power of two >= 16), gathered slot by slot: more or
        fewer than a page.
    num_warps, num_stages: Triton launch width and software-pipelining depth (the Mosaic kernel: the
        depth of its TMA ring; it runs one warpgroup).
    wave: programs the device runs at once; splits are picked so that the programs fill whole waves.
    kernel: "triton" (the default), or "mosaic": the Mosaic GPU kernel (`mosaic.py`; bf16, f16 and FP8
        pools, 16-bit queries), opt-in: 0.92-0.97x the Triton launch on bf16 pools, 0.35-0.53x on FP8
        (one H100, run S6).
    """

    num_splits: int = 16
    block_kv: int = 128
    num_warps: int = 4
    num_stages: int = 3
    wave: int = 132
    kernel: str = "triton"

    def validate(self) -> None:
        check_launch(self, "config.decode")
        if self.block_kv < 16 or self.block_kv & (self.block_kv - 1):
            raise ValueError(f"config.decode.block_kv must be a power of two >= 16, got {self.block_kv}.")
        if self.wave < 1:
            raise ValueError(f"config.decode.wave must be >= 1, got {self.wave}.")
        if self.kernel not in KERNELS:
            raise ValueError(f"config.decode.kernel must be one of {KERNELS}, got {self.kernel!r}.")


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
    gather: how a step's keys and values are read. "pages": the step's pages as a [pages, Z, K]
        block, reshaped and zeroed past the span in registers; "rows": each position's slot
        (page x Z + offset) gathered with a masked load, which feeds the dot from shared memory as it
        came and reads nothing past the span.
    decode: None: every row goes through the block launch. A `DecodeConfig`: rows that are their
        sequence's only row of the step go through a launch of their own (see there), the block
        launch taking the rest.
    kernel: the block launch's kernel: "triton" (the default), or "mosaic": the Mosaic GPU kernel
        (`mosaic.py`): one warpgroup per (block, KV head, split) over a 64-row tile, block_q x R' <= 64;
        steps of pages_per_step x Z positions through a num_stages-deep TMA ring (gather, num_warps
        unused); opt-in: in a 256-token serving step it took 0.48 ms per 8 layers with the Mosaic decode
        launch against 0.29 for the Triton pair (one H100, run S6).

    The dataclass's own defaults are the kernel as first written (one launch, "pages"); `default_config`
    picks the tuned choice.
    """

    block_q: int = 16
    num_splits: int = 1
    pages_per_step: int = 1
    num_warps: int = 4
    num_stages: int = 2
    gather: str = "pages"
    decode: DecodeConfig | None = None
    kernel: str = "triton"

    def validate(self) -> None:
        if self.block_q < 1 or self.block_q & (self.block_q - 1):
            raise ValueError(f"config.block_q must be a power of two, got {self.block_q}.")
        check_launch(self, "config")
        if self.pages_per_step < 1 or self.pages_per_step & (self.pages_per_step - 1):
            raise ValueError(f"config.pages_per_step must be a power of two, got {self.pages_per_step}.")
        if self.gather not in GATHERS:
            raise ValueError(f"config.gather must be one of {GATHERS}, got {self.gather!r}.")
        if self.kernel not in KERNELS:
            raise ValueError(f"config.kernel must be one of {KERNELS}, got {self.kernel!r}.")
        if self.decode is not None:
            if not isinstance(self.decode, DecodeConfig):
                raise ValueError(f"config.decode must be a DecodeConfig or None, got {type(self.decode).__name__}.")
            self.decode.validate()


def query_heads_padded(group: int) -> int:
    return 1 << max(0, (group - 1).bit_length())


# H100 / H200 multiprocessor count.
_CORES = 132
# Shared memory per multiprocessor that a kernel's buffers can use on Hopper (of 228 KiB).
_SHARED_MEMORY = 200 * 1024
# Key tiles of the decode launch: 32 KiB and at most 128 positions (128 of bf16 at K = 128), as the
# contiguous kernel's measured best (pallas_kernels.decode_attention.config).
_TILE_BYTES = 32 * 1024


# Steps of fewer token rows than this keep the first kernel for decode rows too. Measured on one H200
# (bench/decode_attention.py, 4096 cached tokens, page 16, time against the contiguous kernel's in the
# same run): the decode launch took 0.40-0.74 of the contiguous kernel's bandwidth at batch 8-128
# (bf16) and 0.29-0.67 (FP8), where the first kernel took 0.20-0.59 and 0.22-0.38 in an earlier run;
# at batch 1 it took 0.50 (bf16) and 0.40 (FP8), where the first kernel took 0.75-1.18 and 0.54-0.67:
# its second launch and extra XLA ops cost more than a single row gains.
DECODE_LAUNCH_MIN_ROWS = 8


def default_config(group: int, page_size: int, rows: int | None = None, seqs: int | None = None,
                   pages_per_seq: int | None = None, kv_heads: int = 1, head_dim: int = 128,
                   itemsize: int = 2) -> PagedAttentionConfig:
    """About 64 query rows per program: enough to keep the tensor cores busy on prompt chunks while the
    [64, W] logits and the [64, K] accumulator stay in registers; at least 16.

    Splits from the static shapes (`rows` T, `seqs` S, `pages_per_seq` M, when given): a step of few
    sequences (at most min(S, T) blocks hold a sequence's only rows) gets enough splits for about two
    programs per multiprocessor over its blocks and `kv_heads`, each split keeping at least four steps.

    Decode rows of steps of at least `DECODE_LAUNCH_MIN_ROWS` token rows take the decode launch: 16-row tiles, key blocks of 32 KiB (at most 128 positions, by
    `head_dim` and the pages' `itemsize`), three stages, and a wave of as many programs as fit on the
    multiprocessors by shared memory, at most four each: the contiguous kernel's choices. The block launch keeps the "pages" reads
    it was first measured with: "rows" is untimed on prompt tiles (bench/prefill.py times those).
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
    block_kv = max(16, min(128, _TILE_BYTES // (head_dim * itemsize)))
    stages = 3
    resident = max(1, min(4, _SHARED_MEMORY // (2 * stages * block_kv * head_dim * itemsize)))
    decode = DecodeConfig(num_splits=16, block_kv=block_kv, num_warps=4, num_stages=stages,
                          wave=_CORES * resident) if rows is None or rows >= DECODE_LAUNCH_MIN_ROWS else None
    return PagedAttentionConfig(block_q=block_q, num_splits=splits, pages_per_step=pages_per_step,
                                num_warps=4 if page_size * pages_per_step <= 64 else 8, num_stages=2,
                                gather="pages", decode=decode)


# The Mosaic GPU launches' key steps and ring depth where `mosaic_config` picks them: 64 positions in
# three stages fit shared memory for bf16 and FP8 pools alike (`mosaic.smem_bytes`), and beat 128 x 2
# on FP8 pools (320 against 432 us at batch 32; bf16 239 against 230; one H100, run S6).
_MOSAIC_BLOCK_KV = 64
_MOSAIC_STAGES = 3


def mosaic_config(config: PagedAttentionConfig, page_size: int, *, kv_heads: int, head_dim: int,
                  itemsize: int) -> PagedAttentionConfig:
    """`config` with both launches on Mosaic GPU: 64-position steps through a three-stage ring, the decode
    launch's wave the programs that fit the multiprocessors by shared memory."""
    from pallas_kernels.paged_attention import mosaic

    decode = config.decode
    if decode is not None:
        resident = mosaic.resident_programs(_MOSAIC_BLOCK_KV, _MOSAIC_STAGES, head_dim, itemsize, kv_heads)
        decode = dataclasses.replace(decode, block_kv=_MOSAIC_BLOCK_KV, num_stages=_MOSAIC_STAGES,
                                     wave=_CORES * resident, kernel="mosaic")
    return dataclasses.replace(config, pages_per_step=max(1, _MOSAIC_BLOCK_KV // page_size),
                               num_stages=_MOSAIC_STAGES, kernel="mosaic", decode=decode)
