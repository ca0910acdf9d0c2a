"""The paged KV cache: per layer a pool of pages that sequences take as they grow, and the ragged batch
of token rows that one model step runs over it.

Page 0 is the null page: never handed out, so a page-table entry of 0 means "no page" and nothing
that matters is ever stored there. A pool is bf16 (or the model's dtype), or FP8: float8_e4m3fn
values with one float32 scale per token and KV head, quantized exactly as the contiguous cache
quantizes them (`jaxfire.kv_cache.LayerCache.write`).

Dimensions: L layers, P pages, Z page size, G key/value heads, K head dim, T token rows of a step,
S sequences (page-table rows), M pages per sequence.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxfire import kv_cache as kvc
from jaxfire import quant
from jaxfire import sharding as S
from jaxfire.config import Config
from jaxfire.errors import JaxfireError

# Logical axes of the pool: pages are whole on every device (any sequence may hold any page), KV heads
# split over "tensor" as in the contiguous cache.
VALUE_AXES = (None, None, "kv_heads", "head_dim")
SCALE_AXES = VALUE_AXES[:-1]


class PagedCacheError(JaxfireError):
    pass


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache:
    k: list[jax.Array]  # L x [P, Z, G, K]
    v: list[jax.Array]  # L x [P, Z, G, K]
    k_scale: list[jax.Array] | None = None  # L x [P, Z, G] float32, FP8 caches only
    v_scale: list[jax.Array] | None = None  # L x [P, Z, G] float32, FP8 caches only

    @property
    def is_fp8(self) -> bool:
        return self.k_scale is not None

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    def layer(self, i: int) -> "PagedLayer":
        if self.is_fp8:
            return PagedLayer(self.k[i], self.v[i], self.k_scale[i], self.v_scale[i])
        return PagedLayer(self.k[i], self.v[i])

    @classmethod
    def from_layers(cls, layers: list["PagedLayer"]) -> "PagedKVCache":
        fp8 = layers[0].k_scale is not None
        return cls(k=[c.k for c in layers], v=[c.v for c in layers],
                   k_scale=[c.k_scale for c in layers] if fp8 else None,
                   v_scale=[c.v_scale for c in layers] if fp8 else None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedLayer:
    k: jax.Array  # [P, Z, G, K]
    v: jax.Array  # [P, Z, G, K]
    k_scale: jax.Array | None = None  # [P, Z, G]
    v_scale: jax.Array | None = None  # [P, Z, G]

    def write(self, k: jax.Array, v: jax.Array, slots: jax.Array) -> "PagedLayer":
        """Writes row t's key and value at slot slots[t] (page * Z + offset; -1 writes nothing),
        quantized per token and head for an FP8 pool."""
        # k, v: [T, G, K], slots: [T]
        from pallas_kernels.paged_attention import append

        if self.k_scale is None:
            return PagedLayer(*append(self.k, self.v, k, v, slots))
        (kq, ks), (vq, vs) = quant.quantize(k, axis=-1), quant.quantize(v, axis=-1)
        return PagedLayer(*append(self.k, self.v, kq, vq, slots, k_scale=self.k_scale, v_scale=self.v_scale,
                                  k_new_scale=ks, v_new_scale=vs))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RaggedBatch:
    """One step's token rows, from any mix of sequences: decode tokens, prompt chunks, whole prompts.

    Row t is token tokens[t] at position positions[t] of sequence seq_ids[t] (a page-table row; -1 for
    padding rows, which write nothing and reach no expert). page_table[s] lists sequence s's pages in
    position order (unused entries 0, the null page); context_lens[s] is its length after this step's
    writes (0 for unused rows); logit_rows[s] is the row whose next-token logits are returned for s.
    """

    tokens: jax.Array  # [T] int32
    positions: jax.Array  # [T] int32
    seq_ids: jax.Array  # [T] int32
    page_table: jax.Array  # [S, M] int32
    context_lens: jax.Array  # [S] int32
    logit_rows: jax.Array  # [S] int32

    def check(self) -> None:
        """Refuses, naming it, a batch whose shapes do not fit together (at trace time: shapes are static)."""
        rows, (seqs, per_seq) = self.tokens.shape, self.page_table.shape
        if len(rows) != 1 or rows[0] < 1:
            raise PagedCacheError(f"a ragged batch needs tokens [T] with T >= 1, got shape {self.tokens.shape}.")
        for name in ("positions", "seq_ids"):
            if getattr(self, name).shape != rows:
                raise PagedCacheError(f"RaggedBatch.{name} must have the tokens' shape {rows}, "
                                      f"got {getattr(self, name).shape}.")
        for name in ("context_lens", "logit_rows"):
            if getattr(self, name).shape != (seqs,):
                raise PagedCacheError(f"RaggedBatch.{name} must have shape ({seqs},), one per page-table row, "
                                      f"got {getattr(self, name).shape}.")
        for name in ("tokens", "positions", "seq_ids", "page_table", "context_lens", "logit_rows"):
            if not jnp.issubdtype(getattr(self, name).dtype, jnp.integer):
                raise PagedCacheError(f"RaggedBatch.{name} must be an int array, got {getattr(self, name).dtype}.")
        if per_seq < 1:
            raise PagedCacheError(f"the page table needs at least one page per row, got shape {self.page_table.shape}.")

    def slots(self, page_size: int) -> jax.Array:
        """Each row's slot in the pool, page * Z + offset; -1 for padding rows and positions past the
        page table."""
        # -> [T]
        seq = jnp.maximum(self.seq_ids, 0)
        index = self.positions // page_size
        inside = (self.seq_ids >= 0) & (self.positions >= 0) & (index < self.page_table.shape[1])
        page = self.page_table[seq, jnp.clip(index, 0, self.page_table.shape[1] - 1)]
        return jnp.where(inside, page * page_size + self.positions % page_size, -1)


def _is_fp8(dtype: Any) -> bool:
    return isinstance(dtype, str) and dtype == "fp8" or jnp.dtype(dtype) == quant.FP8


def check_page_size(page_size: Any) -> None:
    """Refuses a page size that the paged attention kernel cannot take, naming it."""
    from pallas_kernels.paged_attention import check_page_size as check

    try:
        check(page_size)
    except ValueError as e:
        raise PagedCacheError(str(e)) from None


def page_bytes(config: Config, page_size: int, dtype: Any) -> int:
    """Bytes of one page over all layers: keys and values, and their scales for an FP8 cache."""
    check_page_size(page_size)
    fp8 = _is_fp8(dtype)
    values = page_size * config.num_kv_heads * config.head_dim * (1 if fp8 else jnp.dtype(dtype).itemsize)
    scales = page_size * config.num_kv_heads * 4 if fp8 else 0
    return 2 * config.num_layers * (values + scales)


def init_paged_cache(config: Config, num_pages: int, page_size: int, dtype: Any = jnp.bfloat16,
                     mesh: Mesh | None = None) -> PagedKVCache:
    """An empty pool of `num_pages` pages (the null page included); `dtype` float8_e4m3fn (or "fp8")
    makes an FP8 pool with per-token scales. With a mesh, each buffer is created in its sharded layout."""
    check_page_size(page_size)
    if not isinstance(num_pages, int) or isinstance(num_pages, bool) or num_pages < 2:
        raise PagedCacheError(f"a paged cache needs at least 2 pages (the null page and one more), got {num_pages!r}.")
    fp8 = _is_fp8(dtype)
    shape = (num_pages, page_size, config.num_kv_heads, config.head_dim)
    value_dtype = quant.FP8 if fp8 else dtype

    def make(shape, dtype, fill, axes):
        sharding = None if mesh is None else S.named_sharding(mesh, axes, shape)
        return kvc._filler(shape, jnp.dtype(dtype), fill, sharding)()

    layers = range(config.num_layers)
    return PagedKVCache(
        k=[make(shape, value_dtype, 0, VALUE_AXES) for _ in layers],
        v=[make(shape, value_dtype, 0, VALUE_AXES) for _ in layers],
        k_scale=[make(shape[:-1], jnp.float32, 1, SCALE_AXES) for _ in layers] if fp8 else None,
        v_scale=[make(shape[:-1], jnp.float32, 1, SCALE_AXES) for _ in layers] if fp8 else None,
    )
