"""FP8: quantization bounds, both matmul modes, top-3 routing, the FP8 KV cache, FP8 checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfire
from convert import convert_hf
from jaxfire import checkpoint, moe, quant
from jaxfire import model as M
from jaxfire import params as P
from jaxfire.config import Config
from jaxfire.kv_cache import init_cache

E4M3_REL = 2.0**-4  # half an ulp of a 3-bit mantissa
E4M3_SUBNORMAL_HALF_STEP = 2.0**-10


def kl_and_top1(ref_logits, logits):
    lp = jax.nn.log_softmax(jnp.asarray(ref_logits, jnp.float32), -1)
    lq = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1)
    kl = float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1)))
    top1 = float(jnp.mean(jnp.argmax(lp, -1) == jnp.argmax(lq, -1)))
    return kl, top1


@pytest.mark.parametrize("shape", [(7, 33), (3, 5, 64)])
def test_round_trip_error_within_e4m3_bound(shape):
    w = jax.random.normal(jax.random.key(shape[0]), shape) * jnp.exp(jax.random.normal(jax.random.key(1), shape))
    q = quant.quantize_weight(w)
    assert q.value.dtype == jnp.float8_e4m3fn and q.scale.shape == shape[:-1]
    err = jnp.abs(q.dequantize() - w)
    bound = E4M3_REL * jnp.abs(w) + q.scale[..., None] * E4M3_SUBNORMAL_HALF_STEP
    assert bool(jnp.all(err <= bound * 1.0001))
    # The largest element of each row lands on the format's maximum, so no range is wasted.
    np.testing.assert_allclose(jnp.max(jnp.abs(q.value.astype(jnp.float32)), -1), quant.FP8_MAX)


def test_zero_rows_quantize_to_zero():
    q = quant.quantize_weight(jnp.zeros((2, 8)).at[1].set(1.0))
    assert bool(jnp.all(jnp.isfinite(q.scale))) and float(jnp.abs(q.dequantize()[0]).max()) == 0.0


@pytest.mark.parametrize("activations", ["never", "always"])
def test_dense_modes_match_dequantized_reference(activations):
    x = jax.random.normal(jax.random.key(0), (4, 9, 64), jnp.float32)
    w = quant.quantize_weight(jax.random.normal(jax.random.key(1), (48, 64)))
    out = quant.dense(x, w, quant.Fp8Policy(activations))
    ref = x @ w.dequantize().T
    err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    # Weight-only is exact up to float32 rounding; FP8 activations add e4m3 rounding of x.
    assert err < (1e-6 if activations == "never" else 4e-2)


@pytest.mark.parametrize("activations", ["never", "always"])
def test_grouped_modes_match_dequantized_reference(activations):
    e, n, k, t = 4, 24, 32, 19
    x = jax.random.normal(jax.random.key(2), (t, k))
    w = quant.quantize_weight(jax.random.normal(jax.random.key(3), (e, n, k)))
    sizes = jnp.array([5, 0, 9, 3], jnp.int32)  # 17 of 19 rows: the last two are past the groups
    out = quant.grouped(x, w, sizes, quant.Fp8Policy(activations))
    wd = w.dequantize()
    expert = np.repeat(np.arange(e), np.asarray(sizes))
    ref = jnp.concatenate([jnp.einsum("tk,tnk->tn", x[:17], wd[expert]), jnp.zeros((2, n))])
    assert float(jnp.abs(out[17:]).max()) == 0.0
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < (1e-6 if activations == "never" else 4e-2)


def test_policy_switches_on_token_count():
    auto = quant.Fp8Policy("auto", min_tokens=64)
    assert not auto.quantize_activations(63) and auto.quantize_activations(64)
    assert quant.Fp8Policy("always").quantize_activations(1)
    assert not quant.Fp8Policy("never").quantize_activations(10**6)
    with pytest.raises(ValueError, match="activations"):
        quant.Fp8Policy("sometimes")
    # Expert calls that may take the wgmma kernel quantize from 8 rows; projections keep 64.
    assert not auto.quantize_activations(7, kernel=True) and auto.quantize_activations(8, kernel=True)
    assert not auto.quantize_activations(8)
    assert not quant.Fp8Policy("never").quantize_activations(64, kernel=True)


@pytest.mark.parametrize("tokens", [1, 2, 8, 63])
def test_projections_on_a_gpu_take_xla_from_two_tokens(tokens, monkeypatch):
    """With "auto" on a GPU a weight-only FP8 projection of one token runs on the multiply-add
    kernel and of more on XLA's product; a named implementation always takes the kernels."""
    x = jnp.zeros((tokens, 64), jnp.bfloat16)
    monkeypatch.setattr(quant.jax, "default_backend", lambda: "gpu")
    assert quant._dense_kernel(x, "auto") == (tokens == 1)
    assert quant._dense_kernel(x, "pallas") and not quant._dense_kernel(x, "xla")
    monkeypatch.setattr(quant.jax, "default_backend", lambda: "cpu")
    assert not quant._dense_kernel(x, "auto")


