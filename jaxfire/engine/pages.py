"""The page allocator and the prefix cache: which pages of the paged KV cache each sequence holds.

Pages are ids into the device pool (`jaxfire.paged_cache`); page 0 is the null page, which padding
rows write to, and is never handed out. A page is referenced by every sequence whose page table holds
it; a sequence takes new pages as it grows and drops its references when it ends or is preempted.

Prefix caching: a full page (all `page_size` positions written) is keyed by a hash chain of tokens,
`key(page i) = H(key(page i-1), tokens of page i)`, so one key names the page's tokens and every token
before them: two prompts share a page only if they agree up to its end. A request looks up the keys of
its prompt's full pages, takes the longest run already cached (a reference each, no copy) and prefills
only the rest. A page whose last reference goes keeps its key and waits in a least-recently-released
queue; a new page comes from the never-cached free pages first, then by evicting that queue's oldest
page (which loses its key). A sequence releases its pages last to first, so a chain's tail goes before
its head, which more prompts share.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Sequence

import numpy as np

NULL_PAGE = 0


def page_keys(tokens: Sequence[int], page_size: int, parent: bytes = b"") -> list[bytes]:
    """The hash-chain keys of the full pages of `tokens` (a partial last page has none)."""
    keys = []
    ids = np.asarray(tokens, np.int64)
    for i in range(len(ids) // page_size):
        parent = hashlib.blake2b(parent + ids[i * page_size:(i + 1) * page_size].tobytes(), digest_size=16).digest()
        keys.append(parent)
    return keys


class PagePool:
    """Page ids `1 .. num_pages - 1` with reference counts, and the prefix cache over them.

    Pure bookkeeping: no device work. `caching=False` keeps no keys (every released page is free).
    """

    def __init__(self, num_pages: int, page_size: int, caching: bool = True):
        self.num_pages = num_pages  # the null page included
        self.page_size = page_size
        self.caching = caching
        self._refs = [0] * num_pages
        self._fresh = collections.deque(range(1, num_pages))  # unreferenced, holding no key
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # unreferenced, keyed; oldest first
        self._page_of: dict[bytes, int] = {}  # key -> cached page
        self._key_of: dict[int, bytes] = {}  # cached page -> key

    @property
    def capacity(self) -> int:
        """Pages a sequence may ever hold (all but the null page)."""
        return self.num_pages - 1

    @property
    def available(self) -> int:
        """Pages `allocate` can hand out now: never-cached free ones and unreferenced cached ones."""
        return len(self._fresh) + len(self._lru)

    @property
    def used(self) -> int:
        """Pages referenced by at least one sequence."""
        return self.capacity - self.available

    @property
    def cached(self) -> int:
        """Unreferenced pages kept for their key."""
        return len(self._lru)

    def refs(self, page: int) -> int:
        return self._refs[page]

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The cached pages of the longest run of `keys` from the first (no reference taken)."""
        pages = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def take(self, pages: Sequence[int]) -> None:
        """A reference to each of these cached pages (from `lookup`), which leave the eviction queue."""
        for page in pages:
            if self._refs[page] == 0:
                del self._lru[page]
            self._refs[page] += 1

    def allocate(self, n: int) -> list[int]:
        """`n` new pages, one reference each: never-cached ones first, then the least recently released
        cached ones, which lose their keys. The caller checks `available` first."""
        if n > self.available:
            raise ValueError(f"{n} pages asked for, {self.available} available")
        pages = []
        for _ in range(n):
            if self._fresh:
                page = self._fresh.popleft()
            else:
                page, _ = self._lru.popitem(last=False)
                del self._page_of[self._key_of.pop(page)]
            self._refs[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: Sequence[int]) -> None:
        """Drops one reference to each page, last first; a page left unreferenced is cached if it has a
        key, else free."""
        for page in reversed(pages):
            assert self._refs[page] > 0, f"page {page} released with no reference"
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._key_of:
                    self._lru[page] = None
                else:
                    self._fresh.append(page)

    def register(self, page: int, key: bytes) -> None:
        """Caches a referenced, now full page under its key (no-op if the key is cached already, by
        another page holding the same tokens, or with caching off)."""
        if not self.caching or key in self._page_of or page in self._key_of:
            return
        self._page_of[key] = page
        self._key_of[page] = key
