"""The paged engine against the contiguous one and against itself: the same greedy tokens across page
boundaries (built-in and converted models, FP8 cache), prefix hits, eviction under a tiny pool,
preemption that streams no token twice, no page leaked, and refused configurations."""

import numpy as np
import pytest

import jaxfire
from jaxfire.engine import ContiguousEngine, EngineError, RequestError

PAGE = 16  # the smallest page the paged attention kernel takes


@pytest.fixture(scope="module")
def model():
    # float32: greedy tokens must not hinge on rounding differing between batch shapes.
    return jaxfire.load(dtype="float32")


def random_jobs(rng, model, count, lo, hi, new_lo=4, new_hi=12):
    return [(rng.integers(3, model.config.vocab_size, int(rng.integers(lo, hi + 1))).tolist(),
             int(rng.integers(new_lo, new_hi + 1))) for _ in range(count)]


def serve(engine, jobs, **sampling):
    """Every job submitted at once; returns the requests and each one's streamed events."""
    events = [[] for _ in jobs]
    requests = [engine.submit(p, max_tokens=n, on_token=events[i].append, **sampling) for i, (p, n) in enumerate(jobs)]
    while not all(r.finished for r in requests):
        engine.step()
    return requests, events


def contiguous_tokens(model, jobs, max_len):
    # one decode program and prompts prefilled alone: the fewest programs to compile
    engine = ContiguousEngine(model, slots=len(jobs), max_len=max_len, decode_buckets=(len(jobs),), mix_decode=False,
                              detokenize=False)
    tokens = [r.tokens for r in serve(engine, jobs)[0]]
    engine.close()
    return tokens


@pytest.mark.parametrize("kv", [None, "fp8"])
def test_paged_equals_contiguous_across_page_boundaries(model, kv):
    m = model if kv is None else jaxfire.Model(config=model.config, params=model.params, tokenizer=None,
                                               kv_cache_dtype=kv)
    rng = np.random.default_rng(0)
    jobs = random_jobs(rng, m, 5, 3, 30) + [([5] * PAGE, 9)]  # one prompt of exactly one page
    want = contiguous_tokens(m, jobs, 48)
    engine = jaxfire.PagedEngine(m, slots=3, max_len=48, page_size=PAGE, max_batched_tokens=24, detokenize=False)
    requests, _ = serve(engine, jobs)
    assert [r.tokens for r in requests] == want
    assert engine.counters["mixed_steps"] > 0  # prompt chunks rode with decode tokens
    assert engine.stats().kv_pages_used == 0
    engine.close()


def test_idle_steps_take_larger_chunks_and_give_the_same_tokens(model):
    """With an idle budget above the step budget, a prompt reaching an idle engine prefills in fewer
    steps (its bucket compiled with the rest), and every request gets the tokens of the contiguous
    engine."""
    rng = np.random.default_rng(3)
    jobs = random_jobs(rng, model, 4, 20, 30)
    want = contiguous_tokens(model, jobs, 48)
    engine = jaxfire.PagedEngine(model, slots=2, max_len=48, page_size=PAGE, max_batched_tokens=8,
                                 max_idle_batched_tokens=32, detokenize=False)
    assert engine.token_buckets == (1, 2, 4, 8, 16, 32)
    first = engine.submit(jobs[0][0], max_tokens=jobs[0][1])
    engine.step()
    assert engine.counters["prefill_tokens"] == min(len(jobs[0][0]), 32)  # one idle step, not chunks of 8
    first.result()
    requests, _ = serve(engine, jobs[1:])
    assert [first.tokens] + [r.tokens for r in requests] == want
    assert engine.stats().kv_pages_used == 0
    engine.close()


def test_a_converted_model_with_mqa_and_a_window_matches_the_contiguous_engine(converted):
    _, ckpt = converted("mqa_window_tied")
    m = jaxfire.load(ckpt, dtype="float32")
    rng = np.random.default_rng(1)
    jobs = random_jobs(rng, m, 4, 3, 28)
    want = contiguous_tokens(m, jobs, 40)
    engine = jaxfire.PagedEngine(m, slots=2, max_len=40, page_size=PAGE, max_batched_tokens=16, detokenize=False)
    assert [r.tokens for r in serve(engine, jobs)[0]] == want
    engine.close()