def test_decode_sized_expert_rows_run_fp8_on_the_wgmma_kernel(monkeypatch):
    """Eight rows of FP8 experts through `implementation="pallas"` quantize their activations and
    take the wgmma kernel (interpreted here) on 64-row tiles (for the fused gate/up, with the
    warpgroups splitting its columns); seven, or eight through a width that kernel cannot take, stay weight-only on the
    Triton kernel; a projection of eight tokens stays weight-only. All match the dequantized reference within FP8 activation rounding."""
    from pallas_kernels.grouped_matmul import mosaic, triton

    seen = []
    for mod, name in ((mosaic, "mosaic"), (triton, "triton")):
        real = mod.grouped_matmul

        def spy(lhs, *args, config, real=real, name=name, **kwargs):
            seen.append((name, jnp.dtype(lhs.dtype).itemsize, config.block_m))
            return real(lhs, *args, config=config, **kwargs)

        monkeypatch.setattr(mod, "grouped_matmul", spy)
    e, k, n = 4, 256, 256  # N: a multiple of the wgmma kernel's CTA tile
    w = quant.quantize_weight(jax.random.normal(jax.random.key(4), (e, n, k)))
    wd = w.dequantize()
    for t, sizes, want in ((8, [3, 0, 4, 1], ("mosaic", 1, 64)), (7, [3, 0, 4, 0], ("triton", 2, 16))):
        x = jax.random.normal(jax.random.key(t), (t, k)).astype(jnp.bfloat16)
        gs = jnp.array(sizes, jnp.int32)
        out = quant.grouped(x, w, gs, quant.Fp8Policy(), "pallas")
        expert = np.repeat(np.arange(e), sizes)
        ref = jnp.einsum("tk,tnk->tn", x[:sum(sizes)].astype(jnp.float32), wd[expert])
        ref = jnp.concatenate([ref, jnp.zeros((t - sum(sizes), n))])
        assert float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref)) < 4e-2
        assert seen.pop() == want
    gate_up = quant.quantize_weight(jax.random.normal(jax.random.key(5), (e, 2 * n, k)))
    quant.grouped_swiglu(jax.random.normal(jax.random.key(6), (8, k)).astype(jnp.bfloat16), gate_up,
                         jnp.array([2, 2, 2, 2], jnp.int32), quant.Fp8Policy(), "pallas")
    assert seen.pop() == ("mosaic", 1, 64)
    # A width the wgmma kernel cannot take keeps weight-only rows on the Triton kernel.
    narrow = quant.quantize_weight(jax.random.normal(jax.random.key(9), (e, 128, k)))
    quant.grouped(jax.random.normal(jax.random.key(10), (8, k)).astype(jnp.bfloat16), narrow,
                  jnp.array([2, 2, 2, 2], jnp.int32), quant.Fp8Policy(), "pallas")
    assert seen.pop() == ("triton", 2, 16)
    proj = quant.quantize_weight(jax.random.normal(jax.random.key(7), (n, k)))
    quant.dense(jax.random.normal(jax.random.key(8), (8, k)).astype(jnp.bfloat16), proj, quant.Fp8Policy(), "pallas")
    assert seen.pop() == ("triton", 2, 16)


