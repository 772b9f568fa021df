"""The draft's prefix tree (speculative/draft_prefix.py): an entry is reused
only where the two tokens it was computed from match, at least the last pair
is left to compute, and the target gives back at most CATCH_UP_TOKENS of its
cached prefix so the head's context is whole."""

from __future__ import annotations

import torch

from radixserve.mem_cache.allocator import TokenAllocator
from radixserve.speculative.draft_prefix import CATCH_UP_TOKENS, DraftPrefixTree

VOCAB = 1000


def alloc(allocator: TokenAllocator, n: int) -> torch.Tensor:
    return allocator.alloc_extend([0], [n], [0])


def tree_with(tokens, total: int = 64) -> DraftPrefixTree:
    """A tree over a fresh pool holding the entries of one finished sequence."""
    allocator = TokenAllocator(total, page_size=1, device=torch.device("cpu"))
    prefix = DraftPrefixTree(allocator, VOCAB)
    slots = alloc(allocator, len(tokens) - 1)  # one entry per (token, next token) pair
    prefix.insert(tokens, None, slots, shared=0)
    return prefix


def test_an_entry_is_reused_only_where_its_next_token_matches_too():
    prefix = tree_with([5, 6, 7, 8, 9, 10])
    # tokens 0..2 match, token 3 differs: entries 0 and 1 ((5,6), (6,7)) hold; entry 2 paired 7 with 8
    slots, _ = prefix.match([5, 6, 7, 99, 4, 4, 4], None)
    assert len(slots) == 2
    # the whole sequence again: every entry but the last pair's, which the head must compute for a draft
    slots, _ = prefix.match([5, 6, 7, 8, 9, 10], None)
    assert len(slots) == 4
    # another namespace (a LoRA adapter) sees nothing
    assert prefix.match([5, 6, 7, 8, 9, 10], 3)[0] is None


def test_the_target_recomputes_a_little_of_its_prefix_for_the_head():
    tokens = list(range(1, 200))
    prefix = tree_with(tokens, total=256)
    cached = len(prefix.match(tokens + [0], None)[0])
    assert cached == len(tokens) - 1
    assert prefix.target_limit(tokens + [0], None, cached) == cached  # the head's entries reach as far
    assert prefix.target_limit(tokens + [0], None, cached + 1) == cached  # one token recomputed
    far = cached + CATCH_UP_TOKENS + 1
    assert prefix.target_limit(tokens + [0] * 100, None, far) == far  # too far: the head goes without
    assert prefix.target_limit([7] + tokens, None, 16) == 0  # the head has nothing here: the 16 are recomputed


def test_duplicates_are_freed_and_every_slot_is_accounted_for():
    allocator = TokenAllocator(64, page_size=1, device=torch.device("cpu"))
    prefix = DraftPrefixTree(allocator, VOCAB)
    first = [1, 2, 3, 4, 5]
    prefix.insert(first, None, alloc(allocator, 4), shared=0)
    # a second request shared the first 2 entries from the tree and computed 3 more itself
    shared, node = prefix.match(first[:3] + [8, 9, 9], None)
    prefix.lock(node)
    own = alloc(allocator, 3)
    second = first[:3] + [8, 9, 9]
    prefix.insert(second, None, torch.cat([shared, own]), shared=len(shared))
    prefix.unlock(node)
    assert prefix.size() == 4 + 3  # its own entries from position 2 on differ from the first's
    assert allocator.available_size() + prefix.size() == 64
    prefix.clear()
    assert prefix.size() == 0 and allocator.available_size() == 64


def test_a_busy_server_keeps_the_targets_whole_prefix():
    """While more requests run and wait than a speculating batch holds, an
    admitted request will decode plainly: the target keeps its whole cached
    prefix (no catch-up recomputed for the head); otherwise as above."""
    from types import SimpleNamespace

    from radixserve.speculative.draft_runner import DraftRunner
    from radixserve.speculative.worker import SpecWorker

    tokens = list(range(1, 60))
    draft = SimpleNamespace(prefix=tree_with([7, 8, 9]), catch_up=lambda: True)
    worker = SimpleNamespace(drafter=SimpleNamespace(draft=draft), max_batch_size=4)
    load = [1]
    SpecWorker.follow_load(worker, lambda: load[0])
    assert DraftRunner.target_limit(draft, tokens, None, 40) == 0  # idle: all 40 recomputed for the head
    load[0] = 16
    assert DraftRunner.target_limit(draft, tokens, None, 40) == 40  # busy: the target's 40 kept
    load[0] = 4
    assert DraftRunner.target_limit(draft, tokens, None, 40) == 0
