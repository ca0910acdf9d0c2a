"""The scheduler's policy: which tokens of which sequences the next engine step computes.

Pure bookkeeping over `pages.PagePool`, no device work; `schedule()` returns a `StepPlan` that the
runner (`runner.py`) turns into one ragged batch.

Per step, under a budget of `max_batched_tokens` token rows:
1. every running sequence that decodes gets its one token (the budget is at least the row count, so
   these always fit);
2. running sequences whose prompt is partly computed get their next chunk, oldest admission first,
   as much as the budget left allows;
3. waiting sequences are admitted first come, first served into free rows while budget and pages
   last: each first takes the longest run of its prompt's full pages found in the prefix cache, then
   a chunk of the rest. The queue's head is never passed over (a later, smaller request does not
   overtake it), so no request starves.
A step with no decode token (nobody waits on one) may take up to `idle_batched_tokens` rows instead,
so that a prompt reaching an idle engine prefills in fewer, larger chunks.
A running sequence that needs a page when none is left preempts the most recently admitted running
sequence (possibly itself): its pages are released and it goes back to the head of the queue with
every token it has (prompt and generated), to be recomputed; the engine streams only tokens sampled
after them, so nothing is sent twice. `fits_alone` says whether a request can ever run.

The engine plans step k+1 before it has read step k's samples (the host works while the device
runs): `computed(plan)` records a dispatched plan, and each sequence it samples holds one *pending*
token, known to the device only, until `append` brings it. A pending token is the input of the
sequence's next decode row (`Chunk.pending`: the runner takes it from the last step's samples on the
device); a sequence whose pending token is its last (`max_tokens`) gets no more rows; a page joins the
prefix cache once every token in it is known.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
from typing import Any

from jaxfire.engine import pages as P


class Sequence:
    """The scheduler's view of one request: its tokens so far and the pages holding their keys/values."""

    def __init__(self, sid: int, prompt: list[int], max_tokens: int, owner: Any = None):
        self.id = sid
        self.tokens = list(prompt)  # the prompt, then every generated token the engine appended
        self.prompt_len = len(prompt)
        self.max_tokens = max_tokens
        self.owner = owner  # the engine's request
        self.pages: list[int] = []  # in position order: page i holds positions [i Z, (i + 1) Z)
        self.computed = 0  # leading tokens whose keys/values are in the pages (or are being written)
        self.pending = 0  # samples of dispatched steps not yet in `tokens` (the host reads a step late)
        self.keys: list[bytes] = []  # hash-chain keys of the full pages among the computed ones
        self.row: int | None = None  # its row of the page table while running
        self.admitted = -1  # admission number: the latest admitted is preempted first

    @property
    def generated(self) -> int:
        """Generated tokens the host has (a pending one not counted)."""
        return len(self.tokens) - self.prompt_len

    @property
    def known(self) -> int:
        """Tokens so far, a pending one included."""
        return len(self.tokens) + self.pending

    @property
    def decoding(self) -> bool:
        """All tokens but the last are computed: the next step computes one and samples."""
        return self.row is not None and self.computed == self.known - 1 and self.known > self.prompt_len

    @property
    def complete(self) -> bool:
        """Its last token (by `max_tokens`) is sampled: it needs no more rows."""
        return self.known - self.prompt_len >= self.max_tokens

    def __repr__(self) -> str:
        return f"Sequence(id={self.id}, tokens={len(self.tokens)}, computed={self.computed}, row={self.row})"


@dataclasses.dataclass
class Chunk:
    """Tokens `tokens` of sequence `seq` at positions `start ..`, written into its pages `pages`."""

    seq: Sequence
    row: int  # the sequence's page-table row
    start: int
    tokens: list[int]
    pages: tuple[int, ...]  # the sequence's pages after this step's writes
    sample: bool  # the chunk ends at the last known token: the step samples the sequence's next token
    pending: bool = False  # its one token is the sequence's pending one (tokens holds a placeholder)


@dataclasses.dataclass
class StepPlan:
    chunks: list[Chunk]  # decode rows (one token each) first, then prefill chunks
    preempted: list[Sequence]  # sent back to the queue this step

    @property
    def num_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)


