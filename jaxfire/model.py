"""Mixtral as pure functions over the params pytree: the full forward pass, `prefill`, `decode_step`, and
`mixed_step` (a decode step and a prefill sharing one pass over the weights), and `ragged_step` (any mix of
decode tokens, prompt chunks and whole prompts of many sequences as one set of token rows over the paged
cache).

Dimensions: B batch, T tokens, S cache positions, D model width, H query heads, G key/value heads,
R = H / G query heads per key/value head, K head dim, V vocab.

The layer loop is unrolled at trace time on purpose: each layer's weights and cache are separate
buffers, so every matmul reads its weights in place and every cache update is in place; a scan over
stacked layers would slice (copy) weights and caches on every step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxfire import kv_cache as kvc
from jaxfire import moe, quant
from jaxfire import paged_cache as pc
from jaxfire import sharding as S
from jaxfire.config import Config
from jaxfire.params import Layer, Params, describe_layer, qkv_spec


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How the model runs (not what it computes); a static argument of the jitted functions.

    decode_attention: "auto" (the Pallas kernel on GPUs, where it reads the cache at up to the copy
    bandwidth, and the einsum attention elsewhere), "xla" (the einsum attention the rest of the model
    uses), or an `implementation=` name of `pallas_kernels.decode_attention`.
    grouped_matmul: "auto" (the Pallas kernels on GPUs for bf16 activations, XLA elsewhere), "xla"
    (`jax.lax.ragged_dot_general`), or an `implementation=` name of `pallas_kernels.grouped_matmul`.
    prefill_attention: for prefills of new prompts (`prefill(..., fresh=True)`: each prompt attends to
    itself alone, no cache read): "auto" (cuDNN flash attention on GPUs for bf16/f16, the einsum
    elsewhere), "einsum" (the attention over the cache that continued prompts always use), or an
    `implementation=` of `jax.nn.dot_product_attention` ("xla", "cudnn").
    fp8: when FP8 weights also quantize their activations.
    moe_dispatch: how the MoE block orders token-expert assignments by expert (`moe.dispatch`): "auto"
    (all-pairs ranking for small steps, a sort for large ones), "sort" or "rank".
    paged_attention: attention of `ragged_step` over the paged cache: "auto" (the Pallas kernel on GPUs
    for the head sizes it takes, the jnp reference elsewhere) or an `implementation=` name of
    `pallas_kernels.paged_attention`.
    mesh: the device mesh the weights and cache are placed on (`jaxfire.sharding.make_mesh`); the MoE
    block runs expert- and tensor-parallel over it, attention tensor-parallel. None for one device.
    """

    decode_attention: str = "auto"
    grouped_matmul: str = "auto"
    prefill_attention: str = "auto"
    fp8: quant.Fp8Policy = quant.Fp8Policy()
    moe_dispatch: str = "auto"
    paged_attention: str = "auto"
    mesh: Mesh | None = None


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in the half-split layout Hugging Face checkpoints use."""
    # x: [B, T, N, K], positions: [B, T]
    k = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))  # [K/2]
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, K/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, K]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, window: int | None) -> jax.Array:
    """Causal (optionally sliding-window) grouped-query attention of queries at q_pos over keys at 0..S-1."""
    # q: [B, T, H, K], k/v: [B, S, G, K], q_pos: [B, T] -> [B, T, H, K]
    b, t, h, d = q.shape
    g = k.shape[2]
    q = q.reshape(b, t, g, h // g, d)  # [B, T, G, R, K]
    s = jnp.einsum("btgrk,bsgk->bgrts", q, k, preferred_element_type=jnp.float32) * d**-0.5
    kv_pos = jnp.arange(k.shape[1])
    mask = kv_pos[None, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if window is not None:
        mask &= kv_pos[None, None, :] > q_pos[:, :, None] - window
    s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)  # [B, G, R, T, S]
    o = jnp.einsum("bgrts,bsgk->btgrk", p, v, preferred_element_type=jnp.float32)
    return o.reshape(b, t, h, d).astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class Segment:
    """Sequences that one forward pass advances together, beside other segments.

    tokens [B, T] go at `positions` [B, T] of their own `cache` (None: no cache, the full forward
    pass); counts[b] of row b are real (None: all), the rest are padding that writes nothing and
    reaches no expert. `fresh` promises every sequence starts empty (new prompts). The projections
    and experts of all segments run as one set of token rows, so a prompt's prefill and a decode step
    of other sequences read each weight once between them; attention runs per segment. A `ragged`
    segment is one row of tokens from many sequences over a paged `cache` (`ragged_step`).
    """

    tokens: jax.Array
    positions: jax.Array
    cache: kvc.KVCache | None = None
    counts: jax.Array | None = None
    fresh: bool = False
    ragged: pc.RaggedBatch | None = None


def _join(xs: list[jax.Array]) -> jax.Array:
    """Segments' [B_i, T_i, F] arrays as one [1, sum B_i T_i, F] row set (a single segment as it is)."""
    return xs[0] if len(xs) == 1 else jnp.concatenate([x.reshape(1, -1, x.shape[-1]) for x in xs], axis=1)


