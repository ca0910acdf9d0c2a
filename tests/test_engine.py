"""The continuous-batching engines: requests at random times, slot reuse, rejections, cancellation,
per-request sampling, no recompilation after warm-up, and the serving benchmark's smoke mode.

What every engine shares runs on `jaxfire.PagedEngine`; the tests of the contiguous engine's own
options (decode slot buckets, prefills carrying decode steps, chunks into a batch-1 cache) run
`ContiguousEngine`. `jaxfire.Engine` is the paged engine (which the API, server and CLI tests run)."""

import json
import random
import threading
import time

import jax
import numpy as np
import pytest

import jaxfire
from jaxfire import sampling
from jaxfire.engine import ContiguousEngine, EngineError, RequestError

# Requests here keep prompt + new tokens in (16, 32] and prompts within 16 tokens, so that
# `jaxfire.generate` on one of them always runs the same shapes (one slot of 32 positions, the 16-token
# prefill bucket) and engines share them too: the file compiles few programs.
MAX_LEN = 32


@pytest.fixture(scope="module")
def model():
    # float32: greedy tokens must not hinge on bf16 rounding differing between batch shapes.
    return jaxfire.load(dtype="float32")


def alone(model, prompt, n, **sampling):
    """What `jaxfire.generate` gives for this prompt by itself."""
    return jaxfire.generate(model, [prompt], max_new_tokens=n, **sampling).tokens[0]


def random_prompt(rng, model, lo, hi):
    # Ids from 3 on: no prompt contains BOS/EOS.
    return rng.integers(3, model.config.vocab_size, int(rng.integers(lo, hi + 1))).tolist()


def random_job(rng, model):
    prompt = random_prompt(rng, model, 2, 16)
    return prompt, int(rng.integers(17 - len(prompt), MAX_LEN - len(prompt) + 1))


def drive(engine, requests):
    """Steps a synchronous engine until the given requests finish."""
    while not all(r.finished for r in requests):
        engine.step()


