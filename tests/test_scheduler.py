"""The scheduler's policy alone, against a simulated device whose pages hold token ids: the budget,
first come first served, no starvation, preemption order, recomputation that streams nothing twice,
prefix hits, and no page leaked; each with the host reading samples at once (`lag=0`) and a step late,
the way the engine runs (`lag=1`: step k+1 is planned and run before step k's samples are appended)."""

import hashlib

import numpy as np
import pytest

from jaxfire.engine.pages import NULL_PAGE, PagePool
from jaxfire.engine.scheduler import Scheduler, Sequence

VOCAB = 50


def next_token(prefix) -> int:
    """The simulated model: the next id is a function of every id before it."""
    return int.from_bytes(hashlib.blake2b(np.asarray(prefix, np.int64).tobytes(), digest_size=4).digest()) % VOCAB


class Device:
    """Pages of token ids: a plan's chunks are written into them, and a sample reads the sequence's whole
    prefix back through its page table, so a wrong or overwritten page gives a wrong token."""

    def __init__(self, num_pages, page_size):
        self.z = page_size
        self.pages = {p: [None] * page_size for p in range(num_pages)}

    def run(self, plan, last):
        """Writes and samples a plan; a pending chunk's token is the sequence's sample in `last`, the
        previous step's samples (the device has them, the host may not yet)."""
        sampled = {}
        for c in plan.chunks:
            assert NULL_PAGE not in c.pages
            tokens = [last[c.seq.id]] if c.pending else c.tokens
            for i, t in enumerate(tokens):
                pos = c.start + i
                self.pages[c.pages[pos // self.z]][pos % self.z] = t
        for c in plan.chunks:
            if c.sample:
                end = c.start + len(c.tokens)
                seen = [self.pages[c.pages[p // self.z]][p % self.z] for p in range(end)]
                sampled[c.seq.id] = next_token(seen)
        return sampled


def run(jobs, *, rows, budget, num_pages, page_size, caching=True, arrivals=None, cancel=None, max_steps=2000,
        lag=0, idle=None):
    """Serves `jobs` (prompt, max_tokens) to the end; returns each one's tokens, the plans, and the order of
    first admissions. `arrivals[i]` is the step job i is submitted at; samples reach the host `lag` steps
    after their step ran; `idle` is the budget of steps without a decode token."""
    pool = PagePool(num_pages, page_size, caching)
    sched = Scheduler(pool, rows=rows, max_batched_tokens=budget, idle_batched_tokens=idle)
    device = Device(num_pages, page_size)
    seqs = [Sequence(i, p, n) for i, (p, n) in enumerate(jobs)]
    arrivals = arrivals or [0] * len(jobs)
    out = {s.id: [] for s in seqs}
    first_admitted, plans, done = [], [], set()
    last, in_flight = {}, []
    for step in range(max_steps):
        for s in seqs:
            if arrivals[s.id] == step:
                sched.add(s)
        if cancel and step == cancel[1]:
            sched.finish(seqs[cancel[0]])
            done.add(cancel[0])
            assert seqs[cancel[0]].pages == []
        decoding = {s.id for s in sched.running if s.decoding and not s.complete}
        plan = sched.schedule()
        plans.append(plan)
        decode_rows = any(len(c.tokens) == 1 and c.start == len(c.seq.tokens) + c.seq.pending - 1
                          and c.start >= c.seq.prompt_len for c in plan.chunks)
        assert plan.num_tokens <= (budget if decode_rows or idle is None else idle)
        planned = [c.seq.id for c in plan.chunks]
        assert len(planned) == len(set(planned))
        # every decoding sequence not preempted gets its token
        assert decoding - {s.id for s in plan.preempted} <= set(planned)
        for c in plan.chunks:
            if c.seq.id not in first_admitted:
                first_admitted.append(c.seq.id)
        for c in plan.chunks:
            assert c.pending == (lag > 0 and len(c.tokens) == 1 and c.start == len(c.seq.tokens))
        last = device.run(plan, last)
        sched.computed(plan)
        in_flight.append(last)
        for sid, tok in (in_flight.pop(0) if len(in_flight) > lag else {}).items():
            if sid in done:  # cancelled while its sample was in flight
                continue
            s = seqs[sid]
            sched.append(s, tok)
            out[sid].append(tok)
            if s.generated == s.max_tokens:
                sched.finish(s)
                done.add(sid)
        assert pool.used + pool.available == pool.capacity
        if len(done) == len(seqs) and max(arrivals) <= step and not any(in_flight):
            break
    else:
        raise AssertionError("some request never finished")
    assert pool.used == 0 and not sched.running and not sched.waiting
    return out, plans, first_admitted, sched


def expected(prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


def random_jobs(rng, count, lo=3, hi=40, shared=None):
    jobs = []
    for _ in range(count):
        prompt = rng.integers(0, VOCAB, int(rng.integers(lo, hi))).tolist()
        if shared is not None:
            prompt = shared + prompt
        jobs.append((prompt, int(rng.integers(1, 12))))
    return jobs


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("lag", [0, 1])
def test_random_traffic_keeps_the_budget_and_gives_each_request_its_own_tokens(caching, lag):
    rng = np.random.default_rng(0)
    shared = rng.integers(0, VOCAB, 13).tolist()
    jobs = random_jobs(rng, 12, shared=shared) + random_jobs(rng, 12)
    arrivals = sorted(rng.integers(0, 30, len(jobs)).tolist())
    out, plans, first, sched = run(jobs, rows=4, budget=16, num_pages=40, page_size=4, caching=caching, lag=lag,
                                   arrivals=arrivals)
    for i, (p, n) in enumerate(jobs):
        assert out[i] == expected(p, n)
    assert first == sorted(first, key=lambda i: (arrivals[i], i))  # first come, first served
    assert any(len({c.seq.id for c in p.chunks if len(c.tokens) > 1}) > 1 for p in plans)  # prompts packed
    assert any(any(len(c.tokens) == 1 for c in p.chunks) and any(len(c.tokens) > 1 for c in p.chunks)
               for p in plans)  # prefill chunks ride with decode tokens
    if caching:
        assert sched.prefix_hits >= 8 * 12  # the shared 13 tokens' first two pages, for most followers
    else:
        assert sched.prefix_hits == sched.prefix_queries == 0


@pytest.mark.parametrize("lag", [0, 1])
def test_a_prefix_hit_prefills_only_the_rest(lag):
    rng = np.random.default_rng(1)
    system = rng.integers(0, VOCAB, 16).tolist()
    jobs = [(system + [1, 2, 3], 2), (system + [4, 5], 2)]
    out, plans, _, sched = run(jobs, rows=2, budget=64, num_pages=20, page_size=4, arrivals=[0, 5], lag=lag)
    second = [c for p in plans for c in p.chunks if c.seq.id == 1]
    assert second[0].start == 16 and second[0].tokens == [4, 5]
    assert sched.prefix_queries == 19 + 18 and sched.prefix_hits == 16
    assert out[1] == expected(*jobs[1])


@pytest.mark.parametrize("lag", [0, 1])
def test_a_fully_cached_prompt_still_computes_its_last_token(lag):
    prompt = list(range(8))
    out, plans, _, sched = run([(prompt, 3), (prompt, 3)], rows=1, budget=8, num_pages=10, page_size=4, lag=lag)
    again = [c for p in plans for c in p.chunks if c.seq.id == 1]
    assert again[0].start == 4 and again[0].tokens == prompt[4:]  # the last page is recomputed into a new one
    assert out[0] == out[1] == expected(prompt, 3)


@pytest.mark.parametrize("lag", [0, 1])
def test_preemption_takes_the_latest_admitted_and_resumes_without_repeating_a_token(lag):
    rng = np.random.default_rng(2)
    jobs = [(rng.integers(0, VOCAB, 6).tolist(), 14) for _ in range(3)]
    # 3 rows, 12 usable pages of 2: the three requests need 10 each at the end, so decode runs out
    out, plans, first, sched = run(jobs, rows=3, budget=32, num_pages=13, page_size=2, caching=False, lag=lag)
    assert sched.preemptions > 0
    victims = [s.id for p in plans for s in p.preempted]
    assert victims[0] == 2  # the latest admitted goes first
    for i, (p, n) in enumerate(jobs):
        assert out[i] == expected(p, n)  # each token once, and the same as an unconstrained run


@pytest.mark.parametrize("lag", [0, 1])
def test_the_head_of_the_queue_is_never_overtaken(lag):
    big = (list(range(30)), 2)
    small = [([1, 2], 2) for _ in range(4)]
    # pages for the big prompt free up only when the running small one ends: the smaller ones behind
    # it wait rather than take those pages
    jobs = [small[0], big] + small[1:]
    out, plans, first, _ = run(jobs, rows=4, budget=64, num_pages=9, page_size=4, caching=False, lag=lag)
    assert first == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("lag", [0, 1])
def test_a_cancelled_request_frees_its_pages_at_once(lag):
    jobs = [(list(range(10)), 20), (list(range(20, 30)), 3)]
    out, _, _, sched = run(jobs, rows=2, budget=16, num_pages=16, page_size=2, caching=False, cancel=(0, 3), lag=lag)
    assert len(out[0]) < 20 and out[1] == expected(*jobs[1])


@pytest.mark.parametrize("lag", [0, 1])
def test_steps_without_a_decode_token_take_the_idle_budget(lag):
    """A prompt reaching an idle scheduler prefills in chunks of the idle budget; once a sequence
    decodes, chunks beside it keep to the step budget. Tokens are those of the plain budget."""
    rng = np.random.default_rng(7)
    jobs = [(rng.integers(0, VOCAB, 40).tolist(), 6), (rng.integers(0, VOCAB, 40).tolist(), 3)]
    out, plans, _, _ = run(jobs, rows=2, budget=8, idle=32, num_pages=40, page_size=4, arrivals=[0, 3], lag=lag)
    assert [len(c.tokens) for c in plans[0].chunks] == [32]  # alone and idle: 32 of its 40 tokens
    beside = [len(c.tokens) for p in plans if {c.seq.id for c in p.chunks} == {0, 1} for c in p.chunks
              if c.seq.id == 1]
    assert beside and max(beside) <= 8 - 1  # beside the first one's decode token
    assert any(len(c.tokens) > 8 for p in plans[4:] for c in p.chunks)  # idle again once the first ends
    plain, _, _, _ = run(jobs, rows=2, budget=8, num_pages=40, page_size=4, arrivals=[0, 3], lag=lag)
    assert out == plain == {i: expected(*job) for i, job in enumerate(jobs)}
    with pytest.raises(ValueError, match="idle_batched_tokens"):
        Scheduler(PagePool(4, 2), rows=2, max_batched_tokens=8, idle_batched_tokens=4)


def test_a_budget_below_the_rows_is_refused():
    with pytest.raises(ValueError, match="max_batched_tokens"):
        Scheduler(PagePool(4, 2), rows=4, max_batched_tokens=3)
