# T tokens, D model width, E experts, k experts per token.
"""moe_route against a float64 NumPy statement of Mixtral's routing, for every implementation.

The Pallas kernel runs in interpret mode on a CPU; a lowering test compiles it for an H100 from the
CPU. Inputs are drawn so that no two of a token's probabilities tie within rounding, except in the
test of ties, whose logits are equal by construction.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.moe_route import moe_route
from tests.kernels.lowering import lower_for_h100, verify_triton_modules

BF16 = jnp.bfloat16


@pytest.fixture
def rng(request) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def oracle(x, router, top_k, valid):
    """float64: the logits rounded to x's dtype, softmax, the k largest (lower id on ties), renormalised."""
    logits = np.asarray(x.astype(jnp.float32), np.float64) @ np.asarray(router.astype(jnp.float32), np.float64).T
    logits = np.asarray(jnp.asarray(logits, jnp.float32).astype(x.dtype).astype(jnp.float32), np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    experts = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(p, experts, -1)
    weights /= weights.sum(-1, keepdims=True)
    if valid is not None:
        v = np.asarray(valid)[:, None]
        weights, experts = np.where(v, weights, 0.0), np.where(v, experts, router.shape[0])
    return weights, experts


class RouteCases:
    implementation = "reference"

    @pytest.mark.parametrize("t, d, e, top_k, masked", [
        (1, 256, 8, 2, False),  # a batch-1 decode step
        (37, 200, 8, 3, True),  # rows past a block, D no block divides, tokens routed nowhere
        (20, 64, 5, 1, False),  # E not a power of two
        (16, 128, 32, 4, True),  # more experts than the MMA's smallest width
    ])
    def test_matches_oracle(self, rng, t, d, e, top_k, masked):
        x = jnp.asarray(rng.standard_normal((t, d)), BF16)
        router = jnp.asarray(rng.standard_normal((e, d)) * 0.2, BF16)
        valid = jnp.asarray(rng.random(t) < 0.7) if masked else None
        weights, experts = moe_route(x, router, top_k, valid, implementation=self.implementation)
        assert weights.shape == experts.shape == (t, top_k)
        assert weights.dtype == jnp.float32 and experts.dtype == jnp.int32
        want_w, want_e = oracle(x, router, top_k, valid)
        np.testing.assert_array_equal(experts, want_e)
        np.testing.assert_allclose(weights, want_w, rtol=1e-5, atol=1e-6)

    def test_ties_pick_the_lower_expert(self):
        x = jnp.ones((3, 32), BF16)
        router = jnp.asarray(np.repeat([[0.1], [0.3], [0.3], [0.2], [0.3]], 32, axis=1), BF16)
        weights, experts = moe_route(x, router, 3, implementation=self.implementation)
        np.testing.assert_array_equal(experts, [[1, 2, 4]] * 3)
        np.testing.assert_allclose(weights, 1 / 3, rtol=1e-6)


class TestReference(RouteCases):
    implementation = "reference"


class TestPallasTriton(RouteCases):
    implementation = "pallas_triton"


class TestDefault(RouteCases):
    implementation = None


@pytest.mark.parametrize("kwargs, message", [
    (dict(x=jnp.ones((2, 3, 8), BF16)), r"x must be \[T, D\]"),
    (dict(router=jnp.ones((8, 16), BF16)), "D=8 as in x"),
    (dict(x=jnp.ones((2, 8), jnp.int32)), "x must be bfloat16"),
    (dict(top_k=9), r"top_k must be an int in \[1, E=8\]"),
    (dict(top_k=0), "top_k must be"),
    (dict(valid=jnp.ones((3,), bool)), r"valid must be bool \[T\]"),
    (dict(implementation="cuda"), "implementation must be one of"),
])
def test_errors_name_the_problem(kwargs, message):
    args = dict(x=jnp.ones((2, 8), BF16), router=jnp.ones((8, 8), BF16), top_k=2, valid=None)
    args.update(kwargs)
    impl = args.pop("implementation", None)
    with pytest.raises(ValueError, match=message):
        moe_route(args["x"], args["router"], args["top_k"], args["valid"], implementation=impl)


@pytest.mark.parametrize("t", [1, 1024])
def test_mixtral_shapes_lower_for_h100(t, monkeypatch):
    from pallas_kernels.moe_route import triton

    verified = verify_triton_modules(monkeypatch)
    s = jax.ShapeDtypeStruct
    text = lower_for_h100(lambda x, r, v: triton.moe_route(x, r, v, top_k=2), s((t, 4096), BF16),
                          s((8, 4096), BF16), s((t,), jnp.bool_))
    assert "custom_call" in text
    assert verified == [True]