def test_requests_at_random_times_match_generate_alone(model):
    rng = np.random.default_rng(0)
    jobs = [random_job(rng, model) for _ in range(9)]
    expected = [alone(model, p, n) for p, n in jobs]
    results = [None] * len(jobs)
    streamed = [[] for _ in jobs]

    with jaxfire.PagedEngine(model, slots=3, max_len=MAX_LEN) as engine:
        def client(indices, seed):
            wait = random.Random(seed)
            for i in indices:
                time.sleep(wait.uniform(0, 0.05))
                prompt, n = jobs[i]
                if i % 3 == 0:  # some clients read the stream, others a callback
                    request = engine.submit(prompt, max_tokens=n)
                    streamed[i] = list(request)
                else:
                    request = engine.submit(prompt, max_tokens=n, on_token=streamed[i].append)
                    request.result(timeout=120)
                results[i] = request

        threads = [threading.Thread(target=client, args=(range(k, len(jobs), 3), k)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert engine.counters["prefills"] == len(jobs) > engine.slots
        assert engine.token_buckets == (1, 2, 4, 8, 16, 32, 64, 128, 256)  # powers of two up to the budget (256)
        assert engine.counters["mixed_steps"] > 0  # decode tokens rode along newcomers' prefills
        assert engine.free_slots == engine.slots and engine.stats().kv_pages_used == 0

    for request, want, events, (prompt, n) in zip(results, expected, streamed, jobs):
        assert request.tokens == want
        assert request.finish_reason == ("length" if len(want) == n else "eos")
        assert [e.token for e in events if e.finish_reason != "eos"] == want
        assert [e.finished for e in events] == [False] * (len(events) - 1) + [True]
        assert all(e.index == request.id for e in events)
        m = request.metrics
        assert len(m.token_times) == len(events) and len(m.itl) == len(events) - 1
        assert 0 < m.ttft <= m.e2e and m.queue_time >= 0
    # With three slots and nine requests, some request started in a slot another one left.
    starts = sorted(r.metrics.scheduled for r in results)
    assert min(r.metrics.finished for r in results) < starts[-1]


def test_rejections_leave_the_other_requests_running(model):
    engine = jaxfire.PagedEngine(model, slots=3, max_len=MAX_LEN)
    prompt = [5, 6, 7, 8]
    good = engine.submit(prompt, max_tokens=20)
    engine.step()
    bad = [
        (dict(prompt=[]), "prompt is empty"),
        (dict(prompt=[4, model.config.vocab_size]), f"token id {model.config.vocab_size} outside the vocabulary"),
        (dict(prompt=[4, -1]), "token id -1 outside"),
        (dict(prompt=[1.5, 2]), "integer token ids"),
        (dict(prompt=list(range(3, 30))), "exceeds the engine's 32 cache positions"),
        (dict(max_tokens=0), "max_tokens must be an integer of at least 1"),
        (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), "top_p"),
        (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*32\)"),
        (dict(seed=2**32), "seed"),
        (dict(top_k=-1), r"top_k must be an integer >= 0"),
        (dict(top_k=True), "top_k"),
        (dict(stop_token_ids=[3, model.config.vocab_size]), f"stop_token_ids has {model.config.vocab_size}"),
        (dict(stop_token_ids=7), "stop_token_ids must be a sequence of token ids"),
        (dict(logit_bias={model.config.vocab_size: 1.0}),
         rf"logit_bias has {model.config.vocab_size}, not a token id in \[0, {model.config.vocab_size}\)"),
        (dict(logit_bias={-1: 1.0}), "logit_bias has -1, not a token id"),
        (dict(logit_bias={"5": 1.0}), "logit_bias has '5', not a token id"),
        (dict(logit_bias={5: 100.5}), r"logit_bias of token 5 is 100.5, not a number in \[-100, 100\]"),
        (dict(logit_bias={5: float("nan")}), "logit_bias of token 5 is nan"),
        (dict(logit_bias={5: True}), "logit_bias of token 5 is True"),
        (dict(logit_bias=[5]), "logit_bias must be a mapping of token ids to numbers"),
        (dict(logit_bias=dict.fromkeys(range(301), 1.0)), "logit_bias has 301 token ids, more than the limit of 300"),
    ]
    for change, message in bad:
        kwargs = dict(prompt=prompt, max_tokens=20) | change
        with pytest.raises(jaxfire.JaxfireError, match=message):
            engine.submit(kwargs.pop("prompt"), **kwargs)
    assert good.result() == alone(model, prompt, 20)

    positions = model.config.max_position_embeddings
    roomy = jaxfire.PagedEngine(model, slots=1, max_len=positions + 64)
    with pytest.raises(RequestError, match=f"exceeds the model's {positions} positions"):
        roomy.submit([5] * (positions - 10), max_tokens=20)
    text_only = jaxfire.PagedEngine(jaxfire.Model(config=model.config, params=model.params, tokenizer=None), slots=1)
    with pytest.raises(RequestError, match="no tokenizer"):
        text_only.submit("hello", max_tokens=2)
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        engine.submit(prompt, max_tokens=2)


def test_cancelling_frees_the_slot(model):
    engine = jaxfire.PagedEngine(model, slots=1, max_len=32)
    long = engine.submit([9, 10, 11], max_tokens=20, ignore_eos=True)
    short = engine.submit([12, 13, 14, 15], max_tokens=14)
    never = engine.submit([16, 17], max_tokens=15)
    while len(long.tokens) < 3:
        engine.step()
    assert short.metrics.scheduled is None and engine.free_slots == 0
    long.cancel()
    never.cancel()
    engine.step()
    assert long.finish_reason == "cancelled" and never.finish_reason == "cancelled"
    assert short.metrics.scheduled is not None  # it took the slot the cancelled request left
    got = list(long.tokens)
    drive(engine, [short])
    assert long.tokens == got and 3 <= len(got) < 20  # nothing arrives after the cancel
    assert [e.token for e in long] == got  # its stream ends
    assert never.metrics.scheduled is None and never.tokens == [] and list(never) == []
    assert short.tokens == alone(model, [12, 13, 14, 15], 14)
    assert engine.free_slots == 1 and not engine.busy
    engine.close()


def test_stats_count_every_request_and_token(model):
    engine = jaxfire.PagedEngine(model, slots=1, max_len=32)
    long = engine.submit([9, 10, 11], max_tokens=20, ignore_eos=True)
    short = engine.submit([12, 13, 14, 15], max_tokens=14)
    never = engine.submit([16, 17], max_tokens=15)
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.slots, stats.generated_tokens) == (0, 3, 1, 0)
    while len(long.tokens) < 3:
        engine.step()
    assert (engine.stats().running, engine.stats().waiting) == (1, 2)
    long.cancel()
    never.cancel()
    drive(engine, [short])
    stats = engine.stats()
    served = [long.metrics, short.metrics]
    assert (stats.running, stats.waiting) == (0, 0)
    assert stats.finished == {"cancelled": 2, short.finish_reason: 1}
    assert stats.prompt_tokens == 3 + 4  # the request cancelled while waiting was never admitted
    assert stats.generated_tokens == sum(len(m.token_times) for m in served)
    assert stats.time_to_first_token.count == stats.e2e_latency.count == stats.queue_time.count == 2
    assert stats.inter_token_latency.count == sum(len(m.itl) for m in served)
    assert stats.inter_token_latency.sum == pytest.approx(sum(sum(m.itl) for m in served))
    assert stats.time_to_first_token.sum == pytest.approx(sum(m.ttft for m in served))
    assert stats.steps["steps"] == engine.counters["steps"] > 0
    stats.finished["eos"] = 99  # a snapshot: the engine's totals are its own
    stats.inter_token_latency.observe(1.0)
    assert "eos" not in engine.stats().finished
    assert engine.stats().inter_token_latency.count == sum(len(m.itl) for m in served)
    engine.close()


