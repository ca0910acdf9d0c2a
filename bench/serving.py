"""Serving under load: Poisson arrivals of 1024-token prompts that each generate 50 tokens, swept over
request rates, through a `jaxfire` engine; latency statistics per rate and the highest rate that meets
each latency cut-off (1 s and 3 s end to end, 20 ms between tokens).

    PYTHONPATH=. python bench/serving.py --preset mixtral-8x7b --fp8 --kv-cache fp8 --rates 1,2,4,8,16
    PYTHONPATH=. python bench/serving.py --preset mixtral-8x7b --layers 8 --fp8 --slots 32
    PYTHONPATH=. python bench/serving.py --checkpoint ckpt/mixtral-fp8 --experts-per-token 3
    PYTHONPATH=. python bench/serving.py --smoke          # the built-in tiny model on the CPU, a few requests
    PYTHONPATH=. python bench/serving.py --preset mixtral-8x7b --fp8 --kv-cache fp8 --workload chat --rates 1,2,4
    PYTHONPATH=. python bench/serving.py --smoke --workload chat

Metric names follow vLLM's benchmarks/benchmark_serving.py: ttft is the time to first token, tpot the
time per output token after the first, itl the gaps between successive tokens, e2el the end-to-end
latency, each as mean / median / std / pNN in ms; request_throughput is completed requests per second
and output_throughput / total_token_throughput tokens per second over the run. Latencies run from a
request's submission to the moment the host sees each token (in-process: no HTTP, no detokenizing).
With `--http` the same engine serves through `jaxfire.server` on a local port and each request is a
streamed HTTP completion from its own client thread, timed at the client as vLLM's benchmark times a
server: submission to each server-sent event's arrival, the server's work included.

`--preset` builds random weights at the preset's geometry on the device (never zeros; speed does not
depend on their values), so the whole model runs without a checkpoint; `--layers N` builds only N
layers, and then every figure is that of the N-layer model (not scaled). Each row also carries the
same run's zero-load figures (one request alone) as the reference the loaded figures compare with.
Rows go to bench/results/serving.jsonl; two figures (requests/s against generation latency, and
against total latency) go beside it as PNG.

The engine is `jaxfire.PagedEngine` (paged KV cache, token-budget scheduler, prefix caching; flags
`--page-size`, `--kv-pages`, `--no-prefix-caching`, `--max-batched-tokens`), or with `--contiguous`
the engine over a contiguous `[slots, max_len]` cache (`jaxfire.ContiguousEngine`; flags
`--prefills-per-step`, `--prefill-chunk`,
`--no-mix-decode`, `--decode-buckets`). `--compare` runs the sweep once more on the contiguous engine (whole prompts, one per
call) in the same process, its rows beside the paged engine's.

`--workload chat` is a multi-turn chat: conversations arrive at Poisson times (`--rates` counts
conversations per second); each has `--turns` turns (8) over one `--system-len`-token system prompt
(1024) shared by every conversation, each turn a user message of about `--user-len` tokens (200)
answered in `--output-len` tokens (50), and each turn's prompt is the whole conversation so far. A
turn is sent when the previous answer ends. The sweep runs twice in the same process, prefix caching
on and off; each row carries the median time to first token of turns 2 and later, and the summary
their ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import math
import os
import pathlib
import re
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jaxfire  # noqa: E402
from bench.common import RESULTS_DIR, parse_mesh, print_table, write_results  # noqa: E402
from jaxfire import quant  # noqa: E402
from jaxfire import sharding as S  # noqa: E402
from jaxfire.config import Config  # noqa: E402
from jaxfire.engine import ContiguousEngine  # noqa: E402
from jaxfire.model import Runtime  # noqa: E402
from jaxfire.params import fuse_qkv, init_params  # noqa: E402

CUTOFFS = (("e2el", 1000.0), ("e2el", 3000.0), ("itl", 20.0))  # (metric, limit in ms)
PERCENTILES = (90, 99)
SMOKE = dict(prompt_len=32, output_len=8, rates="4,16,inf", num_requests=6, slots=4, max_batched_tokens=64)
SMOKE_CHAT = dict(system_len=32, user_len=8, output_len=4, rates="2,inf", num_requests=3, slots=4,
                  max_batched_tokens=64)


def build_model(args: argparse.Namespace) -> tuple[jaxfire.Model, dict[str, Any]]:
    """The model under test and a description of it for the results."""
    kernels = {k: v for k, v in (("decode_attention", args.decode_attention),
                                 ("grouped_matmul", args.grouped_matmul)) if v is not None}
    mesh = parse_mesh(args.mesh)
    runtime = Runtime(fp8=quant.Fp8Policy(args.fp8_activations), mesh=mesh, **kernels)
    kv = "fp8" if args.kv_cache == "fp8" else None
    if args.preset:
        full = Config.preset(args.preset)
        c = full.replace(num_layers=args.layers or full.num_layers,
                         num_experts_per_tok=args.experts_per_token or full.num_experts_per_tok)
        dtype = jnp.dtype(args.dtype or "bfloat16")
        if mesh is not None:
            S.check_experts(mesh, c.num_experts)
        params = init_params(c, jax.random.key(0), dtype, fp8=args.fp8, sharding_fn=S.param_sharding_fn(mesh))
        params = fuse_qkv(params, c, mesh)
        model = jaxfire.Model(config=c, params=params, tokenizer=None, runtime=runtime, kv_cache_dtype=kv)
        source, layers_model = f"random weights, preset {args.preset}", full.num_layers
    else:
        dtype = "fp8" if args.fp8 else args.dtype
        model = jaxfire.load(args.checkpoint, dtype=dtype, num_experts_per_tok=args.experts_per_token,
                             kv_cache_dtype=kv, runtime=dataclasses.replace(runtime, mesh=None), mesh=mesh)
        source = "built-in model" if args.checkpoint is None else f"checkpoint {args.checkpoint}"
        layers_model = model.config.num_layers
    c = model.config
    desc = dict(model=source, preset=args.preset, layers_built=c.num_layers, layers_model=layers_model,
                weights="fp8" if model.is_fp8 else str(jnp.dtype(model.dtype)),
                kv_cache="fp8" if kv else str(jnp.dtype(model.dtype)), experts_per_token=c.num_experts_per_tok,
                runtime=repr(dataclasses.replace(runtime, mesh=None)), mesh=dict(mesh.shape) if mesh else None,
                devices=mesh.size if mesh else 1)
    return model, desc


def load_prompts(args: argparse.Namespace, model: jaxfire.Model, n: int, rng: np.random.Generator) -> list[list[int]]:
    """n prompts of --prompt-len tokens: random ids, or cycled from --prompts-file (cut to the length).

    The file is JSON lines of token-id lists, or plain text with one prompt per line (needs a tokenizer).
    """
    vocab = model.config.vocab_size
    if not args.prompts_file:
        return rng.integers(0, vocab, (n, args.prompt_len)).tolist()
    path = pathlib.Path(args.prompts_file)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        prompts = [json.loads(line) for line in lines]
    else:
        if model.tokenizer is None:
            raise SystemExit(f"{path} holds text, but the model has no tokenizer: give token ids as JSON lines")
        prompts = [model.tokenizer.encode(line) for line in lines]
    prompts = [p[:args.prompt_len] for p in prompts if p]
    if not prompts:
        raise SystemExit(f"{path} holds no prompts")
    return [prompts[i % len(prompts)] for i in range(n)]


def percentile_stats(name: str, values_s: list[float], percentiles=PERCENTILES) -> dict[str, float]:
    """vLLM's mean_/median_/std_/pNN_<name>_ms from values in seconds."""
    v = np.asarray(values_s or [0.0], np.float64) * 1e3
    out = {f"mean_{name}_ms": float(v.mean()), f"median_{name}_ms": float(np.median(v)),
           f"std_{name}_ms": float(v.std())}
    out.update({f"p{p}_{name}_ms": float(np.percentile(v, p)) for p in percentiles})
    return out


