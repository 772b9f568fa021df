"""NGRAM drafts: no model; the continuation of the longest n-gram of the
request's own history (prompt and output so far) that ended the history
earlier too. Repetitive tasks (rewriting a given text, code edits) accept many.

Each request keeps an index from n-gram to the positions where it ended, fed
incrementally as tokens arrive, so a lookup costs the longest n-gram's length.

Trees (--speculative-ngram-max-bfs-breadth > 1): the continuations after the
longest matched n-gram's latest occurrences form a trie (each token with the
number of occurrences through it and the latest of them); a draft tree of up
to num_draft_tokens - 1 nodes and num_steps levels is taken from it. BFS:
level by level, each node's children latest first (then most frequent), at
most `breadth` of them, the breadth falling from the max at the first level
to the min at the deepest; so its first branch is the chain BFS drafts. PROB:
the nodes of highest estimated probability (the product of each step's share
of the occurrences), most frequent first (then latest), under the same
breadths. Breadth 1 keeps the chain exactly as before."""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Sequence, Tuple

from radixserve.speculative.tree import DraftTree

RECENT_ENDS = 8  # positions kept per n-gram (the latest wins; PROB counts over these)


@dataclass
class NgramIndex:
    """n-gram (a tuple of 1..max_n tokens) -> the positions just after its latest occurrences."""

    max_n: int
    capacity: int
    ends: Dict[Tuple[int, ...], Deque[int]] = field(default_factory=lambda: defaultdict(
        lambda: deque(maxlen=RECENT_ENDS)))
    indexed: int = 0  # tokens of the history indexed so far

    def update(self, history: Sequence[int]) -> None:
        for end in range(self.indexed + 1, len(history) + 1):
            if len(self.ends) >= self.capacity:
                break  # full: older n-grams still match, new ones are not indexed
            for n in range(1, min(self.max_n, end) + 1):
                self.ends[tuple(history[end - n:end])].append(end)
        self.indexed = len(history)

    def latest_match(self, history: Sequence[int]) -> List[int]:
        """The positions just after the longest suffix of history that occurred
        earlier (the latest last), or [] when none did."""
        length = len(history)
        for n in range(min(self.max_n, length - 1), 0, -1):
            ends = [e for e in self.ends.get(tuple(history[length - n:]), ()) if e < length]
            if ends:
                return ends
        return []

    def propose_tree(self, history: Sequence[int], shape: "TreeShape", by_frequency: bool) -> DraftTree:
        """A draft tree continuing history (empty when no n-gram matched)."""
        ends = self.latest_match(history)
        if not ends:
            return DraftTree()
        trie = continuation_trie(history, ends, shape.max_depth)
        pick = best_first if by_frequency else level_by_level
        return pick(trie, shape, by_frequency)

    def propose(self, history: Sequence[int], num_tokens: int, by_frequency: bool) -> List[int]:
        """Up to num_tokens tokens continuing history (a chain); [] when no n-gram matched."""
        ends = self.latest_match(history)
        if not ends:
            return []
        if by_frequency:
            # the most frequent next token, taken from its latest occurrence
            best, _ = Counter(history[e] for e in ends).most_common(1)[0]
            ends = [e for e in ends if history[e] == best]
        start = ends[-1]
        return list(history[start:start + num_tokens])


@dataclass(frozen=True)
class TreeShape:
    """How big a draft tree may grow."""

    max_nodes: int  # drafts (num_draft_tokens - 1)
    max_depth: int  # levels (num_steps)
    min_breadth: int
    max_breadth: int

    def breadth(self, depth: int) -> int:
        """Children a node at `depth` - 1 may have (depth 1: the root's): from
        the max at the first level down to the min at the deepest, since each
        level's guess rests on the ones above it."""
        if self.max_depth <= 1:
            return self.max_breadth
        fall = (self.max_breadth - self.min_breadth) * (depth - 1) / (self.max_depth - 1)
        return max(self.min_breadth, round(self.max_breadth - fall))


@dataclass
class TrieNode:
    """A token continuing the matched n-gram, over `count` of its occurrences."""

    token: int
    count: int = 0
    latest: int = -1  # the latest occurrence (its end position) through this node
    children: Dict[int, "TrieNode"] = field(default_factory=dict)

    def ranked(self, by_frequency: bool) -> List["TrieNode"]:
        if by_frequency:
            return sorted(self.children.values(), key=lambda c: (-c.count, -c.latest))
        return sorted(self.children.values(), key=lambda c: (-c.latest, -c.count))