def test_prefix_hits_give_the_tokens_of_no_cache(model):
    rng = np.random.default_rng(2)
    system = rng.integers(3, model.config.vocab_size, 2 * PAGE + 2).tolist()
    jobs = [(system + p, n) for p, n in random_jobs(rng, model, 4, 1, 6)] + [(system[:2 * PAGE], 6)]
    results = {}
    for caching in (False, True):
        engine = jaxfire.PagedEngine(model, slots=2, max_len=64, page_size=PAGE, prefix_caching=caching,
                                max_batched_tokens=64, detokenize=False)
        results[caching] = [r.tokens for r in serve(engine, jobs)[0]]
        stats = engine.stats()
        if caching:
            # The first two requests prefill together; each later one finds the system prompt's 2 full
            # pages (the prompt of exactly 2 pages only 1: its last token is computed again).
            assert stats.prefix_cache_hits == 2 * PAGE * 2 + PAGE
            assert stats.prefix_cache_queries == sum(len(p) for p, _ in jobs)
            assert stats.kv_pages_cached > 0 and stats.kv_pages_used == 0
        else:
            assert stats.prefix_cache_hits == stats.prefix_cache_queries == stats.kv_pages_cached == 0
        engine.close()
    assert results[True] == results[False]


def test_eviction_under_a_tiny_pool_takes_the_least_recently_used(model):
    rng = np.random.default_rng(3)
    a, b, c = (rng.integers(3, model.config.vocab_size, 2 * PAGE + 1).tolist() for _ in range(3))
    # one request of max_len 48 takes 3 pages: 6 usable pages hold two requests' worth
    engine = jaxfire.PagedEngine(model, slots=1, max_len=48, page_size=PAGE, kv_pages=7, max_batched_tokens=48,
                            detokenize=False)

    def run(prompt):
        before = engine.stats().prefix_cache_hits
        (request,), _ = serve(engine, [(prompt, 4)])
        return request.tokens, engine.stats().prefix_cache_hits - before

    # Each run computes 36 positions: two full pages, cached when it ends (released second page first,
    # so a chain's tail goes before its head), and a partial third page, freed.
    first_a, hit = run(a)
    assert hit == 0
    assert run(b)[1] == 0
    assert run(a) == (first_a, 2 * PAGE)  # both of a's pages were still cached
    assert run(c)[1] == 0  # 2 free pages, then it evicts the least recently released: b's second
    assert run(b)[1] == PAGE  # b's first page is left; its second evicts a's second
    assert run(a) == (first_a, PAGE)
    assert engine.stats().kv_pages_used == 0
    engine.close()


def test_preemption_resumes_with_the_tokens_of_an_unconstrained_run_and_streams_none_twice(model):
    rng = np.random.default_rng(4)
    jobs = random_jobs(rng, model, 4, 10, 14, 30, 34)
    roomy = jaxfire.PagedEngine(model, slots=4, max_len=48, page_size=PAGE, detokenize=False)
    want = [r.tokens for r in serve(roomy, jobs, ignore_eos=True)[0]]
    roomy.close()
    # 4 running requests of up to 48 positions want 12 pages; 8 make them preempt one another
    tight = jaxfire.PagedEngine(model, slots=4, max_len=48, page_size=PAGE, kv_pages=9, max_batched_tokens=32,
                           detokenize=False)
    requests, events = serve(tight, jobs, ignore_eos=True)
    stats = tight.stats()
    assert stats.preemptions > 0
    for request, streamed, tokens in zip(requests, events, want):
        assert request.tokens == tokens
        assert [e.token for e in streamed] == tokens  # each token once, in order
        assert len(request.metrics.token_times) == len(tokens)
    assert stats.kv_pages_used == 0 and tight.free_slots == 4
    tight.close()


def penalized_reference(model, prompt, n, presence, frequency, repetition, width=48):
    """Greedy tokens under sampling penalties, the slow way: the whole sequence's logits each step (no
    cache; padded to `width`, which a causal model's earlier positions never see), the penalties
    applied in NumPy from the tokens so far."""
    out = []
    for _ in range(n):
        seq = prompt + out
        logits = np.asarray(jaxfire.logits(model, [seq + [0] * (width - len(seq))]))[0, len(seq) - 1]  # [V]
        logits = logits.astype(np.float64)
        counts = np.bincount(out, minlength=logits.size)
        seen = (counts > 0) | np.isin(np.arange(logits.size), prompt)
        logits = np.where(seen, np.where(logits > 0, logits / repetition, logits * repetition), logits)
        out.append(int(np.argmax(logits - frequency * counts - presence * (counts > 0))))
    return out