def test_decode_steps_run_the_smallest_slot_bucket_holding_every_request(model):
    engine = ContiguousEngine(model, slots=3, max_len=MAX_LEN, mix_decode=False)  # only decode steps step slots
    lone = engine.submit([5, 6, 7], max_tokens=6, ignore_eos=True)
    drive(engine, [lone])
    assert engine.counters["decode_rows"] == engine.counters["decode_steps"] == 5  # slot 0 alone: 1 row
    engine.counters.clear()
    pair = [engine.submit([8, 9], max_tokens=17, ignore_eos=True), engine.submit([10, 11, 12], max_tokens=17)]
    drive(engine, pair)
    assert [r._slot for r in pair] == [None, None] and engine.counters["decode_rows"] == 2 * 16
    assert lone.tokens == alone(model, [5, 6, 7], 6)
    assert pair[1].tokens == alone(model, [10, 11, 12], 17)
    engine.close()


def test_every_prefill_call_carries_a_decode_step_of_the_running_slots(model):
    rng = np.random.default_rng(7)
    jobs = [(random_prompt(rng, model, 3, 12), 18) for _ in range(3)]
    engine = ContiguousEngine(model, slots=3, max_len=MAX_LEN)
    running = engine.submit(jobs[0][0], max_tokens=18, ignore_eos=True)
    while len(running.tokens) < 2:
        engine.step()
    before = dict(engine.counters)
    newcomers = [engine.submit(p, max_tokens=n, ignore_eos=True) for p, n in jobs[1:]]
    engine.step()  # two prefills: the first carries `running`, the second `running` and the first newcomer
    assert engine.counters["mixed_steps"] - before.get("mixed_steps", 0) == 2
    assert engine.counters["slot_steps"] - before["slot_steps"] == 3
    assert engine.counters["decode_steps"] - before["decode_steps"] == 2
    drive(engine, [running] + newcomers)
    engine.close()
    for request, (prompt, n) in zip([running] + newcomers, jobs):
        want = alone(model, prompt, n)  # ends at EOS, where these requests go on
        assert len(request.tokens) == n and request.tokens[:len(want)] == want