def _split(y: jax.Array, shapes: list[tuple[int, int]]) -> list[jax.Array]:
    """Inverse of `_join`: y's rows (any leading shape) back to the segments' [B_i, T_i, F]."""
    if len(shapes) == 1:  # no slicing: a sharded single segment keeps its layout
        return [y.reshape(*shapes[0], y.shape[-1])]
    y = y.reshape(-1, y.shape[-1])  # [sum B_i T_i, F]
    out, start = [], 0
    for b, t in shapes:
        out.append(y[start:start + b * t].reshape(b, t, -1))
        start += b * t
    return out


def attention_block(layer: Layer, xs: list[jax.Array], segments: list[Segment], caches: list, config: Config,
                    runtime: Runtime) -> tuple[list[jax.Array], list]:
    """Self-attention of each segment's x; with a cache, writes the new keys/values and attends over it
    (or, `fresh`, with every sequence starting at position 0, over the new keys/values alone)."""
    # xs: per segment [B, T, D] -> per segment [B, T, D]
    c, p = config, layer.attn
    dense = _projection(runtime, config)
    shapes = [x.shape[:2] for x in xs]
    x = _join(xs)
    with jax.named_scope("qkv"):
        if p.wqkv is not None:
            q, k, v = zip(*(_unfuse(y, c) for y in _split(dense(x, p.wqkv, "wqkv"), shapes)))
        else:
            q, k, v = (_split(dense(x, w, name), shapes) for w, name in ((p.wq, "wq"), (p.wk, "wk"), (p.wv, "wv")))
    outs, new_caches = [], []
    for (b, t), seg, cache, qs, ks, vs in zip(shapes, segments, caches, q, k, v):
        with jax.named_scope("qkv"):
            qs = rope(qs.reshape(b, t, c.num_heads, c.head_dim), seg.positions, c.rope_theta)
            ks = rope(ks.reshape(b, t, c.num_kv_heads, c.head_dim), seg.positions, c.rope_theta)
            vs = vs.reshape(b, t, c.num_kv_heads, c.head_dim)
        o, cache = _attend(qs, ks, vs, seg, cache, config, runtime)
        outs.append(o.reshape(b, t, -1))
        new_caches.append(cache)
    with jax.named_scope("out"):
        return _split(dense(_join(outs), p.wo, "wo"), shapes), new_caches


def _unfuse(y: jax.Array, c: Config) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries, keys and values out of the fused projection's output (layout in `params.qkv_spec`)."""
    # y: [B, T, G*(R+2)*K] -> [B, T, H*K], [B, T, G*K], [B, T, G*K]
    b, t = y.shape[:2]
    r = c.num_heads // c.num_kv_heads
    y = y.reshape(b, t, c.num_kv_heads, r + 2, c.head_dim)
    return y[:, :, :, :r].reshape(b, t, -1), y[:, :, :, r].reshape(b, t, -1), y[:, :, :, r + 1].reshape(b, t, -1)


