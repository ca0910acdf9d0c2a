"""Sharded models on 8 fake CPU devices equal the single-device model: logits and greedy tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfire
from jaxfire import moe
from jaxfire import sharding as S
from jaxfire.params import GATE_UP_AXES

MESHES = {
    "1": dict(devices=1, expert=1),
    "expert2": dict(devices=2, expert=2),
    "expert4": dict(devices=4, expert=4),
    "expert8": dict(devices=8, expert=8),
    "expert2_tensor4": dict(devices=8, expert=2, tensor=4),
    "tensor2": dict(devices=2, expert=1, tensor=2),
    "data2_expert4": dict(devices=8, data=2, expert=4),
}


def mesh_of(spec):
    spec = dict(spec)
    return jaxfire.make_mesh(jax.devices()[:spec.pop("devices")], **spec)


@pytest.fixture(scope="module")
def reference(converted):
    _, ckpt = converted("ep8")
    return ckpt, jaxfire.load(ckpt, dtype="float32")


def skew_router(model):
    """Every token to experts 0 and 1 in every layer (identical router rows tie, and top-k breaks ties
    towards the lowest index): the worst case for the dispatch buffers, all rows to one or two devices."""
    for layer in model.params.layers:
        r = layer.moe.router
        layer.moe.router = jnp.broadcast_to(r[:1], r.shape)
    return model


@pytest.mark.parametrize("mesh_name, skewed", [(m, False) for m in MESHES] + [
    ("expert2", True), ("expert8", True), ("expert2_tensor4", True)])
def test_sharded_logits_and_tokens_equal_single_device(reference, mesh_name, skewed):
    ckpt, single = reference
    mesh = mesh_of(MESHES[mesh_name])
    model = jaxfire.load(ckpt, dtype="float32", mesh=mesh)
    if skewed:
        single = skew_router(jaxfire.load(ckpt, dtype="float32"))
        model = skew_router(model)
        x = jax.random.normal(jax.random.key(0), (50, 64))
        chosen = moe.route(single.params.layers[0].moe.router, x, 2)[1]
        assert (np.asarray(chosen) == [0, 1]).all()
    w = model.params.layers[0].moe.w_gate_up
    assert w.sharding.spec == S.partition_spec(mesh, GATE_UP_AXES, w.shape)
    tokens = np.random.default_rng(0).integers(0, 97, (4, 13))
    np.testing.assert_allclose(jaxfire.logits(model, tokens), jaxfire.logits(single, tokens), rtol=1e-5, atol=1e-5)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    assert jaxfire.generate(model, prompts, max_new_tokens=12).tokens == \
        jaxfire.generate(single, prompts, max_new_tokens=12).tokens


@pytest.mark.parametrize("mesh_name, dispatch", [
    ("expert8", "auto"), ("expert2_tensor4", "auto"), ("tensor2", "auto"), ("expert8", "sort"),
    ("expert2_tensor4", "rank")])
def test_expert_parallel_masked_tokens_equal_local(reference, mesh_name, dispatch):
    """Masked tokens (idle decode slots, prompt padding) are sent nowhere; the rest match one device."""
    ckpt, single = reference
    mesh = mesh_of(MESHES[mesh_name])
    p = single.params.layers[0].moe
    x = jax.random.normal(jax.random.key(3), (21, p.router.shape[1]))  # 21: padded to the 8 token shards
    valid = jnp.asarray(np.random.default_rng(2).random(21) < 0.4)
    local = moe.moe_block(p, x, 2, valid=valid)
    on_mesh = jaxfire.load(ckpt, dtype="float32", mesh=mesh).params.layers[0].moe
    sharded = moe.moe_block(on_mesh, x, 2, mesh=mesh, valid=valid, dispatch_method=dispatch)
    np.testing.assert_allclose(sharded, local, rtol=1e-5, atol=1e-5)
    assert (np.asarray(sharded)[~np.asarray(valid)] == 0).all()


@pytest.mark.parametrize("mesh_name", ["expert2", "tensor2", "data2_expert4"])
def test_decode_step_over_a_slot_prefix_on_a_mesh(reference, mesh_name):
    """The engine's small decode steps (the first n of the cache's sequences) on a sharded cache."""
    from jaxfire import model as M
    from jaxfire.kv_cache import init_cache

    ckpt, single = reference
    model = jaxfire.load(ckpt, dtype="float32", mesh=mesh_of(MESHES[mesh_name]))
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 97, (8, 5)), jnp.int32)
    counts = jnp.array([5, 3, 4, 2, 5, 1, 3, 4], jnp.int32)
    out = []
    for m in (single, model):
        cache = init_cache(m.config, 8, 8, jnp.float32, m.runtime.mesh)
        _, cache = M.prefill(m.params, cache, tokens, counts, m.config, m.runtime)
        logits, cache = M.decode_step(m.params, cache, tokens[:3, 0], m.config, jnp.array([True, True, False]),
                                      m.runtime)
        out.append((logits, cache))
    np.testing.assert_allclose(out[1][0][:2], out[0][0][:2], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[1][1].lengths, [6, 4, 4, 2, 5, 1, 3, 4])
    np.testing.assert_allclose(out[1][1].k[1], out[0][1].k[1], rtol=1e-5, atol=1e-5)


def test_too_many_experts_per_device_for_the_id_column_are_refused():
    """Rows travel with their local expert id in a column of the activation dtype: bf16 counts to 256."""
    from jaxfire.params import MoE

    e, d, f = 2 * 258, 16, 8
    mesh = mesh_of(MESHES["expert2"])
    keys = jax.random.split(jax.random.key(0), 4)
    p = MoE(router=jax.random.normal(keys[0], (e, d), jnp.bfloat16),
            w_gate_up=jax.random.normal(keys[1], (e, 2, f, d), jnp.bfloat16),
            w_down=jax.random.normal(keys[2], (e, d, f), jnp.bfloat16))
    x = jax.random.normal(keys[3], (4, d), jnp.bfloat16)
    with pytest.raises(ValueError, match="258 experts per device.*only up to 256"):
        moe.moe_block(p, x, 2, mesh=mesh)


def test_expert_width_the_tensor_axis_does_not_divide_stays_whole():
    """F = 36 over a tensor axis of 8: the experts stay whole on each device, which all compute the
    same output (nothing is added twice)."""
    from jaxfire.config import Config
    from jaxfire.params import init_params

    cfg = Config.preset("tiny").replace(intermediate_size=36)
    mesh = mesh_of(dict(devices=8, expert=1, tensor=8))
    local = init_params(cfg, jax.random.key(7), jnp.float32, std=0.2).layers[0].moe
    placed = init_params(cfg, jax.random.key(7), jnp.float32, std=0.2, sharding_fn=S.param_sharding_fn(mesh))
    assert placed.layers[0].moe.w_down.sharding.spec[2] is None
    x = jax.random.normal(jax.random.key(8), (16, cfg.hidden_size))
    np.testing.assert_allclose(moe.moe_block(placed.layers[0].moe, x, 2, mesh=mesh), moe.moe_block(local, x, 2),
                               rtol=1e-5, atol=1e-5)


def test_weights_and_cache_are_split_as_the_rules_say(reference):
    ckpt, _ = reference
    mesh = mesh_of(MESHES["expert2_tensor4"])
    model = jaxfire.load(ckpt, dtype="fp8", mesh=mesh)
    layer = model.params.layers[0]

    def split_as(array, *spec):
        expected = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
        return array.sharding.is_equivalent_to(expected, array.ndim)

    assert split_as(layer.moe.w_gate_up.value, "expert", None, "tensor", None)
    assert split_as(layer.moe.w_gate_up.scale, "expert", None, "tensor")
    assert split_as(layer.moe.w_down.value, "expert", None, "tensor")
    assert layer.attn.wq is None and split_as(layer.attn.wqkv.value, "tensor", None)  # fused, whole KV groups
    assert split_as(layer.attn.wqkv.scale, "tensor")
    assert split_as(layer.attn.wo.value, None, "tensor")
    assert split_as(layer.moe.router, None, None)
    # Each device holds 1/8 of the expert weights: half the experts, a quarter of each one's width.
    shard = layer.moe.w_gate_up.value.addressable_shards[0].data
    full = layer.moe.w_gate_up.value.shape
    assert shard.shape == (full[0] // 2, 2, full[2] // 4, full[3])
    from jaxfire.kv_cache import init_cache

    cache = init_cache(model.config, 4, 16, "fp8", mesh)
    assert cache.k[0].sharding.spec == jax.sharding.PartitionSpec("expert", None, "tensor", None)


def test_fp8_sharded_matches_fp8_single(reference):
    ckpt, _ = reference
    tokens = np.random.default_rng(1).integers(0, 97, (2, 9))
    single = jaxfire.load(ckpt, dtype="fp8")
    sharded = jaxfire.load(ckpt, dtype="fp8", mesh=mesh_of(MESHES["expert8"]))
    np.testing.assert_allclose(jaxfire.logits(sharded, tokens), jaxfire.logits(single, tokens), rtol=2e-2,
                               atol=2e-2)


def test_mqa_heads_replicate_under_tensor_parallelism(converted):
    _, ckpt = converted("mqa_window_tied")
    single = jaxfire.load(ckpt, dtype="float32")
    model = jaxfire.load(ckpt, dtype="float32", mesh=mesh_of(dict(devices=4, expert=2, tensor=2)))
    assert model.params.layers[0].attn.wk.sharding.spec == jax.sharding.PartitionSpec(None, None)
    assert model.params.layers[0].attn.wq.sharding.spec == jax.sharding.PartitionSpec("tensor", None)
    tokens = np.random.default_rng(2).integers(0, 320, (2, 11))
    np.testing.assert_allclose(jaxfire.logits(model, tokens), jaxfire.logits(single, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mesh_name", ["tensor2", "expert2", "expert2_tensor4"])
@pytest.mark.parametrize("kv", ["float32", "fp8"])
def test_decode_kernels_on_a_mesh_equal_one_device(converted, mesh_name, kv):
    """The cache-append and decode attention kernels (interpret mode) run per device under shard_map:
    one KV head replicated while query heads split, sequences split; steps over a slot prefix too."""
    from jaxfire import model as M
    from jaxfire.kv_cache import init_cache

    _, ckpt = converted("mqa_window_tied")  # head dim 64: a size the kernels take
    single = jaxfire.load(ckpt, dtype="float32")
    model = jaxfire.load(ckpt, dtype="float32", mesh=mesh_of(MESHES[mesh_name])).with_runtime(
        decode_attention="pallas")
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, 320, (8, 6)), jnp.int32)
    counts = jnp.array([6, 2, 5, 1, 3, 6, 4, 2], jnp.int32)
    out = []
    for m in (single, model):
        cache = init_cache(m.config, 8, 10, kv, m.runtime.mesh)
        _, cache = M.prefill(m.params, cache, tokens, counts, m.config, m.runtime)
        full, cache = M.decode_step(m.params, cache, tokens[:, 0], m.config, runtime=m.runtime)
        part, cache = M.decode_step(m.params, cache, tokens[:4, 1], m.config, jnp.array([True, False, True, True]),
                                    m.runtime)
        out.append((full, part, jax.tree.map(np.asarray, cache)))
    tol = dict(rtol=1e-5, atol=1e-5) if kv == "float32" else dict(rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(out[1][0], out[0][0], **tol)
    np.testing.assert_allclose(np.asarray(out[1][1])[[0, 2, 3]], np.asarray(out[0][1])[[0, 2, 3]], **tol)
    np.testing.assert_array_equal(out[1][2].lengths, np.asarray(counts) + [2, 1, 2, 2, 1, 1, 1, 1])
    for a, b in zip(jax.tree.leaves(out[1][2]), jax.tree.leaves(out[0][2])):
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), **tol)


def test_experts_that_do_not_divide_the_mesh_are_refused(reference):
    ckpt, _ = reference
    with pytest.raises(S.MeshError, match="8 experts cannot be split evenly over an expert axis of 3"):
        jaxfire.load(ckpt, mesh=jaxfire.make_mesh(jax.devices()[:3]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(expert=3), "do not divide the 8 devices"),
    (dict(expert=2, tensor=2), "use 4 devices, but 8 were given"),
    (dict(tensor=0), "positive integer"),
])
def test_bad_meshes_are_refused(kwargs, message):
    if kwargs == dict(expert=2, tensor=2):
        kwargs = dict(kwargs, data=1)
    with pytest.raises(S.MeshError, match=message):
        jaxfire.make_mesh(**kwargs)


def test_default_mesh_puts_every_device_on_the_expert_axis():
    mesh = jaxfire.make_mesh()
    assert dict(mesh.shape) == {"data": 1, "expert": 8, "tensor": 1}
    assert dict(jaxfire.make_mesh(tensor=2).shape) == {"data": 1, "expert": 4, "tensor": 2}


@pytest.mark.parametrize("mesh_name", ["tensor2", "expert2"])
def test_one_token_on_the_kernels_of_a_mesh_equals_one_device(reference, mesh_name):
    """A batch-1 MoE step on the Pallas grouped matmuls (on a tensor axis half of each expert's width
    a device) equals the same kernels on one device."""
    ckpt, _ = reference
    kernels = dict(implementation="pallas")
    local = jaxfire.load(ckpt, dtype="bfloat16").params.layers[0].moe
    x = jax.random.normal(jax.random.key(12), (1, local.router.shape[1]), jnp.bfloat16)
    want = np.asarray(moe.moe_block(local, x, 2, **kernels), np.float32)
    mesh = mesh_of(MESHES[mesh_name])
    on_mesh = jaxfire.load(ckpt, dtype="bfloat16", mesh=mesh).params.layers[0].moe
    got = np.asarray(moe.moe_block(on_mesh, x, 2, mesh=mesh, **kernels), np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