@pytest.mark.parametrize("kind, mix_decode", [("paged", True), ("contiguous", True), ("contiguous", False)])
def test_per_request_sampling_parameters(model, kind, mix_decode):
    rng = np.random.default_rng(3)
    a, b, c = (random_prompt(rng, model, 4, 12) for _ in range(3))
    n = 20
    hot = dict(temperature=0.9, top_p=0.95)
    if kind == "paged":  # its prompts ride with decode tokens whenever they meet
        engine = jaxfire.PagedEngine(model, slots=3, max_len=MAX_LEN)
    else:
        engine = ContiguousEngine(model, slots=3, max_len=MAX_LEN, mix_decode=mix_decode)
    greedy = engine.submit(a, max_tokens=n)
    sampled = engine.submit(b, max_tokens=n, seed=7, **hot)
    for _ in range(3):
        engine.step()
    # The same seeded request again, later, in another slot, beside other traffic.
    again = engine.submit(b, max_tokens=n, seed=7, **hot)
    other_seed = engine.submit(b, max_tokens=n, seed=8, **hot)
    drive(engine, [greedy, sampled])
    nucleus = engine.submit(a, max_tokens=n, temperature=1.0, top_p=1e-6, seed=1)  # top-p keeps the top token
    top1 = engine.submit(a, max_tokens=n, temperature=1.0, top_k=1, seed=1)  # so does top-k 1
    top5 = engine.submit(c, max_tokens=n, temperature=1.0, top_k=5, seed=4)
    drive(engine, [again, other_seed, nucleus, top1, top5])
    assert (engine.counters["mixed_steps"] > 0) == mix_decode
    engine.close()

    assert sampled.tokens == again.tokens == alone(model, b, n, seed=7, **hot)
    # Token i of a request is drawn from its own logits with key fold_in(key(seed), i).
    logits = jaxfire.logits(model, [b + sampled.tokens[:2]])[0, -3:]  # [3, V]
    for i in range(3):
        key = jax.random.fold_in(jax.random.key(7), i)
        assert sampled.tokens[i] == int(sampling.sample(logits[i:i + 1], key, hot["temperature"], hot["top_p"])[0])
    assert other_seed.tokens != sampled.tokens
    assert sampled.tokens != alone(model, b, n)
    assert greedy.tokens == nucleus.tokens == top1.tokens == alone(model, a, n)
    assert top5.tokens == alone(model, c, n, temperature=1.0, top_k=5, seed=4)
    logits = jaxfire.logits(model, [c + top5.tokens[:2]])[0, -3:]  # [3, V]
    for i in range(3):
        key = jax.random.fold_in(jax.random.key(4), i)
        assert top5.tokens[i] == int(sampling.sample(logits[i:i + 1], key, 1.0, 1.0, 5)[0])
        assert top5.tokens[i] in np.argsort(-np.asarray(logits[i]))[:5]
    # generate: prompt i of a batch samples with seed + i.
    batch = jaxfire.generate(model, [a, c, b], max_new_tokens=n, seed=5, **hot).tokens
    assert batch[2] == sampled.tokens
    assert batch[1] == alone(model, c, n, seed=6, **hot)


def biased_log_softmax(model, prompt, tokens, logit_bias):
    """Float64 log_softmax of the model's logits plus `logit_bias` at each position that chose one of
    `tokens` ([len(tokens), V])."""
    logits = np.asarray(jaxfire.logits(model, [prompt + tokens[:-1]])[0, len(prompt) - 1:], np.float64)
    for t, v in logit_bias.items():
        logits[:, t] += v
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


@pytest.mark.parametrize("kind", ["paged", "contiguous"])
def test_logit_bias_is_added_before_sampling_per_request(model, kind):
    """A request's logit_bias is added to its logits at every position before sampling, greedy or not:
    +100 forces a token, -100 bans one; its log-probabilities are the biased distribution's; a seeded
    biased request repeats; requests beside it, and later ones in the slot it held, are unbiased."""
    rng = np.random.default_rng(23)
    a, b = random_prompt(rng, model, 5, 10), random_prompt(rng, model, 5, 10)
    n = 12
    want_a, want_b = alone(model, a, n), alone(model, b, n)
    forced_id = next(t for t in range(3, 100) if t not in want_a)
    ban = {want_a[0]: -100.0, 300: 3.0}
    hot = dict(temperature=0.9, top_p=0.95, seed=7)
    hot_bias = {want_b[0]: -100, 301: 4}
    engine = (jaxfire.PagedEngine(model, slots=3, max_len=MAX_LEN) if kind == "paged"
              else ContiguousEngine(model, slots=3, max_len=MAX_LEN))
    forced = engine.submit(a, max_tokens=n, logit_bias={forced_id: 100})
    banned = engine.submit(a, max_tokens=n, logit_bias=ban, top_logprobs=3)
    beside = engine.submit(b, max_tokens=n)
    drive(engine, [forced, banned, beside])
    # Again, in the slots the biased requests left; the seeded biased one twice, the second later.
    plain = engine.submit(a, max_tokens=n)
    sampled = engine.submit(b, max_tokens=n, logit_bias=hot_bias, **hot)
    unbiased = engine.submit(b, max_tokens=n, **hot)
    for _ in range(3):
        engine.step()
    again = engine.submit(b, max_tokens=n, logit_bias=hot_bias, **hot)
    drive(engine, [plain, sampled, unbiased, again])
    engine.close()

    assert forced.tokens == [forced_id] * n
    assert max(forced.logprobs) <= 0 and min(forced.logprobs) > -1e-3  # certain under the bias
    assert want_a[0] not in banned.tokens and banned.tokens != want_a
    assert beside.tokens == want_b and plain.tokens == want_a
    lsm = biased_log_softmax(model, a, banned.tokens, ban)  # [len, V]
    assert banned.tokens == lsm.argmax(-1).tolist()
    np.testing.assert_allclose(banned.logprobs, lsm[np.arange(len(banned.tokens)), banned.tokens], rtol=1e-4,
                               atol=1e-4)
    for pos, alternatives in enumerate(banned.top_logprobs):
        assert [i for i, _ in alternatives] == np.argsort(-lsm[pos])[:3].tolist()
        np.testing.assert_allclose([v for _, v in alternatives], np.sort(lsm[pos])[::-1][:3], rtol=1e-4, atol=1e-4)

    assert sampled.tokens == again.tokens and want_b[0] not in sampled.tokens
    assert sampled.tokens != unbiased.tokens
    lsm = biased_log_softmax(model, b, sampled.tokens, hot_bias)
    np.testing.assert_allclose(sampled.logprobs, lsm[np.arange(len(sampled.tokens)), sampled.tokens], rtol=1e-4,
                               atol=1e-4)
    dense = np.zeros((model.config.vocab_size,), np.float32)
    dense[list(hot_bias)] = list(hot_bias.values())
    logits = jaxfire.logits(model, [b + sampled.tokens[:2]])[0, -3:] + dense  # [3, V]
    for i in range(3):  # token i is drawn from the biased logits with key fold_in(key(seed), i)
        key = jax.random.fold_in(jax.random.key(hot["seed"]), i)
        assert sampled.tokens[i] == int(sampling.sample(logits[i:i + 1], key, hot["temperature"], hot["top_p"])[0])


