"""Whole-model step times at full Mixtral geometry with random weights: decode at several batch sizes
and prefill of a 1024-token prompt, bf16 against FP8, against the memory roofline.

A decode step reads its weights and cache and writes little, so its ceiling is the card's streaming
read bandwidth, measured in the same run (`bench.common.read_tbs`): each decode row carries it
("read_tbs"), the bytes the step must read over its time ("tbs") as a share of it ("of_read_bw"),
and the whole model's bytes over it ("roofline_ms"); the read-plus-write copy figure ("copy_bw_tbs",
"of_copy_bw") stays beside it for comparison with earlier rows.

    PYTHONPATH=. python bench/decode.py [--preset mixtral-8x7b] [--layers 8] [--mesh expert=2] [--out-dir DIR]

Layers beyond `--layers` are not built: per-step times scale with the layer count (each layer reads
its own weights and cache), so figures are reported both as measured and scaled to the whole model
("model_ms"). Weights and the KV cache are random (never zeros); the cache holds `--context` tokens
per sequence when each decode step runs. A decode step is timed twice: call by call ("ms", what a
caller that dispatches each step sees) and `--steps` steps inside one program ("device_ms": the
device's time, which the engine's steps approach when the whole model keeps the device busier than the
host; with few layers on several GPUs the host's dispatch can exceed the device's step).

With `--mesh` the model is built sharded over the devices (`jaxfire.make_mesh` axis sizes: expert
and/or tensor parallel); its collectives (the MoE block's all_to_alls over "expert", the psums over
"tensor") are also timed alone, with the shapes a step sends, to give communication's share of the
step ("comm_ms", "comm_share"; rows before tensor parallelism call it "a2a_ms").

"mixed" rows time a prompt's prefill carrying a decode step of `--mixed-batches` sequences in one pass
(`model.mixed_step`, what the engine runs under load) beside the prefill and decode step timed apart
("apart_ms") and the share of that time the single pass saves ("saved_share").
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (copy_bandwidth, median_seconds, parse_mesh, print_table, read_tbs,  # noqa: E402
                          write_results)
from jaxfire import model as M  # noqa: E402
from jaxfire import quant  # noqa: E402
from jaxfire import sharding as S  # noqa: E402
from jaxfire.config import Config  # noqa: E402
from jaxfire.kv_cache import KVCache, init_cache  # noqa: E402
from jaxfire.params import fuse_qkv, init_params  # noqa: E402

PEAK_FLOPS = {"bf16": 661e12, "fp8": 1257e12}  # dense matmul ceilings measured on the H100 (shared/GPU.md)


def step_bytes(c: Config, layers: int, batch: int, context: int, weight_bytes: float, kv_bytes: float,
               cached: int | None = None) -> float:
    """Fewest bytes one decode step must read: weights of the experts routing can touch, attention
    weights, the router, the KV cache and the LM head. `batch` token rows are routed; `cached`
    positions are read from the cache (default `batch * context`: a ragged step's prompt chunk reads
    only its own prompt's)."""
    d, f, e, k = c.hidden_size, c.intermediate_size, c.num_experts, c.num_experts_per_tok
    active_experts = e * (1 - (1 - k / e) ** batch)  # expected distinct experts under uniform routing
    attn = (2 * c.num_heads + 2 * c.num_kv_heads) * c.head_dim * d * weight_bytes
    experts = active_experts * 3 * d * f * weight_bytes
    kv = (batch * context if cached is None else cached) * 2 * c.num_kv_heads * c.head_dim * kv_bytes
    per_layer = attn + experts + e * d * 2 + kv
    return layers * per_layer + c.vocab_size * d * 2


def element_bytes(c: Config, weights: str, kv_dtype) -> tuple[float, float]:
    """Bytes per weight and per cached key/value element of a variant (an FP8 cache also reads its
    float32 scale per head and position)."""
    return (1.0 if weights == "fp8" else 2.0), (1.0 + 4.0 / c.head_dim if kv_dtype == "fp8" else 2.0)


def prefill_flops(c: Config, layers: int, tokens: int) -> float:
    d, f, k = c.hidden_size, c.intermediate_size, c.num_experts_per_tok
    proj = 2 * tokens * (2 * c.num_heads + 2 * c.num_kv_heads) * c.head_dim * d
    experts = 2 * tokens * k * 3 * d * f
    attn = 2 * 2 * tokens * tokens / 2 * c.num_heads * c.head_dim  # causal half of QK^T and PV
    return layers * (proj + experts + attn) + 2 * tokens * c.vocab_size * d


_fill = jax.jit(lambda k, x: (jax.random.normal(k, x.shape, jnp.float32) * 0.5).astype(x.dtype))


def random_values(cache, key):
    """The cache (contiguous or paged: any with per-layer lists `k` and `v`) holding random keys and
    values, never zeros."""
    keys = jax.random.split(key, 2 * len(cache.k))
    return dataclasses.replace(cache, k=[_fill(keys[2 * i], x) for i, x in enumerate(cache.k)],
                               v=[_fill(keys[2 * i + 1], x) for i, x in enumerate(cache.v)])


def random_cache(c: Config, batch: int, max_len: int, context: int, kv_dtype, key, mesh=None) -> KVCache:
    cache = random_values(init_cache(c, batch, max_len, kv_dtype, mesh), key)
    return dataclasses.replace(cache, lengths=jnp.full((batch,), context, jnp.int32))


WARMUP_CALLS = (3, 20)  # at least, at most


def time_decode(params, c, runtime, batch, context, kv_dtype, steps):
    """Seconds per decode step dispatched call by call, the first call's seconds (compilation) and the
    warm-up calls' milliseconds, each waited on alone: warm-up goes on (within WARMUP_CALLS) until two
    calls in a row agree within 10%, and the figures show how long a fresh executable runs slow."""
    cache = random_cache(c, batch, context + steps + WARMUP_CALLS[1] + 8, context, kv_dtype, jax.random.key(1),
                         runtime.mesh)
    tokens = jax.random.randint(jax.random.key(2), (batch,), 0, c.vocab_size)
    t0 = time.perf_counter()
    logits, cache = M.decode_step(params, cache, tokens, c, runtime=runtime)
    jax.block_until_ready(logits)
    compile_s = time.perf_counter() - t0
    warmup_ms: list[float] = []
    while len(warmup_ms) < WARMUP_CALLS[1]:
        t0 = time.perf_counter()
        logits, cache = M.decode_step(params, cache, tokens, c, runtime=runtime)
        jax.block_until_ready(logits)
        warmup_ms.append((time.perf_counter() - t0) * 1e3)
        if len(warmup_ms) >= WARMUP_CALLS[0] and abs(warmup_ms[-1] - warmup_ms[-2]) <= 0.1 * warmup_ms[-2]:
            break
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, cache = M.decode_step(params, cache, tokens, c, runtime=runtime)
    jax.block_until_ready(logits)
    sec = (time.perf_counter() - t0) / steps
    # Checked after the clock stops: the check compiles for each new logits shape, which inside the
    # timed region made every batch size of the first variant in a process read 2-50x slower.
    assert bool(jnp.all(jnp.isfinite(logits))), "non-finite logits"
    return sec, compile_s, warmup_ms


def _decode_loop(params, cache, tokens, c, runtime, steps):
    """`steps` greedy decode steps in one program."""
    def body(_, carry):
        cache, tokens = carry
        logits, cache = M.decode_step_fn(params, cache, tokens, c, None, runtime)
        return cache, jnp.argmax(logits, axis=-1).astype(tokens.dtype)

    return jax.lax.fori_loop(0, steps, body, (cache, tokens))


decode_loop = jax.jit(_decode_loop, static_argnames=("c", "runtime", "steps"), donate_argnames=("cache",),
                      compiler_options=S.COMPILER_OPTIONS)


def time_decode_loop(params, c, runtime, batch, context, kv_dtype, steps):
    """Seconds per decode step with `steps` steps in one program: the device's time, with the host's
    dispatch of each call out of the figure. A short model (few layers) on several GPUs can take less
    device time per call than the host needs to launch it, which the per-call timing then measures."""
    cache = random_cache(c, batch, context + 2 * steps + 8, context, kv_dtype, jax.random.key(1), runtime.mesh)
    tokens = jax.random.randint(jax.random.key(2), (batch,), 0, c.vocab_size)
    # Fresh inputs and the loop's outputs can be placed differently (uncommitted, on one device, or
    # committed to the mesh), and each placement compiles the loop anew: two untimed calls reach the
    # loop's own placement, which the timed call then reuses. The lengths are reset by an op on the
    # old ones, which keeps their placement.
    for _ in range(2):
        cache, tokens = jax.block_until_ready(decode_loop(params, cache, tokens, c, runtime, steps))
        cache = dataclasses.replace(cache, lengths=cache.lengths * 0 + context)
    t0 = time.perf_counter()
    cache, tokens = jax.block_until_ready(decode_loop(params, cache, tokens, c, runtime, steps))
    return (time.perf_counter() - t0) / steps


def prefill_call(params, c, runtime, tokens_n, kv_dtype) -> tuple[Callable[[], jax.Array], Callable[[], str]]:
    """A `tokens_n`-token prompt's prefill that donates its cache back to the next call (no cache is
    built between calls, whose fills the host would dispatch between prefills), and the text of its
    compiled program."""
    state = {"cache": init_cache(c, 1, tokens_n, kv_dtype, runtime.mesh)}
    tokens = jax.random.randint(jax.random.key(3), (1, tokens_n), 0, c.vocab_size)
    counts = jnp.array([tokens_n], jnp.int32)

    def call():
        cache = dataclasses.replace(state["cache"], lengths=jnp.zeros((1,), jnp.int32))
        logits, state["cache"] = M.prefill(params, cache, tokens, counts, c, runtime=runtime, fresh=True)
        return logits

    def compiled_text() -> str:
        return M.prefill.lower(params, state["cache"], tokens, counts, c, runtime=runtime,
                               fresh=True).compile().as_text()

    return call, compiled_text


def time_prefill(params, c, runtime, tokens_n, kv_dtype, iters=5):
    return median_seconds(prefill_call(params, c, runtime, tokens_n, kv_dtype)[0], iters)


def time_mixed(params, c, runtime, batch, context, tokens_n, kv_dtype, iters=5):
    """Seconds of one `model.mixed_step`: a `tokens_n`-token prompt's prefill carrying a decode step of
    `batch` sequences with `context` cached tokens (the engine's prefill calls under load)."""
    state = {"cache": random_cache(c, batch, context + iters + 8, context, kv_dtype, jax.random.key(1), runtime.mesh),
             "prompt": init_cache(c, 1, tokens_n, kv_dtype, runtime.mesh)}
    step = jax.random.randint(jax.random.key(2), (batch,), 0, c.vocab_size)
    prompt = jax.random.randint(jax.random.key(3), (1, tokens_n), 0, c.vocab_size)
    counts = jnp.array([tokens_n], jnp.int32)

    def call():
        fresh = dataclasses.replace(state["prompt"], lengths=jnp.zeros((1,), jnp.int32))
        (logits, _), state["cache"], state["prompt"] = M.mixed_step(params, state["cache"], step, None, fresh, prompt,
                                                                    counts, c, runtime, fresh=True)
        return logits

    return median_seconds(call, iters)


def time_collectives(mesh, c: Config, tokens: int, layers: int, dtype=jnp.bfloat16) -> float:
    """Seconds one forward pass spends in collectives, timed alone with the shapes the model sends:
    per layer, over "expert" the MoE block's two all_to_alls (dispatch and return, worst-case
    buffers, `jaxfire.moe.expert_parallel`), over "tensor" two psums of the layer's [T, D] output
    (attention's wo and the experts' slices)."""
    shards = S.token_shards(mesh)
    n, t = mesh.shape["expert"], mesh.shape["tensor"]
    local = -(-tokens // shards)
    a = local * c.num_experts_per_tok
    spec = jax.sharding.PartitionSpec(S.RULES["tokens"])

    def body(buf, out):
        def layer(_, bufs):
            b, o = bufs
            if n > 1:
                b = jax.lax.all_to_all(jax.lax.all_to_all(b, "expert", 0, 0) * 1.001, "expert", 0, 0)
            if t > 1:
                o = jax.lax.psum(jax.lax.psum(o, "tensor") * 0.5, "tensor") * 0.5
            return b, o
        return jax.lax.fori_loop(0, layers, layer, (buf, out))

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec, spec), out_specs=(spec, spec), check_vma=False),
                 compiler_options=S.COMPILER_OPTIONS)  # the collectives as the model compiles them
    place = lambda shape: jax.device_put(  # noqa: E731
        jax.random.normal(jax.random.key(5), shape, jnp.float32).astype(dtype), jax.sharding.NamedSharding(mesh, spec))
    bufs = (place((shards * n, a, c.hidden_size)), place((shards * local, c.hidden_size)))
    jax.block_until_ready(fn(*bufs))
    t0 = time.perf_counter()
    for _ in range(10):
        bufs = fn(*bufs)
    jax.block_until_ready(bufs)
    return (time.perf_counter() - t0) / 10


