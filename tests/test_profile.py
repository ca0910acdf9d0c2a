"""The profile summary books each kernel to the named scope it was traced in."""

import jax
import jax.numpy as jnp

from bench import profile as P


def _two_stages(x, w):
    with jax.named_scope("alpha"):
        y = jax.lax.optimization_barrier(jnp.tanh(x @ w))  # two kernels, not one fusion
    with jax.named_scope("beta"):
        return jnp.exp(y * 0.5).sum(axis=0)


def test_scope_path_drops_wrappers_einsum_specs_and_the_op():
    assert P.scope_path("jit(decode_step)/layer_3/moe/experts/dot_general") == "layer_3/moe/experts"
    assert P.scope_path("jit(f)/jit(main)/layer_0/attention/attend/btgrk,bsgk->bgrts/dot_general") == \
        "layer_0/attention/attend"
    assert P.scope_path("params.layers[0].moe.w") == ""
    assert P.scope_path("jit(ragged_step)/layer_1/attention/attend/eval_jaxpr/dot_general") == \
        "layer_1/attention/attend"


def test_stage_drops_the_layer_index_and_books_collectives_to_communication():
    assert P.stage_of(P.Instruction("f.1", "fusion", "layer_7/moe/route"), "loop_fusion_1") == "moe/route"
    assert P.stage_of(P.Instruction("a.1", "all-to-all", "layer_0/moe/dispatch"), "x") == "communication"
    assert P.stage_of(None, "ncclDevKernel_SendRecv") == "communication"
    assert P.stage_of(None, "psum_113_0_fusion_1") == "communication"  # XLA's own all-reduce kernel
    assert P.stage_of(None, "mystery") == "unattributed"
    assert P.stage_of(None, "grouped_matmul_swiglu_triton") == "unattributed: experts gate/up (Pallas)"
    assert P.stage_of(None, "jaxfire_paged_attention_decode") == "unattributed: paged attention (Pallas)"


def test_parse_hlo_gives_fusions_the_scope_of_their_body():
    f = jax.jit(_two_stages)
    x = jax.random.normal(jax.random.key(0), (64, 64))
    program = P.parse_hlo(f.lower(x, x).compile().as_text())
    scopes = {i.scope for i in program.values() if i.opcode in ("fusion", "dot", "custom-call")}
    assert {"alpha", "beta"} <= scopes, scopes


def test_profile_books_time_to_each_scope():
    f = jax.jit(_two_stages)
    x = jax.random.normal(jax.random.key(1), (256, 256))
    w = jax.random.normal(jax.random.key(2), (256, 256))
    row = P.profile(lambda: f(x, w), f.lower(x, w).compile().as_text(), steps=4)
    assert row["matched_share"] > 0.9, row
    assert row["stages_ms"].get("alpha", 0) > 0 and row["stages_ms"].get("beta", 0) > 0, row["stages_ms"]
    assert 0 < row["busy_ms"] <= row["wall_ms"] * 1.05, row


def test_idle_gaps_are_booked_to_the_kernel_that_ends_them():
    program = {"f.1": P.Instruction("f.1", "fusion", "layer_0/moe/route"),
               "c.1": P.Instruction("c.1", "custom-call", "layer_0/moe/experts")}
    ev = lambda name, start, dur, op: P.Event(name, start, dur, op)  # noqa: E731
    events = [ev("route", 0, 10, "f.1"), ev("experts", 40, 100, "c.1"),  # 30 ns before the experts
              ev("overlap", 50, 20, "f.1"),  # inside the experts' span: no gap
              ev("route", 150, 10, "f.1"), ev("experts", 200, 100, "c.1")]  # 10 then 40 ns
    gaps = P.idle_gaps(events, program, {})
    assert gaps == {("experts", "moe/experts", "route"): [70.0, 2],
                    ("route", "moe/route", "experts"): [10.0, 1]}, dict(gaps)
    row = P.summarize(events, program, steps=2, wall_s=400e-9)
    assert row["idle_before"][0] == dict(kernel="experts", stage="moe/experts", after="route", ms=35e-6,
                                         gaps_per_step=1.0)
