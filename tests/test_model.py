"""The cached paths (prefill, decode_step) against the full-sequence forward pass, and sampling."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfire import model as M
from jaxfire import sampling
from jaxfire.config import Config
from jaxfire.kv_cache import init_cache
from jaxfire.params import init_params

CONFIGS = {
    "gqa": Config.preset("tiny"),
    "mqa_window": Config.preset("tiny").replace(num_kv_heads=1, sliding_window=5, num_experts_per_tok=3,
                                                head_dim=64),  # a head size the decode attention kernel takes
}


def make(name):
    cfg = CONFIGS[name]
    return cfg, init_params(cfg, jax.random.key(zlib.crc32(name.encode())), jnp.float32, std=0.1)


@pytest.fixture(params=list(CONFIGS))
def setup(request):
    return make(request.param)


# The Pallas decode attention kernel (interpret mode on CPU) takes head sizes 64, 128 and 256.
@pytest.mark.parametrize("name, attention", [("gqa", "xla"), ("mqa_window", "xla"), ("mqa_window", "pallas")])
def test_prefill_then_decode_equals_forward(name, attention):
    cfg, params = make(name)
    runtime = M.Runtime(decode_attention=attention)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (3, 14)).astype(np.int32)
    full = np.asarray(M.forward(params, jnp.asarray(tokens), cfg))
    lengths = np.array([4, 9, 1])
    padded = np.where(np.arange(10)[None] < lengths[:, None], tokens[:, :10], 0)
    cache = init_cache(cfg, 3, 32, jnp.float32)
    logits, cache = M.prefill(params, cache, jnp.asarray(padded), jnp.asarray(lengths, jnp.int32), cfg)
    np.testing.assert_allclose(logits, full[np.arange(3), lengths - 1], rtol=1e-5, atol=1e-5)
    for step in range(4):
        pos = lengths + step
        logits, cache = M.decode_step(params, cache, jnp.asarray(tokens[np.arange(3), pos]), cfg, runtime=runtime)
        np.testing.assert_allclose(logits, full[np.arange(3), pos], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache.lengths, lengths + 4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prompt_attention_equals_cache_attention(name):
    """jax.nn.dot_product_attention over a prompt's own tokens (a fresh prefill) equals the einsum over
    the cache; a prefill that continues a sequence takes the cache path."""
    cfg, params = make(name)
    fused = M.Runtime(prefill_attention="xla")
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (3, 12)).astype(np.int32)
    counts = jnp.array([12, 7, 1], jnp.int32)
    for_runtime = {}
    for rt in (M.Runtime(), fused):
        cache = init_cache(cfg, 3, 32, jnp.float32)
        first, cache = M.prefill(params, cache, jnp.asarray(tokens), counts, cfg, rt, fresh=True)
        more, cache = M.prefill(params, cache, jnp.asarray(tokens[:, :5]), jnp.array([5, 5, 5], jnp.int32), cfg, rt)
        for_runtime[rt] = (first, more)
    for a, b in zip(for_runtime[M.Runtime()], for_runtime[fused]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_equals_one_prefill(setup):
    cfg, params = setup
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    full = np.asarray(M.forward(params, jnp.asarray(tokens), cfg))
    cache = init_cache(cfg, 2, 16, jnp.float32)
    for chunk in range(3):
        logits, cache = M.prefill(params, cache, jnp.asarray(tokens[:, 4 * chunk:4 * chunk + 4]),
                                  jnp.array([4, 4], jnp.int32), cfg)
        np.testing.assert_allclose(logits, full[:, 4 * chunk + 3], rtol=1e-5, atol=1e-5)


def test_inactive_sequences_are_untouched(setup):
    cfg, params = setup
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 8)).astype(np.int32)
    cache = init_cache(cfg, 2, 8, jnp.float32)
    _, cache = M.prefill(params, cache, jnp.asarray(tokens), jnp.array([8, 3], jnp.int32), cfg)
    before = [np.asarray(k) for k in cache.k]
    # Sequence 0 is full (8 of 8 positions): with active False its cache must not change, and a prefill
    # that gives it no tokens must not write past its end either.
    _, cache = M.decode_step(params, cache, jnp.asarray([5, 6]), cfg, active=jnp.array([False, True]))
    _, cache = M.prefill(params, cache, jnp.asarray(tokens[:, :2]), jnp.array([0, 2], jnp.int32), cfg)
    np.testing.assert_array_equal(cache.lengths, [8, 6])
    for b, a in zip(before, cache.k):
        np.testing.assert_array_equal(np.asarray(a)[0], b[0])
        assert not np.array_equal(np.asarray(a)[1, 3:6], b[1, 3:6])


@pytest.mark.parametrize("attention", ["xla", "pallas"])
def test_decode_step_over_a_slot_prefix_equals_the_full_batch(attention):
    cfg, params = make("mqa_window")
    rt = M.Runtime(decode_attention=attention)
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (4, 6)).astype(np.int32)
    cache = init_cache(cfg, 4, 12, jnp.float32)
    _, cache = M.prefill(params, cache, jnp.asarray(tokens), jnp.array([6, 2, 5, 3], jnp.int32), cfg, rt)
    step = jnp.asarray([7, 8, 9, 10], jnp.int32)
    cache_before = jax.tree.map(np.asarray, cache)
    whole, full = M.decode_step(params, jax.tree.map(jnp.copy, cache), step, cfg,
                                jnp.array([True, False, True, False]), rt)
    part, prefix = M.decode_step(params, cache, step[:3], cfg, jnp.array([True, False, True]), rt)
    assert part.shape == (3, cfg.vocab_size)
    np.testing.assert_allclose(part[::2], whole[:3:2], rtol=1e-5, atol=1e-5)
    for a, b, before in zip(prefix.k + prefix.v, full.k + full.v, cache_before.k + cache_before.v):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(a)[3], np.asarray(before)[3])  # past the prefix: untouched
    np.testing.assert_array_equal(prefix.lengths, [7, 2, 6, 3])
    with pytest.raises(ValueError, match="5 tokens for a cache of 4 sequences"):
        M.decode_step(params, prefix, jnp.zeros((5,), jnp.int32), cfg)


@pytest.mark.parametrize("name, attention", [("gqa", "xla"), ("mqa_window", "pallas")])
def test_mixed_step_equals_decode_step_and_prefill_apart(name, attention):
    cfg, params = make(name)
    rt = M.Runtime(decode_attention=attention)
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, cfg.vocab_size, (3, 5)).astype(np.int32)
    cache = init_cache(cfg, 3, 12, jnp.float32)
    _, cache = M.prefill(params, cache, jnp.asarray(tokens), jnp.array([5, 2, 4], jnp.int32), cfg, rt)
    step, active = jnp.asarray(tokens[:, 0]), jnp.array([True, False, True])
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, 8)), jnp.int32)
    count = jnp.array([6], jnp.int32)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
    (step_logits, prompt_logits), mixed_cache, mixed_prompt = M.mixed_step(
        params, copy(cache), step, active, init_cache(cfg, 1, 8, jnp.float32), prompt, count, cfg, rt, fresh=True)
    want_step, want_cache = M.decode_step(params, copy(cache), step, cfg, active, rt)
    want_prompt, want_prompt_cache = M.prefill(params, init_cache(cfg, 1, 8, jnp.float32), prompt, count, cfg, rt,
                                               fresh=True)
    np.testing.assert_allclose(step_logits[::2], want_step[::2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(prompt_logits, want_prompt, rtol=1e-5, atol=1e-5)
    for got, want in ((mixed_cache, want_cache), (mixed_prompt, want_prompt_cache)):
        np.testing.assert_array_equal(got.lengths, want.lengths)
        for a, b in zip(got.k + got.v, want.k + want.v):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_model_tracks_float32(setup):
    cfg, params = setup
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 10)), jnp.int32)
    f32 = M.forward(params, tokens, cfg)
    bf16 = M.forward(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), tokens, cfg)
    assert bf16.dtype == jnp.float32
    assert float(jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32)) < 3e-2


def test_greedy_sampling_is_argmax_and_top_p_restricts_support():
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    greedy = sampling.sample(logits, jax.random.key(1), 0.0, 1.0)
    np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))
    # With top_p tiny only the most likely token survives, whatever the temperature.
    nucleus = sampling.sample(logits, jax.random.key(2), 5.0, 1e-6)
    np.testing.assert_array_equal(nucleus, jnp.argmax(logits, -1))
    # Per-row parameters: row 0 greedy, the others sampled with a real spread.
    temps = jnp.array([0.0, 1.0, 1.0, 1.0])
    draws = np.stack([sampling.sample(logits, jax.random.key(i), temps, 1.0) for i in range(40)])
    assert (draws[:, 0] == int(jnp.argmax(logits[0]))).all()
    assert len(set(draws[:, 1].tolist())) > 1


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = jnp.array([[0.5, 0.3, 0.15, 0.05]])
    logits = jnp.log(probs)
    draws = {int(sampling.sample(logits, jax.random.key(i), 1.0, 0.7)[0]) for i in range(200)}
    assert draws == {0, 1}


def test_top_k_keeps_the_k_most_likely_per_row():
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]] * 3))
    top_k = jnp.array([2, 1, 0])  # two tokens; only the top one even when hot; no limit
    draws = np.stack([sampling.sample(logits, jax.random.key(i), 3.0, 1.0, top_k) for i in range(300)])
    assert set(draws[:, 0].tolist()) == {0, 1}
    assert set(draws[:, 1].tolist()) == {0}
    assert set(draws[:, 2].tolist()) == {0, 1, 2, 3}
    # With top_p too: the tighter of the two limits holds.
    both = {int(sampling.sample(logits[:1], jax.random.key(i), 1.0, 0.5, 3)[0]) for i in range(200)}
    assert both == {0, 1}


@pytest.mark.parametrize("fp8", [False, True])
def test_fused_qkv_equals_three_projections(setup, fp8):
    """`fuse_qkv` (one weight, per KV head its query heads, key and value) changes no result: forward,
    prefill and decode match the separate projections, and checkpoints refuse the fused form."""
    from jaxfire import checkpoint
    from jaxfire.params import describe, fuse_qkv, quantize

    cfg, params = setup
    if fp8:
        params = quantize(params, describe(cfg))
    fused = fuse_qkv(params, cfg)
    attn = fused.layers[0].attn
    assert attn.wq is None and attn.wqkv.shape[0] == (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    tokens = jnp.asarray(np.random.default_rng(8).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    np.testing.assert_allclose(M.forward(fused, tokens, cfg), M.forward(params, tokens, cfg), rtol=1e-5, atol=1e-5)
    out = []
    for p in (params, fused):
        cache = init_cache(cfg, 2, 12, jnp.float32)
        first, cache = M.prefill(p, cache, tokens, jnp.array([9, 4], jnp.int32), cfg)
        step, _ = M.decode_step(p, cache, tokens[:, 0], cfg)
        out.append((first, step))
    for a, b in zip(*out):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fused query/key/value"):
        checkpoint.save("/nonexistent/never-written", fused, cfg)


@pytest.mark.parametrize("batch", [1, 3])
def test_fp8_decode_on_the_pallas_kernels_equals_xla(batch):
    """The GPU path of an FP8 decode step (Pallas grouped matmuls: the multiply-add kernel at batch 1,
    the MMA kernel at 3) against XLA's ragged dots, from the same cache."""
    cfg = CONFIGS["gqa"]
    params = init_params(cfg, jax.random.key(11), jnp.bfloat16, std=0.1, fp8=True)
    tokens = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, 7)).astype(np.int32)
    cache = init_cache(cfg, batch, 16, jnp.bfloat16)
    _, cache = M.prefill(params, cache, jnp.asarray(tokens[:, :6]), jnp.full((batch,), 6, jnp.int32), cfg)
    step = jnp.asarray(tokens[:, 6])
    got, _ = M.decode_step(params, jax.tree.map(jnp.copy, cache), step, cfg,
                           runtime=M.Runtime(grouped_matmul="pallas", decode_attention="xla"))
    want, _ = M.decode_step(params, cache, step, cfg, runtime=M.Runtime(grouped_matmul="xla", decode_attention="xla"))
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    # Both round activations to bf16 between the same kernels; only summation orders differ.
    assert np.linalg.norm(got - want) <= 2e-2 * np.linalg.norm(want)
    top2 = np.sort(want, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * np.abs(got - want).max()  # rows whose greedy token rounding cannot flip
    np.testing.assert_array_equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
