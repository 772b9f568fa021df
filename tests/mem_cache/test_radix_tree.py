"""The radix tree against a plain reference: a dict from cached prefixes to slots."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.mem_cache.radix_tree import RadixTree

# Small alphabet and short keys, so prefixes are shared and diverge often.
keys = st.lists(st.integers(0, 2), min_size=0, max_size=12)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), keys),
        st.tuples(st.just("match"), keys),
        st.tuples(st.just("lock"), keys),
        st.tuples(st.just("unlock"), st.integers(0, 50)),
        st.tuples(st.just("evict"), st.integers(1, 20)),
    ),
    max_size=60,
)


class Reference:
    """Every cached page as (prefix tuple up to and including it) -> its slots;
    a prefix is cached iff all its shorter page-prefixes are."""

    def __init__(self, page: int) -> None:
        self.page = page
        self.pages: dict = {}

    def match_len(self, key) -> int:
        n = 0
        while n + self.page <= len(key) and tuple(key[: n + self.page]) in self.pages:
            n += self.page
        return n

    def slots_of(self, key, n) -> list:
        return [s for i in range(0, n, self.page) for s in self.pages[tuple(key[: i + self.page])]]


def run(page: int, program) -> None:
    freed = []
    tree = RadixTree(page, lambda slots: freed.extend(slots.tolist()))
    ref = Reference(page)
    next_slot = [100]
    locks = []  # (node, prefixes of the pages it pins)
    for op, arg in program:
        if op == "insert":
            key = arg[: len(arg) // page * page]
            value = torch.arange(next_slot[0], next_slot[0] + len(key))
            next_slot[0] += len(key)
            cached = tree.insert(key, value)
            assert cached == ref.match_len(key)
            for i in range(cached, len(key), page):
                ref.pages[tuple(key[: i + page])] = value[i:i + page].tolist()
        elif op in ("match", "lock"):
            values, node = tree.match_prefix(arg)
            got = torch.cat(values).tolist() if values else []
            n = ref.match_len(arg)
            assert got == ref.slots_of(arg, n)
            if op == "lock":
                tree.lock(node)
                locks.append((node, {tuple(arg[: i + page]) for i in range(0, n, page)}))
        elif op == "unlock" and locks:
            node, _ = locks.pop(arg % len(locks))
            tree.unlock(node)
        elif op == "evict":
            before = len(freed)
            tree.evict(arg)
            gone = set(freed[before:])
            pinned = {s for _, ps in locks for p in ps for s in ref.pages[p]}
            assert not gone & pinned, "evicted a locked token"
            assert all(set(v) <= gone or not set(v) & gone for v in ref.pages.values())
            ref.pages = {p: v for p, v in ref.pages.items() if not set(v) & gone}
            # Eviction takes leaves: what is left is still prefix-closed.
            assert all(len(p) == page or p[:-page] in ref.pages for p in ref.pages)
        protected = len({p for _, ps in locks for p in ps}) * page
        assert tree.protected_size() == protected
        assert tree.evictable_size() + tree.protected_size() == len(ref.pages) * page
    for node, _ in locks:
        tree.unlock(node)
    tree.evict(10**9)
    assert tree.evictable_size() == 0 and sorted(freed) == sorted(set(freed))


@settings(max_examples=200, deadline=None)
@given(program=ops)
def test_tree_matches_reference(program):
    run(1, program)


@settings(max_examples=200, deadline=None)
@given(program=ops)
def test_page_aligned_tree_matches_reference(program):
    run(4, program)


def test_lru_evicts_oldest_leaf_first():
    freed = []
    tree = RadixTree(1, lambda s: freed.extend(s.tolist()))
    tree.insert([1, 2, 3], torch.tensor([10, 11, 12]))
    tree.insert([1, 2, 4], torch.tensor([10, 11, 13]))
    tree.insert([5], torch.tensor([20]))
    tree.match_prefix([1, 2, 3])  # refresh [1,2,3]
    tree.evict(1)
    assert freed == [13]  # the [.., 4] leaf was least recently used
    assert tree.evict(1) == 1 and freed[-1] == 20


def test_peek_len_counts_what_match_would_take_and_changes_nothing():
    tree = RadixTree(2, lambda s: None)
    tree.insert([1, 2, 3, 4], torch.tensor([10, 11, 12, 13]))
    tree.insert([1, 2, 3, 4], torch.tensor([30, 31, 32, 33]), namespace=7)
    before = [(n.key, n.hits, n.last_access) for n in tree._leaves()]
    assert tree.peek_len([1, 2, 3, 9, 9]) == 2  # pages of 2: the shared page only
    assert tree.peek_len([1, 2, 3, 4, 5]) == 4
    assert tree.peek_len([1, 2], namespace=7) == 2 and tree.peek_len([1, 2], namespace=8) == 0
    assert [(n.key, n.hits, n.last_access) for n in tree._leaves()] == before  # no split, no access
    assert sum(map(len, tree.match_prefix([1, 2, 3, 4, 5])[0])) == 4