def serving_metrics(requests: list[jaxfire.Request], duration: float) -> dict[str, Any]:
    """vLLM's serving metrics over finished requests (as benchmarks/benchmark_serving.py computes them)."""
    done = [r for r in requests if r.finish_reason in ("eos", "stop", "length")]
    outputs = [len(r.metrics.token_times) for r in done]
    ttfts = [r.metrics.ttft for r in done]
    e2els = [r.metrics.e2e for r in done]
    tpots = [(r.metrics.e2e - r.metrics.ttft) / (n - 1) for r, n in zip(done, outputs) if n > 1]
    itls = [gap for r in done for gap in r.metrics.itl]
    total_input = sum(len(r.prompt) for r in done)
    row = dict(completed=len(done), failed=len(requests) - len(done), duration=duration,
               total_input_tokens=total_input, total_output_tokens=sum(outputs),
               request_throughput=len(done) / duration, output_throughput=sum(outputs) / duration,
               total_token_throughput=(total_input + sum(outputs)) / duration)
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        row.update(percentile_stats(name, values))
    queued = [r.metrics.queue_time for r in done if r.metrics.queue_time is not None]  # not seen over HTTP
    row["mean_queue_ms"] = float(np.mean(queued)) * 1e3 if queued else None
    return row


def at_arrivals(prompts: list[list[int]], rate: float, rng: np.random.Generator, launch) -> tuple[list, float]:
    """Calls launch(prompt) for each prompt at Poisson arrival times (exponential gaps of mean 1/rate,
    all at once for inf); returns what the calls returned and the start time."""
    n = len(prompts)
    gaps = np.zeros(n) if math.isinf(rate) else rng.exponential(1.0 / rate, n)
    offsets = np.cumsum(gaps) - gaps[0]
    launched = []
    start = time.perf_counter()
    for prompt, offset in zip(prompts, offsets):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        launched.append(launch(prompt))
    return launched, start