def warm_up_clocks(seconds: float = 3.0) -> None:
    """Keeps the GPU busy for a few seconds so the first variant is not timed at idle clocks."""
    x = jax.random.normal(jax.random.key(9), (4096, 4096), jnp.bfloat16)
    mm = jax.jit(lambda a: (a @ a) * 1e-3)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        x = jax.block_until_ready(mm(x))


def check_against_xla(params, c: Config, runtime, kv_dtype) -> float:
    """Relative error of prefill + one decode step of the first layer against XLA's own ops on the
    same inputs: the kernels are checked on the GPU before they are timed. One layer, because over
    many layers bf16 rounding flips some top-k routing choices and the logits then legitimately part."""
    xla = dataclasses.replace(runtime, decode_attention="xla", grouped_matmul="xla", prefill_attention="einsum")
    c = c.replace(num_layers=1)
    params = dataclasses.replace(params, layers=params.layers[:1])
    tokens = jax.random.randint(jax.random.key(4), (4, 96), 0, c.vocab_size)
    counts = jnp.array([96, 70, 33, 96], jnp.int32)
    out = []
    for rt in (runtime, xla):
        cache = init_cache(c, 4, 128, kv_dtype, runtime.mesh)
        _, cache = M.prefill(params, cache, tokens, counts, c, runtime=rt, fresh=True)
        # four sequences, then the first alone (a batch-1 step: one token's own kernel paths)
        logits, _ = M.decode_step(params, jax.tree.map(jnp.copy, cache), tokens[:, 0], c, runtime=rt)
        one, _ = M.decode_step(params, cache, tokens[:1, 0], c, runtime=rt)
        out.append(jnp.concatenate([logits, one]))
    err = float(jnp.linalg.norm(out[0] - out[1]) / jnp.linalg.norm(out[1]))
    # bf16 rounding alone gives about 1e-2; with FP8 activations each path rounds its own
    # activations to e4m3 (6% steps), so the two part by about that much.
    bound = 0.12 if runtime.fp8.activations != "never" else 5e-2
    assert err < bound, f"kernels disagree with XLA: relative error {err}"
    return err