def _attend(q, k, v, seg: Segment, cache: kvc.LayerCache | None, config: Config, runtime: Runtime):
    # q: [B, T, H, K], k/v: [B, T, G, K] -> [B, T, H, K]
    b, t = q.shape[:2]
    c, positions, counts = config, seg.positions, seg.counts
    if seg.ragged is not None:
        o, cache = _paged_attention(q[0], k[0], v[0], seg.ragged, cache, c.sliding_window, runtime)
        return o[None], cache
    if cache is None:
        with jax.named_scope("attend"):
            return attend(q, k, v, positions, c.sliding_window), None
    impl = _resolve(runtime.decode_attention, c.head_dim)
    if t == 1 and impl != "xla":
        o, cache = _decode_attention(q[:, 0], k[:, 0], v[:, 0], positions[:, 0], counts, cache, c.sliding_window,
                                     impl, runtime.mesh)
        return o[:, None], cache
    # A call may step only the cache's first b sequences (`decode_step` over a slot prefix): the
    # rest join as padding with count 0, which writes nothing and attends over nothing.
    rows = cache.k.shape[0]
    if b < rows:
        q, k, v, positions, counts = _pad_rows((q, k, v, positions, counts), rows)
    with jax.named_scope("cache_write"):
        cache = cache.write(k, v, positions, counts)
    with jax.named_scope("attend"):
        if seg.fresh and (prompt_impl := _prompt_impl(runtime.prefill_attention, q.dtype)) != "einsum":
            o = _prompt_attention(q, k, v, counts, c.sliding_window, prompt_impl)
        else:
            k_all, v_all = cache.read(q.dtype)
            o = attend(q, k_all, v_all, positions, c.sliding_window)
    return o[:b], cache


def _pad_rows(arrays: tuple[jax.Array, ...], rows: int) -> list[jax.Array]:
    """Each array zero-padded along its first axis to `rows` (padding rows have count 0: they write
    nothing and attend over nothing)."""
    return [jnp.pad(a, [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1)) for a in arrays]


def _projection(runtime: Runtime, config: Config):
    """`quant.dense` for the attention projections, by weight name. A kernel is opaque to XLA's
    partitioner, so on a mesh each projection runs per device under shard_map, on that device's
    sequences and its slice of the weight as the rules table places it: output columns split over
    "tensor" (wq, wk, wv, wqkv: the device's heads), or input columns (wo: a partial product, summed over
    "tensor" by a psum)."""
    local = functools.partial(quant.dense, policy=runtime.fp8, implementation=runtime.grouped_matmul)
    mesh = runtime.mesh
    specs = describe_layer(config).attn

    def dense(x, w, name):
        # x: [B, T, K] -> [B, T, N]
        if mesh is None or mesh.size == 1:
            return local(x, w)
        spec = qkv_spec(config) if name == "wqkv" else getattr(specs, name)
        n_axes, k_axes = S.partition_spec(mesh, spec.logical_axes, spec.shape, spec.blocks)
        batch = S.partition_spec(mesh, ("batch", None, None), x.shape)[0]
        w_spec = jax.sharding.PartitionSpec(n_axes, k_axes)
        if isinstance(w, quant.QArray):
            w_spec = quant.QArray(value=w_spec, scale=jax.sharding.PartitionSpec(n_axes))

        def project(x, w):
            y = local(x, w)
            return y if k_axes is None else jax.lax.psum(y, k_axes)

        return jax.shard_map(project, mesh=mesh, in_specs=(jax.sharding.PartitionSpec(batch, None, k_axes), w_spec),
                             out_specs=jax.sharding.PartitionSpec(batch, None, n_axes), check_vma=False)(x, w)

    return dense