def run_rate(engine: jaxfire.Engine, prompts: list[list[int]], rate: float, output_len: int,
             rng: np.random.Generator, bar) -> tuple[list[jaxfire.Request], float]:
    """Submits the prompts at Poisson arrivals (`at_arrivals`); waits for all."""

    def tick(event: jaxfire.TokenEvent) -> None:
        if event.finished:
            bar.update(1)

    requests, start = at_arrivals(prompts, rate, rng, lambda prompt: engine.submit(
        prompt, max_tokens=output_len, ignore_eos=True, on_token=tick))
    for r in requests:
        r.result()
    return requests, max(r.metrics.finished for r in requests) - start


@dataclasses.dataclass
class HttpRequest:
    """A streamed HTTP completion as `serving_metrics` reads a request, timed at the client."""

    prompt: list[int]
    metrics: jaxfire.RequestMetrics
    finish_reason: str | None = None


def http_completion(port: int, prompt: list[int], output_len: int) -> HttpRequest:
    """One greedy streamed completion of exactly output_len tokens; each event's arrival is a token time."""
    req = HttpRequest(prompt, jaxfire.RequestMetrics(arrival=time.perf_counter(), prompt_tokens=len(prompt)))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/completions", json.dumps(dict(prompt=prompt, max_tokens=output_len, temperature=0,
                                                                ignore_eos=True, stream=True)),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            req.finish_reason = f"http {resp.status}"
            return req
        for line in resp:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            req.metrics.token_times.append(time.perf_counter())
            choice = json.loads(line[len(b"data: "):])["choices"][0]
            if choice["finish_reason"] is not None:
                req.finish_reason = choice["finish_reason"]
    finally:
        conn.close()
    req.metrics.finished = req.metrics.token_times[-1] if req.metrics.token_times else time.perf_counter()
    return req


def run_rate_http(port: int, prompts: list[list[int]], rate: float, output_len: int,
                  rng: np.random.Generator, bar) -> tuple[list[HttpRequest], float]:
    """`run_rate` through the HTTP server: each request a client thread started at its arrival time."""

    def launch(prompt: list[int]) -> tuple[threading.Thread, dict]:
        out: dict[str, HttpRequest] = {}

        def client() -> None:
            out["request"] = http_completion(port, prompt, output_len)
            bar.update(1)

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        return thread, out

    launched, start = at_arrivals(prompts, rate, rng, launch)
    for thread, _ in launched:
        thread.join()
    results = [out["request"] for _, out in launched]
    return results, max(r.metrics.finished for r in results) - start


