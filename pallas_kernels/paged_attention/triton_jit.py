# T token rows, S sequences (page-table rows), M pages per sequence, P pages in the pool, Z page size,
# Hkv key/value heads, R' query heads of one KV head (padded to a power of two), K head dim, Q = block_q
# token rows per program, N program blocks, J splits of a block's pages, W positions a loop step reads,
# I decode work items, E = max(16, R') decode tile rows, X decode output rows ((I + E / R') R').
"""Ragged paged attention written in Triton itself (`@triton.jit`), launched through jax-triton
(`pallas_kernels.triton_call`): the Pallas Triton kernel of `triton.py` ported, with its launches, grids,
configs and numerics, and the host side it shares (`plan.py`).

The block launch, grid (N, Hkv, J), and the decode launch, grid (Hkv, I), run the programs of
`triton.py` (see there): a tile of query rows of one KV head walks its share of a sequence's key steps
with the running max and sum in float32, each row masked to its own causal (and window) span; FP8
pools are widened to f16, their scales applied to the logits and the probabilities. Both gathers are
here: "pages" loads a step's whole pages and zeroes the slots past the span in registers, "rows" loads
each slot with a masked load, its page ids read one step ahead.

What differs from the Pallas kernel, none of it in the results: each split's (and each work item's) key
steps come from `steps.key_steps` on the host, a [N, J] (or [I]) array the program reads, rather than
being worked out in the program; the pools are read as laid out, [P, Z, Hkv, K], slot s of head h at
(s Hkv + h) K, the slot offset in 64 bits (a pool may hold more than 2^31 values); and the page table
is read through the block's sequence rather than a per-block copy of its rows (padded with the null
page in registers). The exponentials and the logarithm are libdevice's, as the Pallas kernel's lower
to (`tl.exp` would be `ex2.approx` of x log2(e)); NumPy's in interpret mode, Triton's interpreter having
no libdevice.

`api.py` imports this module (and with it Triton) only for `implementation="triton"`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import triton
import triton.language as tl
from jax import lax
from triton.language.extra import libdevice

from pallas_kernels import triton_call
from pallas_kernels.paged_attention import plan
from pallas_kernels.paged_attention.config import DecodeConfig, PagedAttentionConfig
from pallas_kernels.paged_attention.steps import key_steps

_COMPUTE = {jnp.dtype(jnp.float16): tl.float16, jnp.dtype(jnp.bfloat16): tl.bfloat16,
            jnp.dtype(jnp.float32): tl.float32}


@triton.jit
def _math(x, FN: tl.constexpr, INTERPRET: tl.constexpr):
    """exp(x) or log(x) (FN "exp" or "log"): libdevice's expf and logf, which the Pallas kernel's exp and
    log lower to; NumPy's in Triton's interpreter, which has no libdevice."""
    if INTERPRET:
        y = tl.exp(x) if FN == "exp" else tl.log(x)
    else:
        y = libdevice.exp(x) if FN == "exp" else libdevice.log(x)
    return y


@triton.jit
def _page_slots(table_row, i, offs, PAGE: tl.constexpr, PAGES: tl.constexpr, M: tl.constexpr):
    """"pages": the slots of step i's W positions [W], its PAGES pages one after the other (the null
    page past the table row, whose slots lie past every length)."""
    if PAGES == 1:
        slots = tl.load(table_row + i, mask=i < M, other=0) * PAGE + offs
    else:
        index = i * PAGES + tl.arange(0, PAGES)
        pages = tl.load(table_row + index, mask=index < M, other=0)  # [n]
        pages = tl.reshape(tl.broadcast_to(pages[:, None], (PAGES, PAGE)), (PAGES * PAGE,))  # [W]
        slots = pages * PAGE + offs % PAGE
    return slots


@triton.jit
def _page_ids(table_row, kv_pos, kv_ok, PAGE: tl.constexpr):
    """"rows": the page of each position [W], read where kv_ok."""
    return tl.load(table_row + kv_pos // PAGE, mask=kv_ok, other=0)


@triton.jit
def _gather(ptr, slots, h, kv_ok, MASKED: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
            COMPUTE: tl.constexpr):
    """Head h's rows at `slots` [W] of a pool [P Z, Hkv, K] -> [W, K] in COMPUTE, zero where not kv_ok:
    a masked load ("rows"), or whole rows zeroed in registers ("pages": a page's slots past the
    sequence's end, or before the block's window, hold anything, stale or NaN)."""
    rows = slots.to(tl.int64) * (HKV * HEAD_DIM) + h * HEAD_DIM  # [W]
    ptrs = ptr + rows[:, None] + tl.arange(0, HEAD_DIM)[None, :]  # [W, K]
    if MASKED:
        x = tl.load(ptrs, mask=kv_ok[:, None], other=0.0).to(COMPUTE)
    else:
        x = tl.where(kv_ok[:, None], tl.load(ptrs).to(COMPUTE), 0.0).to(COMPUTE)
    return x


@triton.jit
def _gather_scales(ptr, slots, h, kv_ok, MASKED: tl.constexpr, HKV: tl.constexpr):
    """Head h's scales at `slots` [W] of an fp8 pool's [P Z, Hkv] -> [W] float32, zero where not kv_ok."""
    ptrs = ptr + slots.to(tl.int64) * HKV + h  # [W]
    if MASKED:
        s = tl.load(ptrs, mask=kv_ok, other=0.0)
    else:
        s = tl.where(kv_ok, tl.load(ptrs), 0.0)
    return s


@triton.jit
def _queries(q_ptr, pos_ptr, r0, live, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, COMPUTE: tl.constexpr):
    """The tile's query rows [ROWS, K] in COMPUTE from sorted query row r0 of one KV head's q_ptr
    [(T+Q) R', K], with their positions [ROWS] and which are live (the first `live`; the rest zero,
    position -1)."""
    rows = r0 + tl.arange(0, ROWS)  # [ROWS]
    row_ok = tl.arange(0, ROWS) < live
    q = tl.load(q_ptr + rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], mask=row_ok[:, None],
                other=0.0).to(COMPUTE)
    q_pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1)
    return q, q_pos, row_ok


@triton.jit
def _attend(q, q_pos, lo, hi, start, stop, table_row, k_ptr, v_ptr, ks_ptr, vs_ptr, h,
            SM_SCALE: tl.constexpr, WINDOW: tl.constexpr, ROWS: tl.constexpr, SPAN: tl.constexpr,
            PAGE: tl.constexpr, PAGES: tl.constexpr, M: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
            FP8: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """Online softmax of the query tile q [ROWS, K] over key steps [start, stop) of W = SPAN positions,
    gathered through `table_row` (its sequence's page-table row): "pages" (PAGES pages a step) or, with
    PAGES 0, "rows". Positions outside [lo, hi) and past each row's own position (or before its window)
    are masked. Returns o [ROWS, K] (unnormalised) and the running max and sum [ROWS] in float32."""
    offs = tl.arange(0, SPAN)  # [W]
    o = tl.zeros((ROWS, HEAD_DIM), tl.float32)
    m = tl.full((ROWS,), float("-inf"), tl.float32)
    l = tl.zeros((ROWS,), tl.float32)
    if PAGES == 0:
        # The page ids run one step ahead, so the key and value loads do not wait on a load of the same
        # step: Triton's pipeliner splits its stages over such a chain, which would leave the keys one
        # buffer and no load in flight while the tile is used.
        kv_pos = start * SPAN + offs
        pages = _page_ids(table_row, kv_pos, (kv_pos >= lo) & (kv_pos < hi), PAGE)  # [W]
    for i in range(start, stop):
        kv_pos = i * SPAN + offs  # [W]
        kv_ok = (kv_pos >= lo) & (kv_pos < hi)
        if PAGES == 0:
            slots = pages * PAGE + kv_pos % PAGE
        else:
            slots = _page_slots(table_row, i, offs, PAGE, PAGES, M)
        k = _gather(k_ptr, slots, h, kv_ok, PAGES == 0, HKV, HEAD_DIM, COMPUTE)  # [W, K]
        v = _gather(v_ptr, slots, h, kv_ok, PAGES == 0, HKV, HEAD_DIM, COMPUTE)  # [W, K]
        if FP8:
            ks = _gather_scales(ks_ptr, slots, h, kv_ok, PAGES == 0, HKV)  # [W]
            vs = _gather_scales(vs_ptr, slots, h, kv_ok, PAGES == 0, HKV)  # [W]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * SM_SCALE  # [ROWS, W] f32
        if FP8:
            s = s * ks[None, :]
        see = (kv_pos[None, :] <= q_pos[:, None]) & kv_ok[None, :]  # [ROWS, W]
        if WINDOW is not None:
            see = see & (kv_pos[None, :] > q_pos[:, None] - WINDOW)
        s = tl.where(see, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # [ROWS]: -inf while a row has seen nothing
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = _math(m - m_safe, "exp", INTERPRET)  # [ROWS]
        p = _math(s - m_safe[:, None], "exp", INTERPRET)  # [ROWS, W]
        l = l * alpha + tl.sum(p, axis=1)
        if FP8:
            p = p * vs[None, :]
        pv = tl.dot(p.to(COMPUTE), v, input_precision=PRECISION)  # [ROWS, K] f32
        o = o * alpha[:, None] + pv
        m = m_new
        if PAGES == 0:
            kv_next = kv_pos + SPAN
            pages = _page_ids(table_row, kv_next, (kv_next >= lo) & (kv_next < hi), PAGE)
    return o, m, l


@triton.jit
def _store(o, m, l, o_ptr, lse_ptr, rows, row_ok, HEAD_DIM: tl.constexpr, WITH_LSE: tl.constexpr,
           INTERPRET: tl.constexpr):
    """Writes the normalised output rows (and their log-sum-exp) at `rows` [ROWS] of o_ptr [., K] (lse_ptr
    [.]); a row that saw nothing (an empty split) has l == 0 and yields zeros (lse -inf)."""
    o = o / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(o_ptr + rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], o.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    if WITH_LSE:
        lse = tl.where(l > 0, m + _math(tl.where(l > 0, l, 1.0), "log", INTERPRET), float("-inf"))  # [ROWS]
        tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def _block_kernel(
    seq_ptr,  # [N] int32: each block's sequence
    row0_ptr,  # [N] int32: its first row (in the sorted order)
    nrows_ptr,  # [N] int32: its rows, 0..Q
    lo_ptr,  # [N] int32: the first position any of its rows sees
    hi_ptr,  # [N] int32: one past the last
    start_ptr,  # [N, J] int32: each split's first key step
    stop_ptr,  # [N, J] int32: one past its last
    table_ptr,  # [S, M] int32: the page table
    q_ptr,  # [Hkv, (T+Q) R', K]
    pos_ptr,  # [(T+Q) R'] int32: each query row's position
    k_ptr,  # [P, Z, Hkv, K]
    v_ptr,  # [P, Z, Hkv, K]
    ks_ptr,  # [P, Z, Hkv] f32 if fp8 (else never read)
    vs_ptr,  # [P, Z, Hkv] f32 if fp8
    o_ptr,  # [Hkv, (T+Q) R', K] in q's dtype; with splits [J, Hkv, (T+Q) R', K] f32
    lse_ptr,  # with splits [J, Hkv, (T+Q) R'] f32 (else never written)
    SM_SCALE: tl.constexpr, WINDOW: tl.constexpr, ROWS: tl.constexpr, GROUP: tl.constexpr, PAGE: tl.constexpr,
    SPAN: tl.constexpr, PAGES: tl.constexpr, SPLITS: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
    Q_ROWS: tl.constexpr, M: tl.constexpr, FP8: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    b, h, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    nrows = tl.load(nrows_ptr + b)
    if nrows > 0:  # blocks past the last exit at once
        r0 = tl.load(row0_ptr + b) * GROUP  # the block's first query row
        q, q_pos, row_ok = _queries(q_ptr + h * Q_ROWS * HEAD_DIM, pos_ptr, r0, nrows * GROUP, ROWS, HEAD_DIM,
                                    COMPUTE)  # [Q R', K], [Q R'], [Q R']
        table_row = table_ptr + tl.load(seq_ptr + b) * M
        o, m, l = _attend(q, q_pos, tl.load(lo_ptr + b), tl.load(hi_ptr + b), tl.load(start_ptr + b * SPLITS + j),
                          tl.load(stop_ptr + b * SPLITS + j), table_row, k_ptr, v_ptr, ks_ptr, vs_ptr, h, SM_SCALE,
                          WINDOW, ROWS, SPAN, PAGE, PAGES, M, HKV, HEAD_DIM, FP8, COMPUTE, PRECISION, INTERPRET)
        out = j * HKV + h  # the program's [(T+Q) R'] rows of the outputs
        _store(o, m, l, o_ptr + out * Q_ROWS * HEAD_DIM, lse_ptr + out * Q_ROWS, r0 + tl.arange(0, ROWS), row_ok,
               HEAD_DIM, SPLITS > 1, INTERPRET)


@triton.jit
def _decode_kernel(
    row0_ptr,  # [I] int32: each item's decode row (in the sorted order)
    seq_ptr,  # [I] int32: its sequence
    lo_ptr,  # [I] int32: the first position the row sees
    hi_ptr,  # [I] int32: one past the last
    start_ptr,  # [I] int32: the item's first key step (its share of the row's)
    stop_ptr,  # [I] int32: one past its last
    parts_ptr,  # [I] int32: the row's items; 0 for an item past the last
    table_ptr,  # [S, M] int32
    q_ptr,  # [Hkv, (T+Q) R', K]
    pos_ptr,  # [(T+Q) R'] int32
    k_ptr,  # [P, Z, Hkv, K]
    v_ptr,  # [P, Z, Hkv, K]
    ks_ptr,  # [P, Z, Hkv] f32 if fp8 (else never read)
    vs_ptr,  # [P, Z, Hkv] f32 if fp8
    o_ptr,  # [Hkv, X, K] f32
    lse_ptr,  # [Hkv, X] f32
    SM_SCALE: tl.constexpr, WINDOW: tl.constexpr, ROWS: tl.constexpr, GROUP: tl.constexpr, PAGE: tl.constexpr,
    SPAN: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, Q_ROWS: tl.constexpr, OUT_ROWS: tl.constexpr,
    M: tl.constexpr, FP8: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    h, w = tl.program_id(0), tl.program_id(1)
    parts = tl.load(parts_ptr + w)
    if parts > 0:  # items past the last exit at once
        r0 = tl.load(row0_ptr + w) * GROUP
        q, q_pos, row_ok = _queries(q_ptr + h * Q_ROWS * HEAD_DIM, pos_ptr, r0, GROUP, ROWS, HEAD_DIM,
                                    COMPUTE)  # [E, K], [E], [E]: the row's R' heads
        table_row = table_ptr + tl.load(seq_ptr + w) * M
        o, m, l = _attend(q, q_pos, tl.load(lo_ptr + w), tl.load(hi_ptr + w), tl.load(start_ptr + w),
                          tl.load(stop_ptr + w), table_row, k_ptr, v_ptr, ks_ptr, vs_ptr, h, SM_SCALE, WINDOW, ROWS,
                          SPAN, PAGE, 0, M, HKV, HEAD_DIM, FP8, COMPUTE, PRECISION, INTERPRET)
        _store(o, m, l, o_ptr + h * OUT_ROWS * HEAD_DIM, lse_ptr + h * OUT_ROWS, w * GROUP + tl.arange(0, ROWS),
               row_ok, HEAD_DIM, True, INTERPRET)


def _operands(qs, q_pos, page_table, pools, *, heads: int, page_size: int, interpret: bool, sm_scale: float,
              window: int | None, fp8: bool, compute_dtype, precision) -> tuple[list, dict]:
    """The arrays both kernels take after their own (page table, queries, pools, scales) and the
    constexprs they share."""
    num_kv_heads, q_rows, head_dim = qs.shape
    # A pool that is not fp8 has no scales: one-element placeholders the kernels never read.
    scales = pools[2:] if fp8 else [jnp.zeros((1,), jnp.float32)] * 2
    arrays = [page_table.astype(jnp.int32), qs, q_pos, *pools[:2], *scales]
    # Triton's default f32 dot rounds inputs to tf32 (as the Pallas kernel's without HIGHEST).
    constexprs = dict(SM_SCALE=sm_scale, WINDOW=window, GROUP=heads, PAGE=page_size, HKV=num_kv_heads,
                      HEAD_DIM=head_dim, Q_ROWS=q_rows, M=page_table.shape[1], FP8=fp8,
                      COMPUTE=_COMPUTE[jnp.dtype(compute_dtype)],
                      PRECISION="ieee" if precision == lax.Precision.HIGHEST else "tf32", INTERPRET=interpret)
    return arrays, constexprs


def _block_call(meta, qs, q_pos, page_table, pools, config: PagedAttentionConfig, *, heads: int, block_q: int,
                page_size: int, interpret: bool, launcher: str, **kernel_args) -> list[jax.Array]:
    """The block launch, grid (N, Hkv, J) (`plan.Launches.block`)."""
    num_kv_heads, q_rows, head_dim = qs.shape
    splits = config.num_splits
    span = config.pages_per_step * page_size
    part = jnp.arange(splits, dtype=jnp.int32)[None, :]
    start, stop = key_steps(meta["lo"][:, None], meta["hi"][:, None], span, part, splits)  # [N, J]
    if splits == 1:  # the output in q's dtype, and a placeholder for the log-sum-exp
        out_shape = [jax.ShapeDtypeStruct((num_kv_heads, q_rows, head_dim), qs.dtype),
                     jax.ShapeDtypeStruct((1,), jnp.float32)]
    else:
        out_shape = [jax.ShapeDtypeStruct((splits, num_kv_heads, q_rows, head_dim), jnp.float32),
                     jax.ShapeDtypeStruct((splits, num_kv_heads, q_rows), jnp.float32)]
    arrays, constexprs = _operands(qs, q_pos, page_table, pools, heads=heads, page_size=page_size,
                                   interpret=interpret, **kernel_args)
    outs = triton_call.call(
        _block_kernel, meta["seq"], meta["row0"], meta["nrows"], meta["lo"], meta["hi"], start, stop, *arrays,
        out_shape=out_shape, grid=(meta["nrows"].shape[0], num_kv_heads, splits), num_warps=config.num_warps,
        num_stages=config.num_stages, interpret=interpret, launcher=launcher, name="jaxfire_paged_attention", ROWS=block_q * heads,
        SPAN=span, PAGES=config.pages_per_step if config.gather == "pages" else 0, SPLITS=splits, **constexprs)
    return outs[:1] if splits == 1 else outs


def _decode_call(items, qs, q_pos, page_table, pools, dc: DecodeConfig, *, num_items: int, tile: int, out_rows: int,
                 heads: int, page_size: int, interpret: bool, launcher: str, **kernel_args
                 ) -> tuple[jax.Array, jax.Array]:
    """The decode launch, grid (Hkv, I) (`plan.Launches.decode`)."""
    num_kv_heads, _, head_dim = qs.shape
    # Items past the last (parts 0) take no steps and are never read.
    start, stop = key_steps(items["lo"], items["hi"], dc.block_kv, items["part"], jnp.maximum(items["parts"], 1))
    arrays, constexprs = _operands(qs, q_pos, page_table, pools, heads=heads, page_size=page_size,
                                   interpret=interpret, **kernel_args)
    o, lse = triton_call.call(
        _decode_kernel, items["row0"], items["seq"], items["lo"], items["hi"], start, stop, items["parts"], *arrays,
        out_shape=[jax.ShapeDtypeStruct((num_kv_heads, out_rows, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct((num_kv_heads, out_rows), jnp.float32)],
        grid=(num_kv_heads, num_items), num_warps=dc.num_warps, num_stages=dc.num_stages, interpret=interpret,
        launcher=launcher,
        name="jaxfire_paged_attention_decode", ROWS=tile, SPAN=dc.block_kv, OUT_ROWS=out_rows, **constexprs)
    return o, lse


# The entry point by how a GPU launches the kernels (`triton_call.LAUNCHERS`).
BY_LAUNCHER = {launcher: plan.jit(plan.Launches(block=functools.partial(_block_call, launcher=launcher),
                                                decode=functools.partial(_decode_call, launcher=launcher)))
               for launcher in triton_call.LAUNCHERS}
paged_attention = BY_LAUNCHER["xla"]