def _prompt_attention(q, k, v, counts, window, implementation):
    """Prompts that start at position 0 attend to their own new tokens only (no cache read)."""
    # q: [B, T, H, K], k/v: [B, T, G, K], counts: [B] -> [B, T, H, K]
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=counts,
                                        local_window_size=local, implementation=implementation)


def _prompt_impl(implementation: str, dtype) -> str:
    if implementation == "auto":
        fused = jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        return "cudnn" if fused else "einsum"
    return implementation


def _resolve(implementation: str, head_dim: int) -> str:
    if implementation == "auto":
        from pallas_kernels.decode_attention.api import HEAD_DIMS

        return "pallas" if jax.default_backend() == "gpu" and head_dim in HEAD_DIMS else "xla"
    return implementation


def _decode_attention(q, k, v, positions, counts, cache: kvc.LayerCache, window, implementation, mesh):
    """One new token per sequence: the cache-append kernel writes its key and value in place (quantized
    for an FP8 cache) and the decode attention kernel reads the cache; on a mesh both run per device
    over its own sequences and heads (kernels are opaque to XLA's partitioner, which would otherwise
    gather the whole cache)."""
    # q: [n, H, K], k/v: [n, G, K], positions/counts: [n] -> [n, H, K] and the cache
    from pallas_kernels import cache_append, decode_attention  # lazily: the default path needs no kernels

    rows = cache.k.shape[0]
    n = q.shape[0]
    if mesh is not None and mesh.size > 1 and n < rows and S.partition_spec(mesh, ("batch",), (rows,))[0]:
        # The cache's sequences are split over devices: the step's rows must be split the same way.
        q, k, v, positions, counts = _pad_rows((q, k, v, positions, counts), rows)
    write_at = jnp.where(counts > 0, positions, -1)  # -1: not stepped, nothing written
    # Sequences not stepped (count 0) attend over nothing: the kernel skips their cache.
    lengths = jnp.where(counts > 0, positions + counts, 0)

    def local(q, k, v, write_at, lengths, cache):
        with jax.named_scope("cache_write"):
            cache = kvc.LayerCache(*cache_append(cache.k, cache.v, k, v, write_at, k_scale=cache.k_scale,
                                                 v_scale=cache.v_scale, implementation=implementation))
        with jax.named_scope("attend"):
            o = decode_attention(q, cache.k, cache.v, lengths, k_scale=cache.k_scale, v_scale=cache.v_scale,
                                 window=window, implementation=implementation)
        return o, cache

    args = (q, k, v, write_at, lengths, cache)
    if mesh is None or mesh.size == 1:
        o, cache = local(*args)
        return o[:n], cache
    kv_spec = S.partition_spec(mesh, kvc.VALUE_AXES, cache.k.shape)
    # Query heads split with their KV heads; with one KV head (replicated) they may split alone.
    heads = "heads" if kv_spec[2] is not None or cache.k.shape[2] == 1 else None
    q_spec = S.partition_spec(mesh, ("batch", heads, None), q.shape)
    new_spec = jax.sharding.PartitionSpec(q_spec[0], kv_spec[2], None)
    scale_spec = None if cache.k_scale is None else jax.sharding.PartitionSpec(*kv_spec[:3])
    cache_spec = kvc.LayerCache(kv_spec, kv_spec, scale_spec, scale_spec)
    row_spec = jax.sharding.PartitionSpec(q_spec[0])
    o, cache = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, new_spec, new_spec, row_spec, row_spec, cache_spec),
                             out_specs=(q_spec, cache_spec), check_vma=False)(*args)
    return o[:n], cache