def chat_conversations(n: int, args: argparse.Namespace, vocab: int, rng: np.random.Generator) -> list[list[list[int]]]:
    """n conversations of --turns user messages (about --user-len random ids each, within 25%), after
    one --system-len system prompt, as [system + message 1, message 2, ...]."""
    system = rng.integers(0, vocab, args.system_len).tolist()
    out = []
    for _ in range(n):
        lo, hi = max(1, args.user_len * 3 // 4), args.user_len * 5 // 4 + 1
        turns = [rng.integers(0, vocab, int(rng.integers(lo, hi))).tolist() for _ in range(args.turns)]
        out.append([system + turns[0]] + turns[1:])
    return out


@dataclasses.dataclass
class Turn:
    """One turn's request, with its conversation's place."""

    turn: int  # from 1
    request: Any  # a jaxfire.Request or an HttpRequest


def run_chat(conversations: list[list[list[int]]], rate: float, output_len: int, rng: np.random.Generator,
             complete) -> tuple[list[Turn], float]:
    """Each conversation on its own thread from its Poisson arrival: turn k's prompt is every message and
    answer before it plus message k; `complete(prompt)` returns the finished request."""

    def launch(messages: list[list[int]]) -> tuple[threading.Thread, list[Turn]]:
        turns: list[Turn] = []

        def client() -> None:
            history: list[int] = []
            for k, message in enumerate(messages, 1):
                history = history + message
                req = complete(history)
                turns.append(Turn(k, req))
                if req.finish_reason not in ("eos", "stop", "length"):
                    return
                history = history + list(getattr(req, "tokens", None) or [0] * output_len)

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        return thread, turns

    launched, start = at_arrivals(conversations, rate, rng, launch)
    for thread, _ in launched:
        thread.join()
    turns = [t for _, ts in launched for t in ts]
    return turns, max(t.request.metrics.finished for t in turns) - start


def max_rates(rows: list[dict[str, Any]], stat: str) -> dict[str, Any]:
    """The highest offered rate whose `stat` of each cut-off metric stays within its limit."""
    out = {"cutoff_stat": stat}
    for metric, limit in CUTOFFS:
        ok = [r for r in rows if r[f"{stat}_{metric}_ms"] <= limit]
        best = max(ok, key=lambda r: r["offered_rate"], default=None)
        key = f"max_rate_{metric}_{limit:g}ms"
        out[key] = None if best is None else best["request_rate"]
        out[key.replace("max_rate", "request_throughput_at")] = None if best is None else best["request_throughput"]
    return out


def plot(rows: list[dict[str, Any]], out_dir: pathlib.Path, tag: str, title: str) -> list[pathlib.Path]:
    """Requests/s against generation latency (ITL) and against total latency (end to end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["request_throughput"] for r in rows]
    paths = []
    for metric, label, name in (("itl", "generation latency: time between tokens (ms)", "generation_latency"),
                                ("e2el", "total latency: end to end (ms)", "total_latency")):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for stat, style in (("mean", "o-"), ("median", "s--"), ("p90", "^-."), ("p99", "v:")):
            ax.plot(x, [r[f"{stat}_{metric}_ms"] for r in rows], style, label=stat)
        for m, limit in CUTOFFS:
            if m == metric:
                ax.axhline(limit, color="grey", lw=0.8)
                ax.annotate(f"{limit:g} ms", (ax.get_xlim()[0], limit), va="bottom", color="grey", fontsize=8)
        for r, xi in zip(rows, x):
            ax.annotate(f"{r['request_rate']}/s offered", (xi, r[f"p99_{metric}_ms"]), fontsize=6, color="grey",
                        textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("requests/s (achieved)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        path = out_dir / f"serving_{tag}_{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _device_tag(dev) -> str:
    """h100, h200, ... from the device kind (figures from different cards must not share a file name)."""
    found = re.search(r"\b([A-Z]\d{2,3})\b", getattr(dev, "device_kind", ""))
    return found.group(1).lower() if found else dev.platform


def parse_rates(text: str) -> list[float]:
    rates = [float(r) for r in text.split(",") if r]
    if not rates or any(r <= 0 for r in rates):
        raise SystemExit(f"--rates must be positive numbers (or inf), got {text!r}")
    return sorted(rates)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", help="random weights at this preset's geometry (e.g. mixtral-8x7b)")
    src.add_argument("--checkpoint", help="a converted checkpoint (default without --preset: the built-in model)")
    src.add_argument("--smoke", action="store_true", help="CPU check: the built-in model, a few short requests")
    ap.add_argument("--layers", type=int, help="with --preset: build only this many layers")
    ap.add_argument("--fp8", action="store_true", help="FP8 weights (quantized as drawn or as loaded)")
    ap.add_argument("--dtype", help="compute dtype: bfloat16 (default for --preset) or float32")
    ap.add_argument("--kv-cache", choices=("auto", "fp8"), default="auto", help="auto: the compute dtype")
    ap.add_argument("--experts-per-token", type=int)
    ap.add_argument("--mesh", help="mesh axis sizes over the devices, e.g. expert=2 (default: one device)")
    ap.add_argument("--decode-attention", help="Runtime.decode_attention (default: Runtime's)")
    ap.add_argument("--grouped-matmul", help="Runtime.grouped_matmul (default: Runtime's)")
    ap.add_argument("--fp8-activations", default="auto", choices=("auto", "never", "always"))
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=50)
    ap.add_argument("--prompts-file", help="JSON lines of token ids, or text lines; cut to --prompt-len")
    ap.add_argument("--rates", default="1,2,4,8,10,16",
                    help="offered requests/s, comma separated; inf sends all (1 and 10: vLLM's published points)")
    ap.add_argument("--num-requests", type=int, default=64, help="requests per rate")
    ap.add_argument("--workload", choices=("seed", "chat"), default="seed",
                    help="seed: --prompt-len prompts, --output-len answers; chat: multi-turn conversations")
    ap.add_argument("--turns", type=int, default=8, help="chat: turns per conversation")
    ap.add_argument("--system-len", type=int, default=1024, help="chat: the shared system prompt's tokens")
    ap.add_argument("--user-len", type=int, default=200, help="chat: tokens of a user message (within 25%%)")
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--compile-workers", type=int, default=1,
                    help="paged engine: threads compiling the steps side by side at warm-up")
    ap.add_argument("--max-len", type=int, help="cache positions per request (default: the longest request)")
    ap.add_argument("--page-size", type=int, default=16, help="KV cache positions per page")
    ap.add_argument("--kv-pages", type=int, help="KV cache pages (default: as many as fit the free memory)")
    ap.add_argument("--no-prefix-caching", action="store_true", help="reuse no cached prompt pages")
    ap.add_argument("--max-batched-tokens", type=int, help="token rows per engine step (default: the engine's)")
    ap.add_argument("--max-idle-batched-tokens", type=int,
                    help="token rows of a step without decode tokens (default: --max-batched-tokens)")
    ap.add_argument("--contiguous", action="store_true",
                    help="the engine over a contiguous [slots, max_len] cache (the flags below are its own)")
    ap.add_argument("--compare", action="store_true",
                    help="also run the sweep on the contiguous engine, whole prompts one per call")
    ap.add_argument("--prefills-per-step", type=int, help="prefill calls between decode steps (default: all)")
    ap.add_argument("--prefill-chunk", type=int, help="prefill long prompts this many tokens per step")
    ap.add_argument("--no-mix-decode", action="store_true",
                    help="run decode steps apart from prefills (default: a step's decode rides along its prefill)")
    ap.add_argument("--decode-buckets", help="slot counts decode steps are compiled for, comma separated "
                    "(default: powers of two up to --slots; 'slots' steps every slot every time)")
    ap.add_argument("--cutoff-stat", default="p90", choices=("mean", "median", "p90", "p99"),
                    help="the statistic each latency cut-off applies to")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=None, help="default bench/results")
    ap.add_argument("--tag", help="names the figures (default: from the configuration)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--http", action="store_true",
                    help="serve through jaxfire.server on a local port and time streamed HTTP completions")
    args = ap.parse_args(argv)
    if args.smoke:
        for k, v in (SMOKE_CHAT if args.workload == "chat" else SMOKE).items():
            if getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
    if args.workload == "chat" and (args.http or args.contiguous or args.compare):
        raise SystemExit("--workload chat runs in-process on the paged engine (prefix caching on and off)")
    rates = parse_rates(args.rates)

    model, desc = build_model(args)
    rng = np.random.default_rng(args.seed)
    if args.workload == "chat":
        work = chat_conversations(args.num_requests * len(rates) + 1, args, model.config.vocab_size, rng)
        longest = args.system_len + args.turns * (args.user_len * 5 // 4 + args.output_len)
        variants = [dict(prefix_caching=True), dict(prefix_caching=False)]
    else:
        work = load_prompts(args, model, args.num_requests * len(rates) + 1, rng)
        longest = max(map(len, work)) + args.output_len
        variants = [dict(contiguous=args.contiguous)] + ([dict(contiguous=True, compared=True)] if args.compare else [])
    max_len = args.max_len or longest
    out_dir = pathlib.Path(args.out_dir) if args.out_dir else RESULTS_DIR
    results = []
    for variant in variants:
        rows = sweep(args, model, desc, work, rates, max_len, rng, **variant)
        results += rows
        if args.workload != "chat":  # each engine's summary lands before the next one compiles
            path = _write_rows(rows[-1:], out_dir)
    if args.workload == "chat":
        on, off = (r for r in results if r["job"] == "summary")
        ratio = (off["median_ttft_later_turns_ms"] or 0) / max(on["median_ttft_later_turns_ms"] or 0, 1e-9)
        print(f"median TTFT of turns 2-{args.turns}: {on['median_ttft_later_turns_ms']:.1f} ms with prefix caching, "
              f"{off['median_ttft_later_turns_ms']:.1f} ms without ({ratio:.1f}x)")
        on["ttft_later_turns_speedup"] = ratio
        path = _write_rows([r for r in results if r["job"] == "summary"], out_dir)
    print(f"wrote {path}")
    return results


def _write_rows(rows: list[dict[str, Any]], out_dir: pathlib.Path) -> pathlib.Path:
    return write_results("serving", [{k: v for k, v in r.items() if k != "offered_rate"} for r in rows], out_dir)


def make_engine(args: argparse.Namespace, model: jaxfire.Model, max_len: int, contiguous: bool,
                prefix_caching: bool):
    """The engine the flags describe (`--contiguous` or the paged one)."""
    try:
        if contiguous:
            buckets = None if args.decode_buckets is None else (
                (args.slots,) if args.decode_buckets == "slots"
                else tuple(int(n) for n in args.decode_buckets.split(",")))
            return ContiguousEngine(model, slots=args.slots, max_len=max_len,
                                    prefills_per_step=args.prefills_per_step, prefill_chunk=args.prefill_chunk,
                                    detokenize=False, decode_buckets=buckets, mix_decode=not args.no_mix_decode)
        return jaxfire.PagedEngine(model, slots=args.slots, max_len=max_len, page_size=args.page_size,
                                   kv_pages=args.kv_pages, prefix_caching=prefix_caching,
                                   max_batched_tokens=args.max_batched_tokens,
                                   max_idle_batched_tokens=args.max_idle_batched_tokens, detokenize=False)
    except ValueError as e:  # a JaxfireError, or --decode-buckets that are not integers
        raise SystemExit(f"engine options: {e}") from None


def engine_desc(engine) -> dict[str, Any]:
    if isinstance(engine, ContiguousEngine):
        return dict(engine="contiguous", prefills_per_step=engine.prefills_per_step,
                    prefill_chunk=engine.prefill_chunk, decode_buckets=list(engine.decode_buckets),
                    mix_decode=engine.mix_decode)
    return dict(engine="paged", page_size=engine.page_size, kv_pages=engine.kv_pages,
                prefix_caching=engine.prefix_caching, max_batched_tokens=engine.max_batched_tokens,
                max_idle_batched_tokens=engine.max_idle_batched_tokens)


def step_figures(engine, before: dict[str, int]) -> dict[str, Any]:
    """What the engine's steps did over one rate: the mean running batch and the steps' rows."""
    c = {k: v - before.get(k, 0) for k, v in engine.counters.items()}
    if isinstance(engine, ContiguousEngine):
        steps = max(c.get("decode_steps", 0), 1)
        return dict(mean_running_batch=c.get("slot_steps", 0) / steps, mean_decode_rows=c.get("decode_rows", 0) / steps,
                    decode_steps=c.get("decode_steps", 0), mixed_steps=c.get("mixed_steps", 0))
    steps = max(c.get("steps", 0), 1)
    return dict(mean_running_batch=c.get("decode_tokens", 0) / steps,
                mean_step_tokens=(c.get("decode_tokens", 0) + c.get("prefill_tokens", 0)) / steps,
                mean_padding_tokens=c.get("padding_tokens", 0) / steps, steps=c.get("steps", 0))


class PeakLoad(threading.Thread):
    """The most requests running at once and the most KV pages held, polled from `engine.stats()`
    while one rate runs (a context manager)."""

    def __init__(self, engine, every_s: float = 0.01):
        super().__init__(daemon=True)
        self.engine, self.every_s = engine, every_s
        self.running = self.pages = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every_s):
            s = self.engine.stats()
            self.running = max(self.running, s.running)
            self.pages = max(self.pages, s.kv_pages_used or 0)

    def __enter__(self) -> "PeakLoad":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self.join()

    def figures(self) -> dict[str, int]:
        return dict(peak_running=self.running, peak_kv_pages_used=self.pages)


def sweep(args: argparse.Namespace, model: jaxfire.Model, desc: dict[str, Any], work: list, rates: list[float],
          max_len: int, rng: np.random.Generator, contiguous: bool = False, prefix_caching: bool = True,
          compared: bool = False) -> list[dict[str, Any]]:
    """Every rate on one engine; returns the rows and the summary. Each rate's row is written as soon as it
    is measured (a run cut short keeps them); the caller writes the summary."""
    chat = args.workload == "chat"
    out_dir = pathlib.Path(args.out_dir) if args.out_dir else RESULTS_DIR
    prefix_caching = prefix_caching and not args.no_prefix_caching
    engine = make_engine(args, model, max_len, contiguous, prefix_caching)
    t0 = time.perf_counter()
    if contiguous:
        engine.warmup(sorted({len(p) for p in work}))
    else:
        engine.warmup(compile_workers=args.compile_workers)
    warmup_s = time.perf_counter() - t0
    dev = jax.devices()[0]
    print(f"{desc['model']}: {desc['layers_built']} layers, weights {desc['weights']}, KV cache {desc['kv_cache']}, "
          f"{args.slots} slots of {max_len}, {engine_desc(engine)}; compiled in {warmup_s:.1f} s on "
          f"{getattr(dev, 'device_kind', dev)}", flush=True)

    compiles = []
    listener = lambda event, *_, **__: compiles.append(event) if "backend_compile" in event else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    engine.start()
    server = None
    if args.http:
        from jaxfire.server import CompletionServer

        server = CompletionServer(engine, port=0)  # a free port
        server.serve_in_thread()
        port = server.server_address[1]
    try:
        # Zero load: one request alone, the reference the loaded figures compare with.
        first = work[-1][0] if chat else work[-1]
        if server is None:
            alone = engine.submit(first, max_tokens=args.output_len, ignore_eos=True)
            alone.result()
        else:
            alone = http_completion(port, first, args.output_len)
        idle = dict(idle_ttft_ms=alone.metrics.ttft * 1e3, idle_e2el_ms=alone.metrics.e2e * 1e3,
                    idle_median_itl_ms=float(np.median(alone.metrics.itl or [0.0])) * 1e3)

        from tqdm.auto import tqdm

        rows = []
        base = dict(desc, **engine_desc(engine), workload=args.workload, slots=args.slots, max_len=max_len,
                    prompt_len=args.prompt_len, output_len=args.output_len, num_prompts=args.num_requests,
                    burstiness=1.0, seed=args.seed, warmup_s=warmup_s,
                    compile_workers=None if contiguous else args.compile_workers,
                    transport="http" if server is not None else "in-process", **idle)
        if chat:
            base.update(turns=args.turns, system_len=args.system_len, user_len=args.user_len,
                        num_conversations=args.num_requests)
        total = args.num_requests * len(rates) * (args.turns if chat else 1)
        with tqdm(total=total, desc="sweep", unit="req") as bar:
            for i, rate in enumerate(rates):
                bar.set_description(f"{rate:g} {'conversations' if chat else 'req'}/s")
                before = dict(engine.counters)
                chunk = work[i * args.num_requests:(i + 1) * args.num_requests]
                extra = {}
                with PeakLoad(engine) as peak:
                    if chat:
                        def complete(prompt):
                            req = engine.submit(prompt, max_tokens=args.output_len, ignore_eos=True)
                            req.result()
                            bar.update(1)
                            return req

                        turns, duration = run_chat(chunk, rate, args.output_len, rng, complete)
                        requests = [t.request for t in turns]
                        later = [t.request.metrics.ttft for t in turns if t.turn > 1 and t.request.metrics.token_times]
                        extra = dict(median_ttft_later_turns_ms=float(np.median(later)) * 1e3 if later else None)
                    elif server is None:
                        requests, duration = run_rate(engine, chunk, rate, args.output_len, rng, bar)
                    else:
                        requests, duration = run_rate_http(port, chunk, rate, args.output_len, rng, bar)
                rows.append(dict(base, job="rate", request_rate=rate if math.isfinite(rate) else "inf",
                                 offered_rate=rate, **serving_metrics(requests, duration), **extra,
                                 **step_figures(engine, before), **peak.figures()))
                _write_rows(rows[-1:], out_dir)
        stats = engine.stats()
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        engine.close()
        jax.monitoring.unregister_event_duration_listener(listener)

    summary = dict(base, job="summary", rates=[r["request_rate"] for r in rows], compiles_during_sweep=len(compiles),
                   prefix_cache_queries=stats.prefix_cache_queries, prefix_cache_hits=stats.prefix_cache_hits,
                   preemptions=stats.preemptions, **max_rates(rows, args.cutoff_stat))
    if chat:
        later = [r["median_ttft_later_turns_ms"] for r in rows if r["median_ttft_later_turns_ms"] is not None]
        summary["median_ttft_later_turns_ms"] = float(np.median(later)) if later else None
    print_table(rows, ["request_rate", "request_throughput", "output_throughput", "mean_running_batch", "peak_running",
                       "median_ttft_ms", "p90_ttft_ms", "median_itl_ms", "p90_itl_ms", "p99_itl_ms",
                       "median_e2el_ms", "p90_e2el_ms", "p99_e2el_ms"]
                + (["median_ttft_later_turns_ms"] if chat else []))
    print(f"zero load: ttft {idle['idle_ttft_ms']:.1f} ms, itl {idle['idle_median_itl_ms']:.2f} ms, "
          f"e2el {idle['idle_e2el_ms']:.1f} ms; compilations during the sweep: {len(compiles)}")
    for metric, limit in CUTOFFS:
        best = summary[f"max_rate_{metric}_{limit:g}ms"]
        print(f"highest rate with {args.cutoff_stat} {metric} <= {limit:g} ms: "
              f"{'none of the rates' if best is None else f'{best} req/s'}")
    # the variants of one run name their figures apart
    variant = ("-chat" if chat else "") + ("-noprefix" if not (contiguous or prefix_caching) else "") + (
        "-contiguous" if compared else "")
    if not args.no_plots:
        tag = (args.tag or ("smoke" + ("-http" if args.http else "") if args.smoke else "-".join(
            [args.preset or pathlib.Path(args.checkpoint or "builtin").name, f"L{desc['layers_built']}",
             _device_tag(dev) + f"x{desc['devices']}"
             + "".join(f"-{k[0]}{v}" for k, v in (desc["mesh"] or {}).items() if v > 1),
             desc["weights"], f"kv{desc['kv_cache']}", f"k{desc['experts_per_token']}", f"s{args.slots}"]
            + ([f"c{args.prefill_chunk}"] if args.prefill_chunk else [])
            + (["nomix"] if args.no_mix_decode else []) + (["http"] if args.http else [])))) + variant
        title = (f"{desc['model']}, {desc['layers_built']} layers, {desc['devices']} device(s),\n"
                 f"{desc['weights']} weights, KV {desc['kv_cache']}, "
                 f"{args.slots} slots{f', chunks of {args.prefill_chunk}' if args.prefill_chunk else ''}; "
                 + (f"chat, {args.turns} turns over a {args.system_len}-token system prompt, {args.user_len} -> "
                    f"{args.output_len} tokens a turn" if chat else f"{args.prompt_len} -> {args.output_len} tokens")
                 + f", {engine_desc(engine)['engine']} engine" + ("" if contiguous or prefix_caching
                                                                    else ", no prefix caching"))
        for p in plot(rows, out_dir, tag, title):
            print(f"wrote {p}")
    return rows + [summary]


if __name__ == "__main__":
    main()