VARIANTS = {
    # name: (weights, kv cache dtype, runtime)
    "bf16": ("bf16", jnp.bfloat16, M.Runtime()),
    # The default FP8 policy: weight-only projections under 64 tokens a call (XLA's product from two
    # tokens), expert calls with FP8 activations on the wgmma kernel from 8 rows, everything from 64.
    "fp8": ("fp8", "fp8", M.Runtime()),
    # The decode paths before run S3's kernel study: projections of 2-63 tokens on the grouped
    # matmul's MMA kernel, expert calls weight-only under 64 rows (the peer of "fp8").
    "fp8-pre-s3": ("fp8", "fp8", M.Runtime(grouped_matmul="pallas", fp8=quant.Fp8Policy(min_kernel_rows=64))),
    "fp8-w": ("fp8", jnp.bfloat16, M.Runtime(fp8=quant.Fp8Policy("never"))),
    "fp8-wa": ("fp8", jnp.bfloat16, M.Runtime(fp8=quant.Fp8Policy("always"))),
    "fp8-w-kv8": ("fp8", "fp8", M.Runtime(fp8=quant.Fp8Policy("never"))),
    # As "fp8" with the query, key and value projections as three weights (`params.fuse_qkv` undone).
    "fp8-unfused": ("fp8", "fp8", M.Runtime()),
    # As "fp8" with the MMA kernel for one-token expert products too (no multiply-add kernel).
    "fp8-mma": ("fp8", "fp8", M.Runtime(grouped_matmul="pallas_mma")),
    # As "fp8" with the decode attention written in Triton itself (off the deprecated Pallas Triton
    # backend), launched as XLA's own Triton custom call, and the same through jax-triton.
    "fp8-triton-jit": ("fp8", "fp8", M.Runtime(decode_attention="triton")),
    "fp8-jax-triton": ("fp8", "fp8", M.Runtime(decode_attention="jax_triton")),
}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mixtral-8x7b")
    ap.add_argument("--layers", type=int, default=8, help="layers built (times are also scaled to the full model)")
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--context", type=int, default=1024, help="cached tokens per sequence during decode")
    ap.add_argument("--prefill-tokens", type=int, default=1024, help="0 skips the prefill (and mixed) timing")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--runtime", default="", help="extra Runtime fields, e.g. decode_attention=pallas")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--mixed-batches", default="32",
                    help="decode batches timed riding along the prefill (model.mixed_step), beside the two apart")
    ap.add_argument("--mesh", default="", help="mesh axis sizes, e.g. expert=2 or expert=2,tensor=2")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    if args.prefill_tokens < 0 or args.steps < 1:
        ap.error(f"--prefill-tokens must be >= 0 and --steps >= 1, got {args.prefill_tokens} and {args.steps}")

    full = Config.preset(args.preset)
    c = full.replace(num_layers=args.layers)
    scale = full.num_layers / args.layers
    overrides = dict(kv.split("=") for kv in args.runtime.split(",") if kv)
    mesh = parse_mesh(args.mesh)
    sharding_fn = S.param_sharding_fn(mesh)
    if mesh is not None:
        S.check_experts(mesh, c.num_experts)
        overrides["mesh"] = mesh
    devices = mesh.size if mesh is not None else 1
    read_bw = read_tbs() * 1e12
    copy_bw = copy_bandwidth()
    warm_up_clocks()
    print(f"device {jax.devices()[0].device_kind}, read bandwidth {read_bw / 1e12:.2f} TB/s, "
          f"copy bandwidth {copy_bw / 1e12:.2f} TB/s (read+write)")
    rows = []
    written = {}

    def record(row: dict) -> None:
        """Keeps a row and appends it to the results file at once, so a run cut short keeps what it measured."""
        rows.append(row)
        written["path"] = write_results("decode", [row], args.out_dir)

    weights_cache: dict[str, object] = {}
    for name in args.variants.split(","):
        weights, kv_dtype, runtime = VARIANTS[name]
        runtime = dataclasses.replace(runtime, **overrides)
        fused = not name.endswith("-unfused")
        if (weights, fused) not in weights_cache:
            weights_cache.clear()
            gc.collect()
            params = init_params(c, jax.random.key(0), jnp.bfloat16, fp8=weights == "fp8", sharding_fn=sharding_fn)
            weights_cache[weights, fused] = fuse_qkv(params, c, mesh) if fused else params
            del params
        params = weights_cache[weights, fused]
        check = check_against_xla(params, c, runtime, kv_dtype)
        print(name, f"kernels against XLA: relative error {check:.2e}", flush=True)
        wb, kvb = element_bytes(c, weights, kv_dtype)
        base = dict(preset=args.preset, layers_built=args.layers, layers_model=full.num_layers, variant=name,
                    weights=weights, kv_cache="fp8" if kv_dtype == "fp8" else "bf16",
                    runtime=repr(dataclasses.replace(runtime, mesh=None)), experts_per_token=c.num_experts_per_tok,
                    mesh=dict(mesh.shape) if mesh is not None else None, devices=devices, rel_err_vs_xla=check,
                    read_tbs=read_bw / 1e12, copy_bw_tbs=copy_bw / 1e12)
        for batch in map(int, args.batches.split(",")):
            sec, compile_s, warmup_ms = time_decode(params, c, runtime, batch, args.context, kv_dtype, args.steps)
            device_sec = time_decode_loop(params, c, runtime, batch, args.context, kv_dtype, args.steps)
            nbytes = step_bytes(c, args.layers, batch, args.context, wb, kvb)
            model_bytes = step_bytes(full, full.num_layers, batch, args.context, wb, kvb)  # the LM head once
            comm = time_collectives(mesh, c, batch, args.layers) if mesh is not None else 0.0
            record(dict(base, job="decode", batch=batch, context=args.context,
                             ms=sec * 1e3, model_ms=sec * 1e3 * scale, device_ms=device_sec * 1e3,
                             device_model_ms=device_sec * 1e3 * scale, bytes=nbytes, tbs=nbytes / sec / 1e12,
                             roofline_ms=model_bytes / read_bw / devices * 1e3,
                             of_read_bw=nbytes / sec / read_bw / devices,
                             of_copy_bw=nbytes / sec / copy_bw / devices, compile_s=compile_s,
                             warmup_ms=[round(w, 3) for w in warmup_ms],
                             comm_ms=comm * 1e3, comm_share=comm / sec))
            print(rows[-1]["variant"], "decode B", batch, f"{sec * 1e3:.2f} ms", "(warm-up calls, ms:",
                  " ".join(f"{w:.2f}" for w in warmup_ms) + ")", flush=True)
        if not args.prefill_tokens:
            continue
        sec = time_prefill(params, c, runtime, args.prefill_tokens, kv_dtype)
        flops = prefill_flops(c, args.layers, args.prefill_tokens)
        comm = time_collectives(mesh, c, args.prefill_tokens, args.layers) if mesh is not None else 0.0
        record(dict(base, job="prefill", batch=1, tokens=args.prefill_tokens,
                         ms=sec * 1e3, model_ms=sec * 1e3 * scale, tflops=flops / sec / 1e12,
                         peak_tflops=devices * PEAK_FLOPS["fp8" if name in ("fp8-wa", "fp8") else "bf16"] / 1e12,
                         comm_ms=comm * 1e3, comm_share=comm / sec))
        print(name, "prefill", f"{sec * 1e3:.2f} ms", flush=True)
        decode_ms = {r["batch"]: r["ms"] for r in rows if r["job"] == "decode" and r["variant"] == name}
        for batch in map(int, filter(None, args.mixed_batches.split(","))):
            mixed = time_mixed(params, c, runtime, batch, args.context, args.prefill_tokens, kv_dtype)
            apart = sec * 1e3 + decode_ms.get(batch, float("nan"))
            record(dict(base, job="mixed", batch=batch, tokens=args.prefill_tokens,
                             ms=mixed * 1e3, model_ms=mixed * 1e3 * scale, apart_ms=apart,
                             saved_share=1 - mixed * 1e3 / apart))
            print(name, f"prefill carrying a B={batch} decode step {mixed * 1e3:.2f} ms, apart {apart:.2f} ms",
                  flush=True)
    print_table(rows, ["variant", "devices", "job", "batch", "ms", "model_ms", "device_model_ms", "roofline_ms", "tbs",
                       "of_read_bw", "of_copy_bw", "tflops", "apart_ms", "comm_share"])
    print(f"wrote {written['path']}")
    return rows


if __name__ == "__main__":
    main()
