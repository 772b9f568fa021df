"""Draft trees: a request's draft tokens as a tree hanging off its last token.

A verify step lays each request's tree out as one extend: row 0 is the root
(the request's last token, which has no KV yet), rows 1.. the drafts in BFS
order. Draft j stands at position prefix_len + depth(j) and sees the request's
whole prefix plus its own ancestors and itself, nothing else of the tree: each
row carries a bitmask over its request's rows (bit k: row k is visible), which
both attention backends read (`ForwardBatch.spec_tree_mask`). A chain is the
tree whose every node is its predecessor's child; its masks are the causal ones.

Acceptance walks every request's tree at once on the device (`TreeWalk`): from
the root, the child whose token equals the token the target chose at the
current node, until no child matches; the target's token at the last node
reached is the bonus token."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence, Tuple, Union

import torch

# One int64 bitmask per verify row: a request verifies at most this many rows
# (its root and its drafts; spec_args, torch-free, checks the flags against a copy).
MAX_TREE_ROWS = 64


@dataclass
class DraftTree:
    """Drafts in BFS order; parents[j] is the index of draft j's parent among
    them, -1 for a child of the root (the request's last token)."""

    tokens: List[int] = field(default_factory=list)
    parents: List[int] = field(default_factory=list)
    depths: List[int] = field(init=False)  # 1 for the root's children

    def __post_init__(self) -> None:
        assert len(self.tokens) == len(self.parents)
        self.depths = []
        for j, p in enumerate(self.parents):
            assert -1 <= p < j, "a parent comes before its children (BFS order)"
            self.depths.append(1 if p < 0 else self.depths[p] + 1)
        assert self.depths == sorted(self.depths), "BFS order: depths never decrease"
        # The walk follows the one child whose token the target chose.
        assert len(set(zip(self.parents, self.tokens))) == len(self.tokens), "siblings hold distinct tokens"

    @classmethod
    def chain(cls, tokens: Sequence[int]) -> "DraftTree":
        return cls(list(tokens), list(range(-1, len(tokens) - 1)))

    def __len__(self) -> int:
        return len(self.tokens)

    def is_chain(self) -> bool:
        return all(p == j - 1 for j, p in enumerate(self.parents))

    @property
    def max_depth(self) -> int:
        return self.depths[-1] if self.depths else 0

    def on_first_branch(self, rows: Sequence[int]) -> bool:
        """Whether an accepted path (verify rows) took each node's first child
        every time (for a BFS-ranked tree: the drafter's best guess)."""
        firsts = {}
        for row, parent in enumerate(self.row_parents()):
            firsts.setdefault(parent, row)
        parents = self.row_parents()
        return all(firsts[parents[r]] == r for r in rows)

    # ---- the verify layout: row 0 the root, row j + 1 draft j ----
    def row_parents(self) -> List[int]:
        return [-1] + [p + 1 for p in self.parents]

    def row_depths(self) -> List[int]:
        return [0] + self.depths

    def row_masks(self) -> List[int]:
        """Per verify row, the rows it sees (itself and its ancestors) as the
        bits of a signed int64."""
        masks: List[int] = []
        for row, parent in enumerate(self.row_parents()):
            masks.append((1 << row) | (masks[parent] if parent >= 0 else 0))
        return [to_int64(m) for m in masks]


Drafts = Union[DraftTree, Sequence[int]]


def as_tree(drafts: Drafts) -> DraftTree:
    """A drafter's proposal as a tree (a plain token list is a chain)."""
    return drafts if isinstance(drafts, DraftTree) else DraftTree.chain(drafts)


def to_int64(bits: int) -> int:
    """Bits 0..63 as the signed int64 with the same bit pattern."""
    return bits - (1 << 64) if bits >= 1 << 63 else bits


def causal_row_masks(width: int) -> List[int]:
    """The masks of a chain of `width` rows: row j sees rows 0..j."""
    return [to_int64((1 << (j + 1)) - 1) for j in range(width)]


@dataclass
class TreeWalk:
    """Every request's tree of one verify step, padded to the widest, on the device."""

    first_rows: torch.Tensor  # [bs] each request's root row among the verified rows
    tokens: torch.Tensor  # [bs, width] verify-layout tokens (the root's and padding: -1)
    parents: torch.Tensor  # [bs, width] verify-layout parents (padding: -2, nobody's child)
    max_depth: int

    @classmethod
    def build(cls, trees: List[DraftTree], last_logit_rows: torch.Tensor) -> "TreeWalk":
        dev = last_logit_rows.device
        width = 1 + max(len(t) for t in trees)
        tokens = [[-1] + t.tokens + [-1] * (width - 1 - len(t)) for t in trees]
        parents = [t.row_parents() + [-2] * (width - 1 - len(t)) for t in trees]
        sizes = torch.tensor([len(t) for t in trees], device=dev)
        return cls(last_logit_rows - sizes, torch.tensor(tokens, dtype=torch.int64, device=dev),
                   torch.tensor(parents, dtype=torch.int64, device=dev), max(t.max_depth for t in trees))

    def child(self, node: torch.Tensor, token: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(the child of each request's `node` whose draft is `token`, whether
        there is one). Siblings hold distinct tokens, so at most one matches."""
        match = (self.parents == node[:, None]) & (self.tokens == token[:, None])
        return match.int().argmax(1), match.any(1)


def accepted_rows(node_ids: List[List[int]], counts: List[int]) -> List[List[int]]:
    """Per request, the verify rows of its accepted drafts: node_ids[r][d] is
    the node reached at depth d + 1, valid for d < counts[r] - 1."""
    return [nodes[:n - 1] for nodes, n in zip(node_ids, counts)]