def test_stop_token_ids_end_a_request_like_eos(model):
    """A stop token ends its request (finish_reason "stop", the id not output) and frees the slot; the
    request beside it carries on; jaxfire.generate takes the same ids."""
    rng = np.random.default_rng(11)
    prompt, other = random_prompt(rng, model, 4, 8), random_prompt(rng, model, 4, 8)
    full = alone(model, prompt, 12)
    stop = full[5]
    cut = full.index(stop)  # its first appearance ends the request
    engine = jaxfire.PagedEngine(model, slots=2, max_len=MAX_LEN)
    stopped = engine.submit(prompt, max_tokens=12, stop_token_ids=[stop])
    beside = engine.submit(other, max_tokens=12)
    drive(engine, [stopped, beside])
    assert stopped.finish_reason == "stop" and stopped.tokens == full[:cut]
    assert beside.tokens == alone(model, other, 12)
    assert engine.free_slots == 2
    engine.close()
    out = jaxfire.generate(model, [prompt], max_new_tokens=12, stop_token_ids=[stop])
    assert out.tokens[0] == full[:cut] and out.finish_reasons[0] == "stop"


def test_fp8_kv_cache_is_honoured(model):
    fp8 = jaxfire.Model(config=model.config, params=model.params, tokenizer=None, kv_cache_dtype="fp8")
    engine = jaxfire.PagedEngine(fp8, slots=2, max_len=MAX_LEN)
    assert engine._state.cache.is_fp8
    prompt = list(range(20, 33))
    request = engine.submit(prompt, max_tokens=16)
    assert request.result() == alone(fp8, prompt, 16)
    engine.close()