def _paged_attention(q, k, v, batch: pc.RaggedBatch, cache: pc.PagedLayer, window, runtime: Runtime):
    """Every row's key and value go into its page slot, then every row attends over its own sequence's
    keys in the pages. On a mesh both run per device over its KV heads (and their query heads); the
    rows and page tables are whole on every device."""
    # q: [T, H, K], k/v: [T, G, K] -> [T, H, K] and the layer's pages
    from pallas_kernels.paged_attention import paged_attention  # lazily: the kernels' package

    implementation = runtime.paged_attention
    if implementation == "auto":
        from pallas_kernels.paged_attention.api import HEAD_DIMS

        on_gpu = jax.default_backend() == "gpu" and q.shape[-1] in HEAD_DIMS
        implementation = "pallas" if on_gpu else "reference"
    slots = batch.slots(cache.k.shape[1])  # [T]

    def local(q, k, v, slots, batch, cache):
        with jax.named_scope("cache_write"):
            cache = cache.write(k, v, slots)
        with jax.named_scope("attend"):
            o = paged_attention(q, cache.k, cache.v, batch.page_table, batch.seq_ids, batch.positions,
                                batch.context_lens, k_scale=cache.k_scale, v_scale=cache.v_scale, window=window,
                                implementation=implementation)
        return o, cache

    mesh = runtime.mesh
    if mesh is None or mesh.size == 1:
        return local(q, k, v, slots, batch, cache)
    P = jax.sharding.PartitionSpec
    kv_spec = S.partition_spec(mesh, pc.VALUE_AXES, cache.k.shape)
    # Query heads split with their KV heads; with one KV head (replicated) they may split alone.
    heads = "heads" if kv_spec[2] is not None or cache.k.shape[2] == 1 else None
    q_spec = S.partition_spec(mesh, (None, heads, None), q.shape)
    new_spec = P(None, kv_spec[2], None)
    scale_spec = None if cache.k_scale is None else P(*kv_spec[:3])
    cache_spec = pc.PagedLayer(kv_spec, kv_spec, scale_spec, scale_spec)
    batch_spec = jax.tree.map(lambda _: P(), batch)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, new_spec, new_spec, P(), batch_spec, cache_spec),
                         out_specs=(q_spec, cache_spec), check_vma=False)(q, k, v, slots, batch, cache)


def decoder_layer(layer: Layer, xs: list[jax.Array], segments: list[Segment], caches: list, config: Config,
                  runtime: Runtime) -> tuple[list[jax.Array], list]:
    # xs: per segment [B, T, D]
    with jax.named_scope("attention"):
        hs, caches = attention_block(layer, [rms_norm(x, layer.attn_norm, config.rms_norm_eps) for x in xs],
                                     segments, caches, config, runtime)
    xs = [x + h for x, h in zip(xs, hs)]
    with jax.named_scope("moe"):
        y = _join([rms_norm(x, layer.moe_norm, config.rms_norm_eps) for x in xs])
        # Only the tokens a call appends (counts[b] of row b) go to the experts.
        valid = None
        if any(seg.counts is not None or seg.ragged is not None for seg in segments):
            valid = jnp.concatenate([_appended_tokens(x.shape[:2], seg.counts) if seg.ragged is None
                                     else seg.ragged.seq_ids >= 0 for x, seg in zip(xs, segments)])
        y = moe.moe_block(layer.moe, y.reshape(-1, y.shape[-1]), config.num_experts_per_tok, runtime.fp8,
                          runtime.grouped_matmul, runtime.mesh, valid, runtime.moe_dispatch)
    return [x + y for x, y in zip(xs, _split(y, [x.shape[:2] for x in xs]))], caches


def _appended_tokens(shape: tuple[int, int], counts: jax.Array | None) -> jax.Array:
    """Which of a segment's [B, T] token rows are real (the first counts[b] of row b), flattened."""
    b, t = shape
    if counts is None:
        return jnp.ones((b * t,), bool)
    return (jnp.arange(t)[None, :] < counts[:, None]).reshape(-1)  # [B T]


def _lm_head(params: Params, h: jax.Array, config: Config) -> jax.Array:
    with jax.named_scope("lm_head"):
        h = rms_norm(h, params.final_norm, config.rms_norm_eps)
        head = params.embed if params.lm_head is None else params.lm_head
        return quant.dense(h, head).astype(jnp.float32)


