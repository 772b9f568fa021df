"""An EAGLE head's draft KV kept across requests, beside the target's radix cache.

Without it, a prefix the target takes from its radix cache (a shared system
prompt, the earlier turns of a chat) has no target features, so the head
drafts without seeing it, and drafts worse (measured in docs/benchmarks.md).

Draft entry p is computed from the target's features at position p, which
depend on tokens 0..p, and from token p + 1. So an entry can be reused by a
request whose tokens 0..p+1 equal the ones it was computed from: the tree's
keys are token pairs (t[p], t[p+1]), one per entry, in a RadixTree of
single-token pages over the draft runner's own slots.

The target's cache and this one are filled by the same finished requests, but
the draft's match is always one entry short of the shared tokens (the entry
of the last shared token pairs it with the next token, which differs), and
the target has no features for positions it took from its cache. So the
target gives back up to CATCH_UP_TOKENS of its cached prefix (recomputes
them) to make the head's context whole; when the draft's match is shorter
than that, the head goes without those positions, as before."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from radixserve.mem_cache.allocator import TokenAllocator
from radixserve.mem_cache.radix_tree import RadixTree, TreeNode

# At most this many tokens of the target's cached prefix are recomputed so the
# head gets their features (a page of the CPU pool is 16).
CATCH_UP_TOKENS = 64


class DraftPrefixTree:
    def __init__(self, allocator: TokenAllocator, vocab_size: int) -> None:
        assert allocator.page_size == 1
        self.tree = RadixTree(1, allocator.free)
        self.allocator = allocator
        self.vocab_size = vocab_size

    def pair_keys(self, tokens: Sequence[int], entries: int) -> List[int]:
        """Keys of the first `entries` draft entries of a sequence."""
        v = self.vocab_size
        return [a * v + b for a, b in zip(tokens[:entries], tokens[1:entries + 1])]

    # ---- lookup ----
    def match(self, tokens: Sequence[int], namespace: Optional[int]) -> Tuple[Optional[torch.Tensor], TreeNode]:
        """The cached entries of a sequence's first positions: (their slots,
        the deepest node). At least the last position pair is left to compute,
        so the head's extend ends at the last token and gives the first draft."""
        values, node = self.tree.match_prefix(self.pair_keys(tokens, len(tokens) - 2), namespace)
        return (torch.cat(values) if values else None), node

    def target_limit(self, tokens: Sequence[int], namespace: Optional[int], limit: int) -> int:
        """How many leading tokens the target may take from its cache (up to
        `limit`) so that the head has features from where its entries end."""
        # (a peek, no further than the target's match: the target asks for every request it orders)
        cached = self.tree.peek_len(self.pair_keys(tokens, min(limit, len(tokens) - 2)), namespace)
        return cached if cached < limit <= cached + CATCH_UP_TOKENS else limit

    # ---- ownership ----
    def lock(self, node: TreeNode) -> None:
        self.tree.lock(node)

    def unlock(self, node: Optional[TreeNode]) -> None:
        if node is not None:
            self.tree.unlock(node)

    def insert(self, tokens: Sequence[int], namespace: Optional[int], slots: torch.Tensor, shared: int) -> None:
        """Give the tree a finished request's entries (slots: positions 0..n-1;
        the first `shared` came from the tree); the request's copies of what
        the tree already held are freed."""
        cached = self.tree.insert(self.pair_keys(tokens, len(slots)), slots, namespace)
        if cached > shared:
            self.allocator.free(slots[shared:cached])

    def make_room(self, num_tokens: int) -> None:
        short = num_tokens - self.allocator.available_size()
        if short > 0:
            self.tree.evict(short)

    def clear(self) -> None:
        """Free every unlocked entry (all of them once no request holds one)."""
        self.tree.evict(self.tree.total_size())

    def size(self) -> int:
        return self.tree.total_size()
