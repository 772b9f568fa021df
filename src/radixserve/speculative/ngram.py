"""NGRAM drafts: no model; the continuation of the longest n-gram of the
request's own history (prompt and output so far) that ended the history
earlier too. Repetitive tasks (rewriting a given text, code edits) accept many.

Each request keeps an index from n-gram to the positions where it ended, fed
incrementally as tokens arrive, so a lookup costs the longest n-gram's length."""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Sequence, Tuple

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

    def propose(self, history: Sequence[int], num_tokens: int, by_frequency: bool) -> List[int]:
        """Up to num_tokens tokens continuing history; [] when no n-gram matched."""
        length = len(history)
        for n in range(min(self.max_n, length - 1), 0, -1):
            ends = [e for e in self.ends.get(tuple(history[length - n:]), ()) if e < length]
            if not ends:
                continue
            if by_frequency:
                # the most frequent next token, taken from its latest occurrence
                best, _ = Counter(history[e] for e in ends).most_common(1)[0]
                ends = [e for e in ends if history[e] == best]
            start = ends[-1]
            return list(history[start:start + num_tokens])
        return []


class NgramDrafter:
    """Drafts for a batch of requests from each one's own n-gram index."""

    def __init__(self, num_steps: int, max_trie_depth: int, capacity: int, match_type: str) -> None:
        self.num_steps = num_steps
        self.max_n = max_trie_depth
        self.capacity = capacity
        self.by_frequency = match_type == "PROB"
        self.indexes: Dict[str, NgramIndex] = {}

    def propose(self, reqs: Sequence, vocab_size: int) -> List[List[int]]:
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
            drafts.append(index.propose(history, self.num_steps, self.by_frequency))
        return drafts

    def commit(self, reqs: Sequence) -> None:
        """Nothing to undo: the index only ever holds the real history."""