def _trunk(params: Params, segments: list[Segment], config, runtime) -> tuple[list[jax.Array], list]:
    """Embedding and decoder layers; returns each segment's hidden states and updated layer caches."""
    with jax.named_scope("embed"):
        xs = [params.embed[seg.tokens] for seg in segments]  # per segment [B, T, D]
    layer_caches = []
    for i, layer in enumerate(params.layers):
        caches = [None if seg.cache is None else seg.cache.layer(i) for seg in segments]
        with jax.named_scope(f"layer_{i}"):
            xs, caches = decoder_layer(layer, xs, segments, caches, config, runtime)
        layer_caches.append(caches)
    # per segment: its L layer caches
    return xs, [list(per_segment) for per_segment in zip(*layer_caches)]


@functools.partial(jax.jit, static_argnames=("config", "runtime"),
                   compiler_options=S.COMPILER_OPTIONS)
def forward(params: Params, tokens: jax.Array, config: Config, runtime: Runtime = Runtime()) -> jax.Array:
    """Full-sequence logits without a cache."""
    # tokens: [B, T] -> [B, T, V] float32
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    (h,), _ = _trunk(params, [Segment(tokens, positions)], config, runtime)
    return _lm_head(params, h, config)


def _prompt_segment(cache: kvc.KVCache, tokens: jax.Array, counts: jax.Array, fresh: bool) -> Segment:
    # tokens: [B, T], counts: [B]
    positions = cache.lengths[:, None] + jnp.arange(tokens.shape[1])[None, :]  # [B, T]
    return Segment(tokens, positions, cache, counts, fresh)


def _step_segment(cache: kvc.KVCache, tokens: jax.Array, active: jax.Array | None) -> Segment:
    # tokens: [n] for the cache's first n sequences, active: [n]
    n, rows = tokens.shape[0], cache.lengths.shape[0]
    if n > rows:
        raise ValueError(f"decode_step got {n} tokens for a cache of {rows} sequences")
    counts = jnp.ones((n,), jnp.int32) if active is None else active.astype(jnp.int32)  # [n]
    return Segment(tokens[:, None], cache.lengths[:n, None], cache, counts)


def _last_hidden(h: jax.Array, counts: jax.Array) -> jax.Array:
    # h: [B, T, D], counts: [B] -> each row's last real token [B, D]
    return jnp.take_along_axis(h, jnp.maximum(counts - 1, 0)[:, None, None], axis=1)[:, 0]


def _grown_cache(seg: Segment, layers: list) -> kvc.KVCache:
    n = seg.counts.shape[0]
    return kvc.KVCache.from_layers(layers, seg.cache.lengths.at[:n].add(seg.counts))


def prefill_fn(params: Params, cache: kvc.KVCache, tokens: jax.Array, counts: jax.Array, config: Config,
               runtime: Runtime = Runtime(), fresh: bool = False) -> tuple[jax.Array, kvc.KVCache]:
    """Appends counts[b] tokens of tokens[b] to sequence b of the cache; returns each one's last logits.

    Sequences with counts[b] == 0 are left untouched (their logits are meaningless), so the same call
    can prefill some slots of a running batch, or continue a prompt chunk by chunk. `fresh` promises
    that every sequence is empty (cache.lengths all zero, as for new prompts): attention then runs over
    the prompts alone (`Runtime.prefill_attention`), without reading the cache.
    """
    # tokens: [B, T], counts: [B] -> logits [B, V] float32
    seg = _prompt_segment(cache, tokens, counts, fresh)
    (h,), (layers,) = _trunk(params, [seg], config, runtime)
    return _lm_head(params, _last_hidden(h, counts), config), _grown_cache(seg, layers)


