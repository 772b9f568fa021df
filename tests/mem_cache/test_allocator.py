"""The token allocator against a plain set-of-slots model (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.mem_cache.allocator import TokenAllocator

# A program: each step starts a request (prompt length), extends one, or frees one.
steps = st.lists(
    st.tuples(st.sampled_from(["new", "extend", "decode", "free"]), st.integers(1, 9), st.integers(0, 50)),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(page_size=st.sampled_from([1, 4]), program=steps)
def test_allocator_matches_reference(page_size, program):
    total = 64
    alloc = TokenAllocator(total, page_size, torch.device("cpu"))
    reqs: list[list[int]] = []  # each request's slots, in position order
    for op, n, pick in program:
        if op == "new":
            out = alloc.alloc_extend([0], [n], [0])
            if out is not None:
                reqs.append(out.tolist())
        elif op in ("extend", "decode") and reqs:
            slots = reqs[pick % len(reqs)]
            add = 1 if op == "decode" else n
            if op == "decode":
                out = alloc.alloc_decode(torch.tensor([len(slots)]), torch.tensor([slots[-1]]))
            else:
                out = alloc.alloc_extend([len(slots)], [len(slots) + add], [slots[-1]])
            if out is not None:
                assert len(out) == add
                slots.extend(out.tolist())
        elif op == "free" and reqs:
            alloc.free(torch.tensor(reqs.pop(pick % len(reqs))))
        held = [s for r in reqs for s in r]
        # No slot is handed out twice, slot 0..P-1 (the padding page) never.
        assert len(held) == len(set(held))
        assert all(s >= page_size for s in held)
        # Positions of a request fill its pages in order: position i sits at
        # offset i % P of its page.
        for r in reqs:
            assert all(s % page_size == i % page_size for i, s in enumerate(r))
        # Conservation: every page is either free or holds some request's tokens.
        used_pages = {s // page_size for s in held}
        assert alloc.available_size() + len(used_pages) * page_size == alloc.total_tokens
    for r in reqs:
        alloc.free(torch.tensor(r))
    assert alloc.available_size() == alloc.total_tokens


def test_cpu_hands_freed_pages_out_first():
    """On the CPU a finished request's pages are the next ones handed out (its
    memory is already faulted in and likely cached); the untouched rest of the
    pool waits until they are used up."""
    alloc = TokenAllocator(64, 4, torch.device("cpu"))
    first = alloc.alloc_extend([0], [8], [0])  # pages 1, 2
    alloc.alloc_extend([0], [8], [0])  # pages 3, 4
    alloc.free(first)
    assert torch.equal(alloc.alloc_extend([0], [4], [0]), torch.arange(4, 8))  # page 1 again
    assert torch.equal(alloc.alloc_decode(torch.tensor([0]), torch.tensor([0])), torch.tensor([8]))  # page 2
    assert torch.equal(alloc.alloc_decode(torch.tensor([0]), torch.tensor([0])), torch.tensor([20]))  # then page 5


def test_cpu_refuses_a_page_freed_twice():
    """The CPU's free pages are a stack as deep as the pool: freeing a page
    that is already free would hand it to two requests later, so it raises."""
    alloc = TokenAllocator(16, 4, torch.device("cpu"))
    slots = alloc.alloc_extend([0], [16], [0])
    alloc.free(slots)
    with pytest.raises(RuntimeError, match="freed twice"):
        alloc.free(slots[:4])
    assert alloc.available_size() == alloc.total_tokens