@pytest.mark.parametrize("kind", ["paged", "contiguous"])
def test_no_recompilation_after_warmup(model, kind):
    # Shapes no other test uses, so the warm-up must compile (which shows the count works).
    if kind == "paged":
        engine = jaxfire.PagedEngine(model, slots=2, max_len=24, max_batched_tokens=24, detokenize=False)
        assert engine.token_buckets == (1, 2, 4, 8, 16, 24)
    else:
        engine = ContiguousEngine(model, slots=2, max_len=24, detokenize=False)
        assert engine.buckets == (16, 24)
    compiles = []

    def listener(event, *args, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    shown = []

    def progress(programs):  # a progress bar's view: every program, each run as it is yielded
        for i, program in enumerate(programs):
            shown.append((i, len(programs), len(compiles)))
            yield program

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        engine.warmup(progress=progress)
        warmup = len(compiles)
        rng = np.random.default_rng(4)
        with engine:
            # some ask for alternatives, some bias their logits
            requests = [engine.submit(random_prompt(rng, model, lo, hi), max_tokens=int(rng.integers(1, 5)),
                                      temperature=float(rng.choice([0.0, 0.7])), top_p=0.9, seed=i,
                                      top_logprobs=3 * (i % 2), logit_bias={7: 5.0, 9: -100} if i % 3 == 1 else None)
                        for i, (lo, hi) in enumerate([(1, 16), (17, 20), (1, 5), (2, 10), (17, 19), (3, 8)])]
            requests[3].cancel()
            for r in requests:
                r.result(timeout=120)
        serving = len(compiles) - warmup
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert warmup >= 3  # two token (or prefill) buckets and the decode or sampling steps
    assert serving == 0
    assert [i for i, _, _ in shown] == list(range(shown[0][1])) and shown[0][1] % 2 == 0
    assert shown[0][2] == 0 < shown[-1][2]  # the programs compile as the bar reaches them


def test_warmup_compiles_the_steps_side_by_side_once_each(model):
    """compile_workers: threads compile every bucket's step first (the progress bar waits on each), and
    the steps then run from those programs: one compile a bucket, none while serving, the same tokens."""
    engine = jaxfire.PagedEngine(model, slots=2, max_len=40, max_batched_tokens=40, detokenize=False)
    assert engine.token_buckets == (1, 2, 4, 8, 16, 32, 40)  # shapes no other test uses
    steps, total = [], []

    def listener(event, duration, fun_name="", **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            total.append(fun_name)
            steps.extend([fun_name] if fun_name == "jit(_step_fn)" else [])

    with pytest.raises(EngineError, match="compile_workers must be an integer of at least 1, got 0"):
        engine.warmup(compile_workers=0)
    shown = []
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        engine.warmup(progress=lambda programs: shown.append(len(programs)) or programs, compile_workers=3)
        warmup = len(total)
        prompt = list(range(3, 30))
        with engine:
            got = engine.submit(prompt, max_tokens=6).result(timeout=120)
        serving = len(total) - warmup
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(steps) == 7 and serving == 0
    assert shown == [7 + 2 * (7 + 10)]  # the compiles waited on, then every program twice
    assert got == alone(model, prompt, 6)


def test_chunked_prefill_matches_generate_and_never_recompiles(model):
    rng = np.random.default_rng(5)
    jobs = [random_job(rng, model) for _ in range(5)] + [([7, 8, 9], 20)]  # one shorter than a chunk
    expected = [alone(model, p, n) for p, n in jobs]
    engine = ContiguousEngine(model, slots=2, max_len=MAX_LEN, prefill_chunk=5, detokenize=False)
    compiles = []

    def listener(event, *args, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    engine.warmup([len(p) for p, _ in jobs])
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        requests = [engine.submit(p, max_tokens=n) for p, n in jobs[:2]]
        while len(requests[0].tokens) < 2:  # a long prompt joins while others decode
            engine.step()
        requests += [engine.submit(p, max_tokens=n) for p, n in jobs[2:]]
        prefilling = 0
        while not all(r.finished for r in requests):
            engine.step()
            prefilling = max(prefilling, len(engine._prefilling))
        # Cancelling a prompt halfway through its chunks frees its slot.
        dropped = engine.submit(jobs[0][0] + jobs[1][0], max_tokens=4)
        engine.step()
        assert dropped._slot is not None and not dropped._decoding
        dropped.cancel()
        engine.step()
        assert dropped.finish_reason == "cancelled" and engine.free_slots == 2 and not engine.busy
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    engine.close()
    assert [r.tokens for r in requests] == expected
    assert prefilling >= 1 and compiles == []


@pytest.mark.parametrize("http", [False, True], ids=["in_process", "http"])
def test_serving_smoke_mode(tmp_path, http):
    """The serving benchmark end to end on the CPU, in-process and through the HTTP server (streamed
    completions timed at the client)."""
    from bench import serving

    rows = serving.main(["--smoke", "--rates", "8,inf", "--num-requests", "4", "--out-dir", str(tmp_path)]
                        + (["--http"] if http else []))
    rates, summary = rows[:-1], rows[-1]
    assert summary["transport"] == ("http" if http else "in-process")
    assert [r["request_rate"] for r in rates] == [8.0, "inf"]
    for r in rates:
        assert r["completed"] == 4 and r["failed"] == 0
        assert r["total_output_tokens"] == 4 * r["output_len"]
        assert 0 < r["median_ttft_ms"] <= r["p99_ttft_ms"] and 0 < r["mean_itl_ms"]
        assert r["p90_e2el_ms"] >= r["median_ttft_ms"] and r["request_throughput"] > 0
    assert summary["compiles_during_sweep"] == 0
    assert "max_rate_itl_20ms" in summary and "max_rate_e2el_1000ms" in summary
    lines = (tmp_path / "serving.jsonl").read_text().splitlines()
    # each rate's row is written as it is measured, the summary after the sweep
    assert [json.loads(line)["job"] for line in lines] == ["rate", "rate", "summary"]
    tag = "smoke-http" if http else "smoke"
    assert (tmp_path / f"serving_{tag}_generation_latency.png").stat().st_size > 0
    assert (tmp_path / f"serving_{tag}_total_latency.png").stat().st_size > 0


def test_serving_chat_smoke_mode(tmp_path):
    """The multi-turn chat workload on the CPU: prefix caching on, then off, in one run; turns after the
    first find the shared system prompt and the conversation so far cached only with it on."""
    from bench import serving

    rows = serving.main(["--smoke", "--workload", "chat", "--rates", "inf", "--num-requests", "2", "--turns", "3",
                         "--out-dir", str(tmp_path), "--no-plots"])
    on, on_summary, off, off_summary = rows
    assert (on["prefix_caching"], off["prefix_caching"]) == (True, False)
    for r in (on, off):
        assert r["completed"] == 2 * 3 and r["failed"] == 0 and r["total_output_tokens"] == 2 * 3 * r["output_len"]
        assert r["median_ttft_later_turns_ms"] > 0
    # each turn's prompt begins with the whole conversation before it: at least the system prompt's
    # two full pages (32 tokens, pages of 16) hit for every turn (the zero-load request before the sweep
    # cached them)
    assert on_summary["prefix_cache_hits"] >= 32 * 2 * 3
    assert off_summary["prefix_cache_hits"] == 0 and on_summary["compiles_during_sweep"] == 0
    assert on_summary["ttft_later_turns_speedup"] > 0
    assert len((tmp_path / "serving.jsonl").read_text().splitlines()) == 4


def _llama_style_tokenizer():
    """A SentencePiece-style tokenizer as Mistral's tokenizer.json has it: BPE with byte fallback,
    "▁" for spaces, and a decoder that strips the first leading space."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    corpus = ["the quick brown fox jumps over the lazy dog", "def fibonacci(n): return n"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    spec = json.loads(tok.to_str())
    for b in range(256):  # the byte tokens, ordinary vocabulary entries
        spec["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(spec["model"]["vocab"]))
    return Tokenizer.from_str(json.dumps(spec))


@pytest.mark.parametrize("kind", ["byte_level", "llama_style"])
def test_streamed_text_is_the_whole_decode_at_constant_cost(model, kind, monkeypatch):
    """Each token's text delta, joined, is the decode of all the ids (multi-byte characters split over
    tokens, leading and repeated spaces), while each push decodes a few ids, not the whole output."""
    from jaxfire.tokenizer import StreamDecoder
    from jaxfire.tokenizer import Tokenizer

    tok = Tokenizer.__new__(Tokenizer)
    tok._tok = model.tokenizer._tok if kind == "byte_level" else _llama_style_tokenizer()
    text = ("def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)  # naïve, 日本語 🙂\n" * 8)
    ids = tok.encode(text, add_special_tokens=False)
    seen = []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda i, **kw: seen.append(len(i)) or decode(i, **kw))
    d = StreamDecoder(tok)
    streamed = "".join(d.push(t, final=k == len(ids) - 1) for k, t in enumerate(ids))
    assert streamed == decode(ids) and len(ids) > 200
    assert max(seen) <= 8  # a window of the ids not yet emitted and those emitted last


def test_stop_strings_end_a_request_before_the_string(model):
    """A stop string ends its request as soon as the text holds it: the streamed text (and
    jaxfire.generate's) ends before it, the ids up to the one that completed it stay in `tokens`;
    text that could begin a stop string is held back one token, so nothing past the cut is streamed.
    A stop string that never appears changes nothing."""
    prompt = "def fibonacci(n):"
    full = jaxfire.generate(model, [prompt], max_new_tokens=20)
    text, ids = full.texts[0], full.tokens[0]
    stop = text[6:9]
    cut = text.find(stop)
    assert cut > 0 and len(stop) == 3
    engine = jaxfire.PagedEngine(model, slots=2, max_len=64)
    stopped = engine.submit(prompt, max_tokens=20, stop=["zzz-never", stop])
    unchanged = engine.submit(prompt, max_tokens=20, stop="zzz-never")
    streamed = "".join(e.text for e in stopped)
    assert streamed == text[:cut] and stopped.finish_reason == "stop"
    n = len(stopped.tokens)  # the first n ids' text holds the stop string, n - 1 ids' does not
    assert stopped.tokens == ids[:n] and stop in model.tokenizer.decode(ids[:n])
    assert stop not in model.tokenizer.decode(ids[:n - 1])
    assert "".join(e.text for e in unchanged) == text and unchanged.tokens == ids
    engine.close()
    out = jaxfire.generate(model, [prompt], max_new_tokens=20, stop=stop)
    assert out.texts[0] == text[:cut] and out.tokens[0] == ids[:n] and out.finish_reasons[0] == "stop"
    for bad, message in (("", "non-empty strings"), ([3], "non-empty strings"), (5, "string or a sequence")):
        with pytest.raises(RequestError, match=message):
            jaxfire.PagedEngine(model, slots=1, max_len=64).submit(prompt, max_tokens=2, stop=bad)
    with pytest.raises(RequestError, match="stop strings need the model's tokenizer"):
        jaxfire.PagedEngine(model, slots=1, max_len=64, detokenize=False).submit(prompt, max_tokens=2, stop="x")


def test_each_token_carries_its_log_probability_under_the_model(model):
    """Greedy or sampled, a token's logprob is log_softmax of the model's logits at its position (before
    temperature and top-p), on events, on the request and in jaxfire.generate."""
    rng = np.random.default_rng(21)
    prompt = random_prompt(rng, model, 4, 8)
    engine = jaxfire.PagedEngine(model, slots=2, max_len=MAX_LEN)
    greedy = engine.submit(prompt, max_tokens=6, ignore_eos=True)
    hot = engine.submit(prompt, max_tokens=6, temperature=1.5, top_p=0.8, seed=3, ignore_eos=True)
    events = {r.id: [e.logprob for e in r] for r in (greedy, hot)}
    engine.close()
    for req in (greedy, hot):
        logits = jaxfire.logits(model, [prompt + req.tokens[:-1]])[0, len(prompt) - 1:]  # [6, V]
        want = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), np.asarray(req.tokens)[:, None], 1)
        np.testing.assert_allclose(req.logprobs, want[:, 0], rtol=1e-4, atol=1e-4)
        assert events[req.id] == req.logprobs
    assert max(greedy.logprobs) <= 0 and greedy.logprobs != hot.logprobs
    out = jaxfire.generate(model, [prompt], max_new_tokens=6)
    np.testing.assert_allclose(out.logprobs[0], greedy.logprobs[:len(out.tokens[0])], rtol=1e-5)


def test_top_logprobs_are_the_most_likely_ids_at_each_position(model):
    """A request's alternatives are the top ids of log_softmax at each position, most likely first (a
    greedy token is the first); a request beside it that asked for none gets none and the same tokens."""
    rng = np.random.default_rng(22)
    prompt, other = random_prompt(rng, model, 4, 8), random_prompt(rng, model, 4, 8)
    engine = jaxfire.PagedEngine(model, slots=2, max_len=MAX_LEN)
    asks = engine.submit(prompt, max_tokens=6, top_logprobs=5, ignore_eos=True)
    beside = engine.submit(other, max_tokens=6, ignore_eos=True)
    events = [e.top_logprobs for e in asks]
    assert [e.top_logprobs for e in beside] == [None] * 6 and beside.top_logprobs == []
    with pytest.raises(RequestError, match=r"top_logprobs must be an integer in \[0, 20\]"):
        engine.submit(prompt, max_tokens=2, top_logprobs=21)
    with pytest.raises(RequestError, match="top_logprobs"):
        engine.submit(prompt, max_tokens=2, top_logprobs=True)
    engine.close()
    assert beside.tokens == alone(model, other, 6)
    assert events == asks.top_logprobs and len(events) == 6
    logits = jaxfire.logits(model, [prompt + asks.tokens[:-1]])[0, len(prompt) - 1:]  # [6, V]
    lsm = np.asarray(jax.nn.log_softmax(logits, -1))
    for pos, alternatives in enumerate(events):
        ids = [i for i, _ in alternatives]
        assert len(ids) == 5 and ids[0] == asks.tokens[pos]
        np.testing.assert_allclose([v for _, v in alternatives], lsm[pos, ids], rtol=1e-4, atol=1e-4)
        assert sorted(lsm[pos], reverse=True)[4] == pytest.approx(alternatives[-1][1], abs=1e-4)
    out = jaxfire.generate(model, [prompt, other], max_new_tokens=3, top_logprobs=5)
    for got, want in zip(out.top_logprobs[0], events[:len(out.tokens[0])], strict=True):
        assert [i for i, _ in got] == [i for i, _ in want]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-5, atol=1e-5)
    assert all(len(a) == 5 for a in out.top_logprobs[1]) and len(out.top_logprobs[1]) == len(out.tokens[1])