def decode_step_fn(params: Params, cache: kvc.KVCache, tokens: jax.Array, config: Config,
                   active: jax.Array | None = None, runtime: Runtime = Runtime()) -> tuple[jax.Array, kvc.KVCache]:
    """One new token per sequence; inactive sequences (active[b] False) are left untouched.

    `tokens` may cover only the cache's first n sequences (n <= its batch): the others are left
    untouched too, and every weight-reading stage (projections, experts) runs on n rows, so a step of a
    few live sequences in a large cache costs what a batch of n costs.
    """
    # tokens: [n], active: [n] -> logits [n, V] float32
    seg = _step_segment(cache, tokens, active)
    (h,), (layers,) = _trunk(params, [seg], config, runtime)
    return _lm_head(params, h[:, 0], config), _grown_cache(seg, layers)


def mixed_step_fn(params: Params, cache: kvc.KVCache, tokens: jax.Array, active: jax.Array | None,
                  prompt_cache: kvc.KVCache, prompt_tokens: jax.Array, prompt_counts: jax.Array, config: Config,
                  runtime: Runtime = Runtime(), fresh: bool = False):
    """`decode_step` of the running sequences and `prefill` of prompts (in their own cache) in one pass.

    The two share every weight read: a decode step rides along a prefill for the cost of a few more
    token rows. Returns (step logits [n, V], prompt logits [B, V]), the cache, the prompt cache; each
    equals what `decode_step` and `prefill` would give alone.
    """
    # tokens: [n], active: [n], prompt_tokens: [B, T], prompt_counts: [B]
    step = _step_segment(cache, tokens, active)
    prompt = _prompt_segment(prompt_cache, prompt_tokens, prompt_counts, fresh)
    (h_step, h_prompt), (step_layers, prompt_layers) = _trunk(params, [step, prompt], config, runtime)
    n = tokens.shape[0]
    logits = _lm_head(params, jnp.concatenate([h_step[:, 0], _last_hidden(h_prompt, prompt_counts)]), config)
    return (logits[:n], logits[n:]), _grown_cache(step, step_layers), _grown_cache(prompt, prompt_layers)


def ragged_step_fn(params: Params, cache: pc.PagedKVCache, batch: pc.RaggedBatch, config: Config,
                   runtime: Runtime = Runtime()) -> tuple[jax.Array, pc.PagedKVCache]:
    """One step over any mix of token rows: decode tokens, chunks continuing prompts, whole prompts.

    All rows go through the projections and experts as one set (padding rows, seq_ids -1, reach no
    expert); each row's key and value are written into its page slot before attention, and row t
    attends over positions 0..positions[t] of its own sequence, read from the pages. Returns the
    next-token logits of row logit_rows[s] for every page-table row s, and the cache.
    """
    # batch: tokens/positions/seq_ids [T], page_table [S, M] -> logits [S, V] float32
    batch.check()
    seg = Segment(batch.tokens[None], batch.positions[None], cache, ragged=batch)
    (h,), (layers,) = _trunk(params, [seg], config, runtime)
    return _lm_head(params, h[0][batch.logit_rows], config), pc.PagedKVCache.from_layers(layers)


# The jitted programs. Compiler options can only be set on the outermost jit, so programs that run
# these inside their own jit (the engine's) call the `*_fn` functions.
prefill = jax.jit(prefill_fn, static_argnames=("config", "runtime", "fresh"), donate_argnames=("cache",),
                  compiler_options=S.COMPILER_OPTIONS)
decode_step = jax.jit(decode_step_fn, static_argnames=("config", "runtime"), donate_argnames=("cache",),
                      compiler_options=S.COMPILER_OPTIONS)
mixed_step = jax.jit(mixed_step_fn, static_argnames=("config", "runtime", "fresh"),
                     donate_argnames=("cache", "prompt_cache"), compiler_options=S.COMPILER_OPTIONS)
ragged_step = jax.jit(ragged_step_fn, static_argnames=("config", "runtime"), donate_argnames=("cache",),
                      compiler_options=S.COMPILER_OPTIONS)