def dense_moe_reference(p, x, top_k):
    """Every expert on every token, weighted by Mixtral's renormalised top-k softmax (numpy, float64)."""
    x = np.asarray(x, np.float64)
    logits = x @ np.asarray(p.router, np.float64).T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[:, :top_k]
    out = np.zeros_like(x)
    f = p.w_down.shape[-1]
    for t in range(x.shape[0]):
        chosen = probs[t, top[t]]
        for e, w in zip(top[t], chosen / chosen.sum()):
            gate_up = np.asarray(p.w_gate_up[e], np.float64).reshape(2 * f, -1) @ x[t]
            h = gate_up[:f] / (1 + np.exp(-gate_up[:f])) * gate_up[f:]
            out[t] += w * (np.asarray(p.w_down[e], np.float64) @ h)
    return out


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_top_k_routing_matches_dense_reference(top_k):
    cfg = Config.preset("tiny")
    layer = P.init_params(cfg, jax.random.key(top_k), jnp.float32, std=0.2).layers[0]
    x = jax.random.normal(jax.random.key(9), (13, cfg.hidden_size))
    out = moe.moe_block(layer.moe, x, top_k)
    np.testing.assert_allclose(out, dense_moe_reference(layer.moe, x, top_k), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("tokens, top_k", [(1, 2), (7, 3), (64, 2)])
def test_dispatch_by_rank_equals_dispatch_by_sort(tokens, top_k):
    """The all-pairs ranking of small steps gives the sort's stable order, its inverse and the group
    sizes, ties and tokens routed nowhere (id E) included; the MoE block's output is the same."""
    rng = np.random.default_rng(tokens)
    experts = jnp.asarray(rng.integers(0, 5, (tokens, top_k)), jnp.int32)  # 4 experts; id 4 routes nowhere
    by_sort, by_rank = (moe.dispatch(experts, 4, method) for method in ("sort", "rank"))
    for a, b in zip(by_sort, by_rank):
        np.testing.assert_array_equal(a, b)
    order, position, sizes = by_rank
    flat = np.asarray(experts).reshape(-1)
    np.testing.assert_array_equal(order, np.argsort(flat, kind="stable"))
    np.testing.assert_array_equal(np.asarray(order)[np.asarray(position)], np.arange(flat.size))
    np.testing.assert_array_equal(sizes, np.bincount(flat, minlength=5)[:4])
    cfg = Config.preset("tiny")
    layer = P.init_params(cfg, jax.random.key(tokens), jnp.float32, std=0.2).layers[0]
    x = jax.random.normal(jax.random.key(1), (tokens, cfg.hidden_size))
    outs = [moe.moe_block(layer.moe, x, 2, dispatch_method=m) for m in ("sort", "rank", "auto")]
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="dispatch method must be one of"):
        moe.dispatch(experts, 4, "bucket")


def test_masked_tokens_route_nowhere_and_leave_the_others_unchanged():
    cfg = Config.preset("tiny")
    layer = P.init_params(cfg, jax.random.key(5), jnp.float32, std=0.2).layers[0]
    x = jax.random.normal(jax.random.key(6), (11, cfg.hidden_size))
    valid = jnp.asarray(np.random.default_rng(1).random(11) < 0.5)
    weights, experts = moe.route(layer.moe.router, x, 2, valid)
    _, _, sizes = moe.dispatch(experts, cfg.num_experts)
    assert int(sizes.sum()) == 2 * int(valid.sum())  # masked tokens are in no expert's group
    assert (np.asarray(weights)[~np.asarray(valid)] == 0).all()
    out = np.asarray(moe.moe_block(layer.moe, x, 2, valid=valid))
    full = np.asarray(moe.moe_block(layer.moe, x, 2))
    np.testing.assert_allclose(out[np.asarray(valid)], full[np.asarray(valid)], rtol=1e-6, atol=1e-6)
    assert (out[~np.asarray(valid)] == 0).all()


