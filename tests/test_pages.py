"""The page allocator and prefix cache alone: reference counts, the hash chain, least-recently-released
eviction, and no page leaked after random traffic."""

import numpy as np
import pytest

from jaxfire.engine.pages import NULL_PAGE, PagePool, page_keys


def test_the_null_page_is_never_handed_out_and_references_count():
    pool = PagePool(num_pages=5, page_size=4)
    pages = pool.allocate(4)
    assert sorted(pages) == [1, 2, 3, 4] and NULL_PAGE not in pages
    assert pool.used == 4 and pool.available == 0
    with pytest.raises(ValueError):
        pool.allocate(1)
    pool.register(pages[0], b"k")
    pool.take([pages[0]])  # a second sequence shares it
    pool.release(pages)
    assert pool.refs(pages[0]) == 1 and pool.used == 1 and pool.cached == 0
    pool.release([pages[0]])
    assert pool.used == 0 and pool.cached == 1 and pool.available == 4


def test_each_key_covers_every_token_before_its_page():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 1000, 21).tolist()
    b = list(a)
    b[2] += 1  # differs in the first page only
    ka, kb = page_keys(a, 4), page_keys(b, 4)
    assert len(ka) == 5  # the partial last page has no key
    assert ka == page_keys(a[:20] + [7], 4)  # the partial page's tokens do not matter
    assert all(x != y for x, y in zip(ka, kb))  # later pages hold the same tokens, yet their keys differ
    assert page_keys(a[8:], 4, parent=ka[1]) == ka[2:]  # the chain continues from a parent


def test_lookup_takes_the_longest_cached_run_from_the_first_page():
    pool = PagePool(num_pages=8, page_size=2)
    keys = page_keys(list(range(8)), 2)
    pages = pool.allocate(4)
    for p, k in zip(pages, keys):
        pool.register(p, k)
    pool.release(pages)
    assert pool.lookup(keys) == pages
    assert pool.lookup(keys[:2] + page_keys([9, 9], 2, keys[1])) == pages[:2]
    assert pool.lookup(page_keys([5, 5, 2, 3], 2)) == []  # same second page's tokens, other parent


def test_unreferenced_cached_pages_are_evicted_least_recently_released_first():
    pool = PagePool(num_pages=6, page_size=1)
    pages = pool.allocate(5)
    keys = page_keys([10, 11, 12, 13, 14], 1)
    for p, k in zip(pages, keys):
        pool.register(p, k)
    pool.release([pages[3]])
    pool.release([pages[0], pages[1]])  # released last first: pages[1], then pages[0]
    pool.release([pages[4]])
    assert pool.cached == 4 and pool.available == 4
    pool.take([pages[1]])  # a hit leaves the queue: not evictable while referenced
    assert pool.available == 3
    got = pool.allocate(2)
    assert got == [pages[3], pages[0]]  # the oldest released go first
    assert pool.lookup(keys[3:4]) == [] and pool.lookup(keys[:1]) == []  # evicted pages lose their keys
    assert pool.lookup(keys[4:]) == [pages[4]]


def test_never_cached_pages_go_before_cached_ones():
    pool = PagePool(num_pages=4, page_size=2)
    a = pool.allocate(1)
    pool.register(a[0], b"x")
    pool.release(a)
    assert pool.allocate(2) == [2, 3]  # the cached page waits
    assert pool.lookup([b"x"]) == a


def test_without_caching_no_page_is_kept():
    pool = PagePool(num_pages=4, page_size=2, caching=False)
    pages = pool.allocate(3)
    pool.register(pages[0], b"x")
    pool.release(pages)
    assert pool.cached == 0 and pool.lookup([b"x"]) == [] and pool.available == 3


def test_random_traffic_leaks_no_reference():
    rng = np.random.default_rng(1)
    pool = PagePool(num_pages=17, page_size=2)
    held: list[list[int]] = []
    for _ in range(500):
        if held and (rng.random() < 0.5 or pool.available == 0):
            pool.release(held.pop(int(rng.integers(len(held)))))
            continue
        prompt = rng.integers(0, 3, int(rng.integers(2, 9))).tolist()  # few ids: many shared prefixes
        keys = page_keys(prompt, 2)
        hits = pool.lookup(keys)
        want = len(keys) - len(hits)
        if want + sum(pool.refs(p) == 0 for p in hits) > pool.available:
            continue
        pool.take(hits)
        pages = hits + pool.allocate(want)
        for p, k in zip(pages, keys):
            pool.register(p, k)
        assert len(set(pages)) == len(pages)
        held.append(pages)
        assert pool.used + pool.available == pool.capacity
    for pages in held:
        pool.release(pages)
    assert pool.used == 0 and all(pool.refs(p) == 0 for p in range(pool.num_pages))