def test_penalties_give_the_tokens_of_a_reference_per_request_and_across_preemption(model):
    """Each request's penalties over its own prompt and tokens (requests of other penalties, or none,
    share the step), as a reference computes them; a request preempted and resumed (its row's counts
    rebuilt from the tokens it has) gives the same tokens."""
    rng = np.random.default_rng(7)
    jobs = random_jobs(rng, model, 4, 10, 14, 30, 34)
    penalties = [dict(repetition_penalty=1.8), dict(presence_penalty=1.5, frequency_penalty=0.7), {},
                 dict(presence_penalty=-0.5, frequency_penalty=2.0, repetition_penalty=0.7)]
    want = [penalized_reference(model, p, n, s.get("presence_penalty", 0.0), s.get("frequency_penalty", 0.0),
                                s.get("repetition_penalty", 1.0)) for (p, n), s in zip(jobs, penalties)]
    plain = [r.tokens for r in serve(jaxfire.PagedEngine(model, slots=4, max_len=48, detokenize=False),
                                     jobs, ignore_eos=True)[0]]
    assert plain[2] == want[2] and all(plain[i] != want[i] for i in (0, 1, 3))  # the penalties bite
    # 4 requests of up to 48 positions want 12 pages; 8 make them preempt one another
    tight = jaxfire.PagedEngine(model, slots=4, max_len=48, page_size=PAGE, kv_pages=9, max_batched_tokens=32,
                                detokenize=False)
    requests = [tight.submit(p, max_tokens=n, ignore_eos=True, **s) for (p, n), s in zip(jobs, penalties)]
    while not all(r.finished for r in requests):
        tight.step()
    assert tight.stats().preemptions > 0
    assert [r.tokens for r in requests] == want
    assert requests[1].presence_penalty == 1.5 and requests[2].repetition_penalty == 1.0
    tight.close()


@pytest.mark.parametrize("kwargs, message", [
    (dict(presence_penalty=2.5), r"presence_penalty must be a number in \[-2, 2\], got 2.5"),
    (dict(frequency_penalty="0"), r"frequency_penalty must be a number in \[-2, 2\], got '0'"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a number above 0 .1: none., got 0.0"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty must be a number above 0"),
])
def test_bad_penalties_are_refused_by_name(model, kwargs, message):
    engine = jaxfire.PagedEngine(model, slots=1, max_len=32, detokenize=False)
    with pytest.raises(RequestError, match=message):
        engine.submit([5, 6, 7], max_tokens=2, **kwargs)
    contiguous = ContiguousEngine(model, slots=1, max_len=32, detokenize=False)
    with pytest.raises(RequestError, match="ContiguousEngine has no sampling penalties: jaxfire.Engine"):
        contiguous.submit([5, 6, 7], max_tokens=2, presence_penalty=0.5)
    contiguous.submit([5, 6, 7], max_tokens=2, presence_penalty=0, repetition_penalty=1)  # neutral: accepted
    contiguous.close()
    engine.close()


def test_min_tokens_bans_the_ending_ids_and_the_stop_strings_until_reached():
    """min_tokens: a stop id the reply would meet at once is -inf for the first tokens (they are those of
    a run biasing it away), and may end the reply after them; a stop string met at once ends nothing
    before then."""
    model = jaxfire.load()  # with its tokenizer: stop strings
    prompt = model.tokenizer.encode("class Stack:")
    with jaxfire.Engine(model, slots=2, max_len=64) as engine:
        plain = engine.submit(prompt, max_tokens=12, ignore_eos=True).result(timeout=120)
        stop_id = plain[1]
        assert engine.submit(prompt, max_tokens=12, stop_token_ids=[stop_id]).result(timeout=120) == plain[:1]
        away = engine.submit(prompt, max_tokens=5, logit_bias={stop_id: -100}).result(timeout=120)
        held = engine.submit(prompt, max_tokens=12, stop_token_ids=[stop_id], min_tokens=5)
        assert held.result(timeout=120)[:5] == away and stop_id not in held.tokens[:5] and len(held.tokens) >= 5
        first = model.tokenizer.decode(plain[:1])
        cut = engine.submit(prompt, max_tokens=12, stop=[first], ignore_eos=True)
        assert cut.result(timeout=120) == plain[:1] and cut.finish_reason == "stop"
        text = "".join(e.text for e in engine.submit(prompt, max_tokens=12, stop=[first], ignore_eos=True,
                                                        min_tokens=3))
        assert text.startswith(first) and len(text) > len(first)
        with pytest.raises(RequestError, match=r"min_tokens must be an integer in \[0, max_tokens \(4\)\], got 5"):
            engine.submit(prompt, max_tokens=4, min_tokens=5)
    contiguous = ContiguousEngine(model, slots=1, max_len=32, detokenize=False)
    with pytest.raises(RequestError, match="ContiguousEngine has no min_tokens: jaxfire.Engine"):
        contiguous.submit(prompt, max_tokens=4, min_tokens=2)
    contiguous.close()