def test_fp8_cache_through_prefill_and_decode():
    cfg = Config.preset("tiny")
    params = P.init_params(cfg, jax.random.key(4), jnp.float32, std=0.1)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    full = M.forward(params, jnp.asarray(tokens), cfg)
    cache = init_cache(cfg, 2, 16, "fp8")
    assert cache.is_fp8 and cache.k[0].dtype == jnp.float8_e4m3fn and cache.k_scale[0].shape == (2, 16, 2)
    logits, cache = M.prefill(params, cache, jnp.asarray(tokens[:, :8]), jnp.array([8, 8], jnp.int32), cfg)
    got = [logits]
    for t in range(8, 12):
        logits, cache = M.decode_step(params, cache, jnp.asarray(tokens[:, t]), cfg)
        got.append(logits)
    got = jnp.stack(got, 1)  # [B, 5, V]
    kl, top1 = kl_and_top1(full[:, 7:], got)
    assert kl < 1e-3 and top1 >= 0.9
    assert cache.k[0].dtype == jnp.float8_e4m3fn and int(cache.lengths[0]) == 12


@pytest.fixture(scope="module")
def fp8_models(converted):
    _, ckpt = converted("gqa")
    return {
        "bf16": jaxfire.load(ckpt, dtype="bfloat16"),
        "f32": jaxfire.load(ckpt, dtype="float32"),
        "fp8": jaxfire.load(ckpt, dtype="fp8"),
    }


def test_fp8_model_close_to_bf16_on_converted_model(fp8_models):
    """On the converted random tiny HF model: KL(f32 || fp8) stays within a few times KL(f32 || bf16)."""
    tokens = np.random.default_rng(5).integers(0, 97, (4, 80))
    ref = jaxfire.logits(fp8_models["f32"], tokens)
    kl_bf16, top1_bf16 = kl_and_top1(ref, jaxfire.logits(fp8_models["bf16"], tokens))
    fp8 = fp8_models["fp8"]
    for mode in ("never", "always"):
        kl, top1 = kl_and_top1(ref, jaxfire.logits(fp8.with_runtime(fp8=quant.Fp8Policy(mode)), tokens))
        # Measured: KL 1.4e-3 / 1.6e-3 (weight-only / FP8 activations), top-1 agreement 0.93 / 0.90;
        # bf16 alone: KL 9e-6, top-1 0.99. Random tiny models have small logit margins, so top-1 flips easily.
        assert kl < 5e-3 and top1 > 0.85, (mode, kl, top1, kl_bf16, top1_bf16)


def test_fp8_checkpoint_stores_fp8_and_equals_load_time_quantization(converted, tmp_path, fp8_models):
    hf_dir, _ = converted("gqa")
    out = convert_hf(hf_dir, tmp_path / "fp8", dtype="fp8", progress=False)
    meta = checkpoint.read_metadata(out)
    assert meta["fp8"] and "float8_e4m3fn" in meta["dtypes"]
    stored = jaxfire.load(out)
    assert stored.is_fp8 and stored.dtype == jnp.bfloat16
    w = stored.params.layers[1].moe.w_gate_up
    assert w.value.dtype == jnp.float8_e4m3fn and w.scale.dtype == jnp.float32
    assert stored.params.layers[0].moe.router.dtype == jnp.bfloat16  # the router stays high precision
    for a, b in zip(jax.tree.leaves(stored.params), jax.tree.leaves(fp8_models["fp8"].params)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    # A float dtype asked of an FP8 checkpoint dequantizes it.
    f32 = jaxfire.load(out, dtype="float32")
    assert not f32.is_fp8 and f32.params.layers[0].attn.wqkv.dtype == jnp.float32


def test_three_experts_and_fp8_cache_generate(converted):
    _, ckpt = converted("gqa")
    model = jaxfire.load(ckpt, dtype="fp8", num_experts_per_tok=3, kv_cache_dtype="fp8")
    assert model.config.num_experts_per_tok == 3 and model.kv_cache_dtype == "fp8"
    result = jaxfire.generate(model, [[5, 6, 7], [8, 9]], max_new_tokens=6)
    assert all(1 <= len(t) <= 6 for t in result.tokens)