class Scheduler:
    """Running and waiting sequences over `rows` page-table rows and one page pool."""

    def __init__(self, pool: P.PagePool, rows: int, max_batched_tokens: int, idle_batched_tokens: int | None = None):
        if max_batched_tokens < rows:
            raise ValueError(f"max_batched_tokens ({max_batched_tokens}) must cover one decode token per row ({rows})")
        idle = max_batched_tokens if idle_batched_tokens is None else idle_batched_tokens
        if idle < max_batched_tokens:
            raise ValueError(f"idle_batched_tokens ({idle}) must be at least max_batched_tokens ({max_batched_tokens})")
        self.pool = pool
        self.rows = rows
        self.max_batched_tokens = max_batched_tokens
        self.idle_batched_tokens = idle
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order
        self._free_rows = list(range(rows))  # a heap: the lowest row first
        self._admissions = 0
        self.preemptions = 0
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of them, found cached

    @property
    def free_rows(self) -> int:
        return len(self._free_rows)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.pool.page_size)

    def fits_alone(self, tokens: int) -> bool:
        """Whether a sequence of `tokens` positions fits the pool with nothing else running."""
        return self.pages_for(tokens) <= self.pool.capacity

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Ends a sequence wherever it is: its pages are released at once, its row freed."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self._free(seq)

    def _free(self, seq: Sequence) -> None:
        self.pool.release(seq.pages)
        seq.pages, seq.keys, seq.computed = [], [], 0
        if seq.row is not None:
            heapq.heappush(self._free_rows, seq.row)
            seq.row = None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _grow(self, seq: Sequence, tokens: int, planned: dict[int, Chunk], preempted: list[Sequence]) -> bool:
        """Gives `seq` pages for its first `tokens` positions, preempting the latest admitted running
        sequences while the pool is short. False if `seq` itself was preempted."""
        need = self.pages_for(tokens) - len(seq.pages)
        while need > self.pool.available:
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            planned.pop(victim.id, None)
            if victim is seq:
                return False
        seq.pages += self.pool.allocate(max(need, 0))
        return True

    def schedule(self) -> StepPlan:
        """The next step's plan (see the module docstring); pages are taken for it here."""
        planned: dict[int, Chunk] = {}  # by sequence id, in insertion order
        preempted: list[Sequence] = []

        def plan(seq: Sequence, n: int) -> None:
            end = seq.computed + n
            pending = seq.pending > 0 and end == seq.known
            tokens = [0] if pending else seq.tokens[seq.computed:end]  # a pending token only decodes
            planned[seq.id] = Chunk(seq, seq.row, seq.computed, tokens, (), sample=end == seq.known,
                                    pending=pending)

        for seq in [s for s in self.running if s.decoding and not s.complete]:
            if seq in self.running and self._grow(seq, seq.known, planned, preempted):
                plan(seq, 1)
        limit = self.max_batched_tokens if planned else self.idle_batched_tokens  # none waits for a token
        budget = limit - len(planned)
        for seq in [s for s in self.running if not s.decoding]:
            if seq not in self.running or budget <= 0:
                continue
            n = min(len(seq.tokens) - seq.computed, budget)
            if self._grow(seq, seq.computed + n, planned, preempted):
                plan(seq, n)
                budget -= n
            else:
                budget = limit - sum(len(c.tokens) for c in planned.values())
        while self.waiting and self._free_rows and budget > 0 and not preempted:
            seq = self.waiting[0]
            if seq.pending:  # preempted while its last sample was in flight: recomputed once it is known
                break
            n = self._admit(seq, budget)
            if n == 0:
                break
            plan(seq, n)
            budget -= n
        chunks = list(planned.values())
        for chunk in chunks:
            chunk.pages = tuple(chunk.seq.pages)
        return StepPlan(chunks=chunks, preempted=preempted)

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Admits the queue's head if its cached prefix and a first chunk fit; returns the chunk's length
        (0: not admitted)."""
        keys = P.page_keys(seq.tokens, self.pool.page_size) if self.pool.caching else []
        # At least the last known token is computed: its logits give the next token.
        hits = self.pool.lookup(keys[:(len(seq.tokens) - 1) // self.pool.page_size])
        n = min(len(seq.tokens) - len(hits) * self.pool.page_size, budget)
        idle_hits = sum(self.pool.refs(p) == 0 for p in hits)
        if self.pages_for(len(hits) * self.pool.page_size + n) - len(hits) + idle_hits > self.pool.available:
            return 0
        self.waiting.popleft()
        if self.pool.caching:
            self.prefix_queries += len(seq.tokens)
            self.prefix_hits += len(hits) * self.pool.page_size
        self.pool.take(hits)
        seq.pages, seq.keys = list(hits), keys[:len(hits)]
        seq.computed = len(hits) * self.pool.page_size
        seq.pages += self.pool.allocate(self.pages_for(seq.computed + n) - len(seq.pages))
        seq.row = heapq.heappop(self._free_rows)
        seq.admitted = self._admissions
        self._admissions += 1
        self.running.append(seq)
        return n

    def computed(self, plan: StepPlan) -> None:
        """Records that the plan was dispatched: its tokens' keys/values are (being) written into the
        pages, each sequence it samples holds a pending token, and full pages of known tokens join the
        prefix cache."""
        for chunk in plan.chunks:
            seq = chunk.seq
            if seq.row is None:  # finished (cancelled) since the plan
                continue
            seq.computed = chunk.start + len(chunk.tokens)
            seq.pending += chunk.sample
            self._register(seq)

    def append(self, seq: Sequence, token: int) -> None:
        """Brings a sequence's oldest pending token to the host."""
        seq.tokens.append(token)
        seq.pending -= 1
        if seq.row is not None:
            self._register(seq)

    def _register(self, seq: Sequence) -> None:
        """Full pages of computed, known tokens join the prefix cache."""
        if not self.pool.caching:
            return
        z = self.pool.page_size
        done, full = len(seq.keys), min(seq.computed, len(seq.tokens)) // z
        if full > done:
            parent = seq.keys[-1] if seq.keys else b""
            seq.keys += P.page_keys(seq.tokens[done * z:full * z], z, parent)
            for i in range(done, full):
                self.pool.register(seq.pages[i], seq.keys[i])