def test_a_cancelled_request_frees_its_pages_at_once(model):
    engine = jaxfire.PagedEngine(model, slots=2, max_len=64, page_size=PAGE, prefix_caching=False, detokenize=False)
    request = engine.submit(list(range(3, 4 + 2 * PAGE)), max_tokens=10, ignore_eos=True)
    while len(request.tokens) < 2:
        engine.step()
    assert engine.stats().kv_pages_used == 3
    request.cancel()
    engine.step()
    assert request.finish_reason == "cancelled"
    assert engine.stats().kv_pages_used == 0 and engine.free_slots == 2
    engine.close()


def test_on_a_mesh_the_paged_engine_gives_the_tokens_of_one_device(model):
    """The whole engine (pages, chunks packed with decode, the one-step-behind reads, the penalties'
    counts) over an expert-parallel mesh gives the greedy tokens of one device, with the FP8 cache (the
    ragged step alone on tensor and expert meshes: tests/test_paged.py)."""
    import jax

    rng = np.random.default_rng(6)
    jobs = random_jobs(rng, model, 3, 5, 30)
    one = jaxfire.Model(config=model.config, params=model.params, tokenizer=None, kv_cache_dtype="fp8")
    engine = jaxfire.PagedEngine(one, slots=2, max_len=48, page_size=PAGE, max_batched_tokens=16, detokenize=False)
    penalties = dict(repetition_penalty=1.5, frequency_penalty=0.3)
    want = [r.tokens for r in serve(engine, jobs, **penalties)[0]]
    engine.close()
    meshed = jaxfire.load(dtype="float32", kv_cache_dtype="fp8", mesh=jaxfire.make_mesh(jax.devices()[:2], expert=2))
    engine = jaxfire.PagedEngine(meshed, slots=2, max_len=48, page_size=PAGE, max_batched_tokens=16,
                                 detokenize=False)
    assert [r.tokens for r in serve(engine, jobs, **penalties)[0]] == want
    assert engine.stats().kv_pages_used == 0
    engine.close()


def test_a_step_is_queued_before_the_previous_one_is_read(model, monkeypatch):
    """The host plans and queues step k+1, then reads step k's samples: each step's tokens arrive with
    the next step, a decode row takes its token from the previous samples on the device, and a request
    that a stop ends drops the row it already had in the next step."""
    from jaxfire.engine import runner

    engine = jaxfire.PagedEngine(model, slots=2, max_len=48, page_size=PAGE, detokenize=False)
    order = []
    dispatch, read = runner.Runner.dispatch, runner.Runner.read
    monkeypatch.setattr(runner.Runner, "dispatch", lambda self, *a: order.append("dispatch") or dispatch(self, *a))
    monkeypatch.setattr(runner.Runner, "read", lambda self, *a: order.append("read") or read(self, *a))
    prompt = list(range(3, 20))
    free = engine.submit(prompt, max_tokens=6, ignore_eos=True)
    assert engine.step() == [] and order == ["dispatch"]  # the prompt's step is queued, nothing read yet
    first = engine.step()
    assert [e.token for e in first] == free.tokens[:1] and order == ["dispatch", "dispatch", "read"]
    while not free.finished:
        engine.step()
    # a stop on the second token: the third row was already queued, and its sample never reaches the request
    stop = free.tokens[1]
    stopped = engine.submit(prompt, max_tokens=6, ignore_eos=True, stop_token_ids=[stop])
    while not stopped.finished:
        engine.step()
    assert stopped.tokens == free.tokens[:1] and stopped.finish_reason == "stop"
    while engine.step():
        pass
    assert engine.stats().kv_pages_used == 0 and engine.free_slots == 2
    engine.close()


@pytest.mark.parametrize("kwargs, message", [
    (dict(page_size=0), "page_size: page size must be a power of two of at least 16 positions, got 0"),
    (dict(page_size=24), "page size must be a power of two of at least 16 positions, got 24"),
    (dict(page_size=8), "page size must be a power of two of at least 16 positions, got 8"),
    (dict(kv_pages=2), "kv_pages must be at least 3: one request of max_len 32 takes 2 pages of 16"),
    (dict(max_batched_tokens=3), r"max_batched_tokens must be an integer of at least slots \(4\)"),
    (dict(min_bucket=0), "min_bucket must be a positive integer"),
    (dict(max_batched_tokens=16, max_idle_batched_tokens=8),
     r"max_idle_batched_tokens must be an integer of at least max_batched_tokens \(16\)"),
])
def test_bad_configuration_is_refused_in_one_sentence(model, kwargs, message):
    with pytest.raises(EngineError, match=message):
        jaxfire.PagedEngine(model, **(dict(slots=4, max_len=32, page_size=PAGE) | kwargs))
