"""Top-K draft trees (EAGLE-3 or STANDALONE with --speculative-eagle-topk K > 1), the
bookkeeping without any model: candidates with cumulative log-probabilities,
the frontier kept after each draft step, and the final tree.

Step 1 takes the head's K likeliest tokens after the request's last token
(the root's children). Each later step expands the current frontier (at most
K nodes): every frontier node gets its K likeliest continuations, and the K
best of those candidates (by cumulative log-probability, the sum of the
log-probabilities along the path) become the next frontier. The tree is then
the `budget` best candidates of all levels. A child's score is its parent's
plus a log-probability <= 0, so a parent scores at least as high; ties rank
the shallower node first, then the earlier-made one, so the chosen set always
holds every chosen node's ancestors and never depends on sort stability."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Sequence

from radixserve.speculative.tree import DraftTree, to_int64


@dataclass
class Candidate:
    token: int
    parent: int  # index of the parent candidate, -1 for a child of the root
    depth: int  # 1 for the root's children
    score: float  # cumulative log-probability along the path
    source: Any = None  # what the drafter needs to expand it (EAGLE-3: its input hidden state)


@dataclass
class StepRows:
    """One request's rows in a draft step: candidates in row order, each
    row's visibility mask over them (tree.py's layout: itself and its
    ancestors), and the rows of the frontier (the ones whose logits are read)."""

    nodes: List[int]
    masks: List[int]
    frontier_rows: List[int]


@dataclass
class TopKTree:
    """One request's candidates while drafting."""

    topk: int
    candidates: List[Candidate] = field(default_factory=list)
    frontier: List[int] = field(default_factory=list)  # candidates the next step expands

    def rank_key(self, i: int):
        c = self.candidates[i]
        return (-c.score, c.depth, i)

    def expand(self, parents: Sequence[int], tokens: Sequence[Sequence[int]], logprobs: Sequence[Sequence[float]],
               sources: Sequence[Any] = ()) -> None:
        """Children of each of `parents` (-1: the root) from its top-K
        (tokens, log-probabilities), best first; then the next frontier: the
        K best of these new candidates. sources[i]: the new children's `source`."""
        new: List[int] = []
        for n, parent in enumerate(parents):
            base = 0.0 if parent < 0 else self.candidates[parent].score
            depth = 1 if parent < 0 else self.candidates[parent].depth + 1
            seen = set()
            for token, lp in zip(tokens[n], logprobs[n]):
                # (siblings must differ; a draft vocabulary maps to distinct target ids, this is a guard)
                if token in seen or math.isnan(lp) or lp == -math.inf:
                    continue
                seen.add(token)
                self.candidates.append(Candidate(token, parent, depth, base + lp,
                                                 sources[n] if n < len(sources) else None))
                new.append(len(self.candidates) - 1)
        self.frontier = sorted(new, key=self.rank_key)[:self.topk]

    def lineage(self) -> List[int]:
        """The frontier and all its ancestors, parents before children (a
        step's rows: each frontier node attends to its own ancestors)."""
        keep = set()
        for i in self.frontier:
            while i >= 0 and i not in keep:
                keep.add(i)
                i = self.candidates[i].parent
        return sorted(keep, key=lambda i: (self.candidates[i].depth, i))

    def step_rows(self) -> "StepRows":
        """The next draft step's rows for this request (its lineage)."""
        nodes = self.lineage()
        row_of = {n: r for r, n in enumerate(nodes)}
        masks: List[int] = []
        for n in nodes:
            parent = self.candidates[n].parent
            masks.append((1 << row_of[n]) | (masks[row_of[parent]] if parent >= 0 else 0))
        return StepRows(nodes, [to_int64(m) for m in masks], [row_of[n] for n in self.frontier])

    def best_tree(self, budget: int) -> DraftTree:
        return select_tree(self.candidates, budget)


def select_tree(candidates: Sequence[Candidate], budget: int) -> DraftTree:
    """The `budget` best candidates as a DraftTree in BFS order: level by
    level, grouped under their parents in the parents' order, best first
    within a family (so each node's first child is its likeliest)."""

    def key(i: int):
        return (-candidates[i].score, candidates[i].depth, i)

    chosen = sorted(range(len(candidates)), key=key)[:max(budget, 0)]
    position = {-1: -1}  # candidate -> its index in the tree
    tree_tokens: List[int] = []
    tree_parents: List[int] = []
    for depth in sorted({candidates[i].depth for i in chosen}):
        level = [i for i in chosen if candidates[i].depth == depth]
        for i in sorted(level, key=lambda i: (position[candidates[i].parent],) + key(i)):
            position[i] = len(tree_tokens)
            tree_tokens.append(candidates[i].token)
            tree_parents.append(position[candidates[i].parent])
    return DraftTree(tree_tokens, tree_parents)
