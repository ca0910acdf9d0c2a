"""`model.ragged_step` over the paged cache against the contiguous model: chunked and packed prefill,
decode rows, NaN in other sequences' pages, meshes, and the page sizes refused."""

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfire
from jaxfire import model as M
from jaxfire import paged_cache as pc
from jaxfire import sharding as S
from jaxfire.config import Config
from jaxfire.kv_cache import init_cache
from jaxfire.params import init_params

CONFIGS = {
    "gqa": Config.preset("tiny"),
    "mqa_window": Config.preset("tiny").replace(num_kv_heads=1, sliding_window=5, num_experts_per_tok=3,
                                                head_dim=64),  # a head size the paged attention kernel takes
}
PAGE = 16


def make(name):
    cfg = CONFIGS[name]
    return cfg, init_params(cfg, jax.random.key(zlib.crc32(name.encode())), jnp.float32, std=0.1)


class Pages:
    """A host-side stand-in for the engine: hands out pages in a random order and builds ragged batches."""

    def __init__(self, seed: int, rows: int = 3, per_row: int = 3, num_pages: int = 12):
        self.free = [int(p) for p in np.random.default_rng(seed).permutation(np.arange(1, num_pages))]
        self.table = np.zeros((rows, per_row), np.int32)
        self.lens = np.zeros((rows,), np.int32)

    def batch(self, chunks: list[tuple[int, list[int]]], bucket: int) -> pc.RaggedBatch:
        """chunks: (page-table row, tokens appended to it); rows past the chunks are padding."""
        tokens, positions, seq_ids = (np.zeros(bucket, np.int32), np.zeros(bucket, np.int32),
                                      np.full(bucket, -1, np.int32))
        logit_rows = np.zeros_like(self.lens)
        at = 0
        for row, toks in chunks:
            n, start = len(toks), int(self.lens[row])
            for i in range(-(-start // PAGE), -(-(start + n) // PAGE)):  # the pages it starts
                self.table[row, i] = self.free.pop()
            tokens[at:at + n], positions[at:at + n], seq_ids[at:at + n] = toks, np.arange(start, start + n), row
            self.lens[row] += n
            logit_rows[row] = at + n - 1
            at += n
        return pc.RaggedBatch(*(jnp.asarray(a) for a in (tokens, positions, seq_ids, self.table.copy(),
                                                          self.lens.copy(), logit_rows)))


def contiguous_prefill(cfg, params, prompt, kv):
    cache = init_cache(cfg, 1, 48, kv)
    logits, cache = M.prefill(params, cache, jnp.asarray([prompt]), jnp.array([len(prompt)], jnp.int32), cfg)
    return logits[0], cache


# bf16 and FP8 pages, chunks that do (8) and do not (7) divide the prompt, GQA and MQA with a window.
@pytest.mark.parametrize("name, kv, chunk", [("gqa", "fp8", 7), ("mqa_window", "bfloat16", 8)])
def test_chunked_prefill_then_decode_equals_the_contiguous_model(name, kv, chunk):
    """A 24-token prompt in chunks, then greedy decode rows: the same logits and tokens as a one-shot
    prefill and decode steps of the contiguous cache, and the pages hold what the contiguous cache holds
    (FP8: the same values and scales)."""
    cfg, params = make(name)
    prompt = np.random.default_rng(zlib.crc32(f"{name}{kv}".encode())).integers(3, cfg.vocab_size, 24).tolist()
    want, cache = contiguous_prefill(cfg, params, prompt, kv)
    pages = Pages(chunk)
    paged = pc.init_paged_cache(cfg, 12, PAGE, kv)
    for start in range(0, len(prompt), chunk):
        logits, paged = M.ragged_step(params, paged, pages.batch([(1, prompt[start:start + chunk])], 8), config=cfg)
    tol = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits[1], want, **tol)
    token = int(np.argmax(want))
    assert int(np.argmax(logits[1])) == token
    slots = (pages.table[1][np.arange(24) // PAGE] * PAGE + np.arange(24) % PAGE)
    for got, ref in zip(jax.tree.leaves(paged.layer(0)), jax.tree.leaves(cache.layer(0))):
        got = np.asarray(got, np.float32).reshape(-1, *got.shape[2:])[slots]
        np.testing.assert_allclose(got, np.asarray(ref, np.float32)[0, :24], **tol)
    for _ in range(2):
        want, cache = M.decode_step(params, cache, jnp.array([token], jnp.int32), cfg)
        logits, paged = M.ragged_step(params, paged, pages.batch([(1, [token])], 8), config=cfg)
        np.testing.assert_allclose(logits[1], want[0], **tol)
        token = int(np.argmax(want[0]))
        assert int(np.argmax(logits[1])) == token


PROMPTS = [np.random.default_rng(5).integers(3, 512, n).tolist() for n in (5, 11, 14)]


def run_steps(cfg, params, packed: bool, runtime=M.Runtime(), kv=jnp.float32, poison=False) -> np.ndarray:
    """Three prompts and a decode row of a fourth sequence (its 9-token prompt already in the cache), in
    one call (`packed`) or one call each. Every call has 32 rows (one program). `poison`: every page but
    the fourth sequence's, the null page included, holds NaN before the calls. Returns the logits [4, V]."""
    pages = Pages(9, rows=4)
    cache = pc.init_paged_cache(cfg, 12, PAGE, kv, runtime.mesh)
    step = functools.partial(M.ragged_step, params, config=cfg, runtime=runtime)
    _, cache = step(cache, pages.batch([(3, PROMPTS[2][:9])], 32))
    if poison:
        keep = np.zeros(12, bool)
        keep[pages.table[3, :1]] = True
        cache = jax.tree.map(lambda a: jnp.where(keep.reshape(-1, *[1] * (a.ndim - 1)), a, jnp.nan).astype(a.dtype),
                             cache)
    chunks = list(enumerate(PROMPTS)) + [(3, [7])]
    if packed:
        return np.asarray(step(cache, pages.batch(chunks, 32))[0])
    rows = []
    for r, p in chunks:
        logits, cache = step(cache, pages.batch([(r, p)], 32))
        rows.append(np.asarray(logits[r]))
    return np.stack(rows)


def test_packed_call_equals_the_prompts_one_by_one_and_never_reads_other_pages():
    """Also with every page a row must not read (other sequences', free, the null page) NaN: the packed
    call's logits come out finite and equal to the prompts run apart on a clean cache."""
    cfg, params = make("gqa")
    apart = run_steps(cfg, params, packed=False, kv=jnp.bfloat16)
    packed = run_steps(cfg, params, packed=True, kv=jnp.bfloat16, poison=True)
    assert np.isfinite(packed).all()
    np.testing.assert_allclose(packed, apart, rtol=1e-5, atol=1e-5)


def test_pallas_kernel_in_the_model_equals_the_reference():
    cfg, params = make("mqa_window")
    np.testing.assert_allclose(run_steps(cfg, params, True, M.Runtime(paged_attention="pallas"), "fp8"),
                               run_steps(cfg, params, True, kv="fp8"), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("axes", [dict(tensor=2), dict(expert=2)])
def test_a_mesh_equals_one_device(axes):
    cfg, params = make("gqa")
    mesh = jaxfire.make_mesh(jax.devices()[:2], **axes)
    placed = init_params(cfg, jax.random.key(zlib.crc32(b"gqa")), jnp.float32, std=0.1,
                         sharding_fn=S.param_sharding_fn(mesh))
    np.testing.assert_allclose(run_steps(cfg, placed, True, M.Runtime(mesh=mesh), "fp8"),
                               run_steps(cfg, params, True, kv="fp8"), rtol=1e-4, atol=1e-4)
    if "tensor" in axes:
        cache = pc.init_paged_cache(cfg, 4, PAGE, "fp8", mesh)
        assert cache.k[0].sharding.spec[2] == "tensor" and cache.k_scale[0].sharding.spec[2] == "tensor"


@pytest.mark.parametrize("page_size", [0, 24, 8, -16, 2.0])
def test_a_page_size_the_kernel_cannot_take_is_refused(page_size):
    cfg = CONFIGS["gqa"]
    with pytest.raises(jaxfire.JaxfireError, match=f"page size must be a power of two of at least 16 positions, "
                                                   f"got {page_size!r}"):
        pc.init_paged_cache(cfg, 8, page_size)
    with pytest.raises(jaxfire.JaxfireError, match=f"got {page_size!r}"):
        pc.page_bytes(cfg, page_size, "fp8")


def test_a_batch_whose_shapes_do_not_fit_is_refused():
    cfg, params = make("gqa")
    batch = Pages(1).batch([(0, [5, 6])], 8)
    cache = pc.init_paged_cache(cfg, 4, PAGE)
    with pytest.raises(jaxfire.JaxfireError, match=r"RaggedBatch.positions must have the tokens' shape \(8,\), "
                                                   r"got \(7,\)"):
        M.ragged_step(params, cache, dataclasses.replace(batch, positions=batch.positions[:7]), config=cfg)
    with pytest.raises(jaxfire.JaxfireError, match=r"RaggedBatch.logit_rows must have shape \(3,\)"):
        M.ragged_step(params, cache, dataclasses.replace(batch, logit_rows=batch.logit_rows[:2]), config=cfg)


def test_a_pool_without_a_page_besides_the_null_page_is_refused():
    with pytest.raises(jaxfire.JaxfireError, match="at least 2 pages .* got 1"):
        pc.init_paged_cache(CONFIGS["gqa"], 1, 16)


def test_page_bytes_counts_every_layer_and_the_fp8_scales():
    cfg = CONFIGS["gqa"]
    for kv in ("fp8", jnp.bfloat16):
        cache = pc.init_paged_cache(cfg, 3, 32, kv)
        per_page = sum(a.nbytes for a in jax.tree.leaves(cache)) // 3
        assert pc.page_bytes(cfg, 32, kv) == per_page