def continuation_trie(history: Sequence[int], ends: Sequence[int], max_depth: int) -> TrieNode:
    """The trie of history[e:e + max_depth] over the matched n-gram's ends."""
    root = TrieNode(-1, count=len(ends))
    for end in ends:
        node = root
        for token in history[end:end + max_depth]:
            node = node.children.setdefault(token, TrieNode(token))
            node.count += 1
            node.latest = max(node.latest, end)
    return root


def level_by_level(root: TrieNode, shape: TreeShape, by_frequency: bool) -> DraftTree:
    """BFS: each level's nodes in order, each taking its best children up to
    the level's breadth, until the node budget is spent."""
    tree = DraftTree()
    frontier: List[Tuple[TrieNode, int]] = [(root, -1)]
    for depth in range(1, shape.max_depth + 1):
        below: List[Tuple[TrieNode, int]] = []
        for node, index in frontier:
            for child in node.ranked(by_frequency)[:shape.breadth(depth)]:
                if len(tree.tokens) == shape.max_nodes:
                    return _finished(tree)
                tree.tokens.append(child.token)
                tree.parents.append(index)
                below.append((child, len(tree.tokens) - 1))
        frontier = below
    return _finished(tree)


def best_first(root: TrieNode, shape: TreeShape, by_frequency: bool) -> DraftTree:
    """PROB: the max_nodes nodes of highest path probability (a node's share
    of its parent's occurrences, times its parent's), each node's children
    limited to its level's breadth; laid out in BFS order."""
    chosen = set()  # id() of the nodes taken
    heap: List[Tuple[float, int, TrieNode, int]] = []  # (-probability, offer order, node, depth)
    tie = 0

    def offer(parent: TrieNode, prob: float, depth: int) -> None:
        nonlocal tie
        if depth > shape.max_depth:
            return
        for child in parent.ranked(by_frequency)[:shape.breadth(depth)]:
            tie += 1  # earlier offers (better ranked) win ties
            heapq.heappush(heap, (-prob * child.count / parent.count, tie, child, depth))

    offer(root, 1.0, 1)
    while heap and len(chosen) < shape.max_nodes:
        neg_prob, _, node, depth = heapq.heappop(heap)
        chosen.add(id(node))
        offer(node, -neg_prob, depth + 1)
    tree = DraftTree()
    frontier: List[Tuple[TrieNode, int]] = [(root, -1)]
    while frontier:
        below = []
        for node, index in frontier:
            for child in node.ranked(by_frequency):
                if id(child) in chosen:
                    tree.tokens.append(child.token)
                    tree.parents.append(index)
                    below.append((child, len(tree.tokens) - 1))
        frontier = below
    return _finished(tree)


def _finished(tree: DraftTree) -> DraftTree:
    return DraftTree(tree.tokens, tree.parents)  # (its depths computed and checked)


class NgramDrafter:
    """Drafts for a batch of requests from each one's own n-gram index: a chain
    each, or a tree each when tree_shape allows more than one branch."""

    def __init__(self, num_steps: int, max_trie_depth: int, capacity: int, match_type: str,
                 tree_shape: Optional[TreeShape] = None) -> None:
        self.num_steps = num_steps
        self.max_n = max_trie_depth
        self.capacity = capacity
        self.by_frequency = match_type == "PROB"
        self.tree_shape = tree_shape if tree_shape is not None and tree_shape.max_breadth > 1 else None
        self.indexes: Dict[str, NgramIndex] = {}

    @property
    def makes_trees(self) -> bool:
        return self.tree_shape is not None

    def propose(self, reqs: Sequence, vocab_size: int) -> list:
        """Per request a token list (a chain) or, with a tree shape, a DraftTree."""
        live = {r.rid for r in reqs}
        for rid in [rid for rid in self.indexes if rid not in live]:
            del self.indexes[rid]  # the request ended or left the running batch
        drafts = []
        for req in reqs:
            history = req.fill_ids
            index = self.indexes.get(req.rid)
            if index is None or index.indexed > len(history):
                index = self.indexes[req.rid] = NgramIndex(self.max_n, self.capacity)
            index.update(history)
            if self.tree_shape is None:
                drafts.append(index.propose(history, self.num_steps, self.by_frequency))
            else:
                drafts.append(index.propose_tree(history, self.tree_shape, self.by_frequency))
        return drafts

    def commit(self, reqs: Sequence) -> None:
        """Nothing to undo: the index only ever holds the real history."""
