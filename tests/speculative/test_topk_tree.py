"""Top-K draft trees (EAGLE-3 and STANDALONE, --speculative-eagle-topk > 1): the frontier
kept at each step, cumulative scores, the budget and the BFS layout, against
a brute-force reference over a toy draft model; and the flags."""

from __future__ import annotations

import itertools
import math
import random
from typing import Dict, List, Tuple

import pytest

from radixserve.server_args import ServerArgs
from radixserve.speculative.topk_tree import Candidate, TopKTree, select_tree
from radixserve.speculative.tree import DraftTree
from radixserve.speculative.worker import path_rows

Path = Tuple[int, ...]
VOCAB = 12


def toy_logprobs(path: Path, seed: int) -> Dict[int, float]:
    """A deterministic draft distribution after `path` (distinct values: a unique best tree)."""
    rng = random.Random(hash((seed,) + path))
    weights = [rng.random() ** 3 + 1e-3 for _ in range(VOCAB)]
    total = sum(weights)
    return {t: math.log(w / total) for t, w in enumerate(weights)}


def top(dist: Dict[int, float], k: int) -> List[Tuple[int, float]]:
    return sorted(dist.items(), key=lambda kv: -kv[1])[:k]


def run_topk_tree(topk: int, steps: int, budget: int, seed: int) -> DraftTree:
    """TopKTree driven as the drafter drives it (a node's source: its path)."""
    tree = TopKTree(topk)
    pairs = top(toy_logprobs((), seed), topk)
    tree.expand([-1], [[t for t, _ in pairs]], [[lp for _, lp in pairs]])
    for _ in range(steps - 1):
        parents = list(tree.frontier)
        tokens, logprobs = [], []
        for p in parents:
            pairs = top(toy_logprobs(path_of(tree.candidates, p), seed), topk)
            tokens.append([t for t, _ in pairs])
            logprobs.append([lp for _, lp in pairs])
        tree.expand(parents, tokens, logprobs)
    return tree.best_tree(budget)


def path_of(candidates: List[Candidate], i: int) -> Path:
    out = []
    while i >= 0:
        out.append(candidates[i].token)
        i = candidates[i].parent
    return tuple(reversed(out))


def reference(topk: int, steps: int, budget: int, seed: int) -> Tuple[Dict[Path, float], set]:
    """Brute force: every candidate path with its score (beam of K per level),
    then the ancestor-closed set of `budget` paths with the highest total score."""
    scores: Dict[Path, float] = {}
    frontier: List[Path] = [()]
    for _ in range(steps):
        level = {}
        for path in frontier:
            base = scores.get(path, 0.0)
            for t, lp in top(toy_logprobs(path, seed), topk):
                level[path + (t,)] = base + lp
        scores.update(level)
        frontier = sorted(level, key=lambda p: -level[p])[:topk]
    best, best_total = None, -math.inf
    for subset in itertools.combinations(scores, min(budget, len(scores))):
        chosen = set(subset)
        if all(p[:-1] in chosen or len(p) == 1 for p in chosen):
            total = sum(scores[p] for p in chosen)
            if total > best_total:
                best, best_total = chosen, total
    return scores, best


def tree_paths(tree: DraftTree) -> List[Path]:
    paths: List[Path] = []
    for token, parent in zip(tree.tokens, tree.parents):
        paths.append((paths[parent] if parent >= 0 else ()) + (token,))
    return paths


@pytest.mark.parametrize("topk,steps,budget", [(2, 3, 5), (2, 4, 7), (3, 2, 6), (4, 2, 7), (3, 3, 4), (2, 1, 2)])
def test_topk_tree_matches_brute_force(topk, steps, budget):
    for seed in range(4):
        tree = run_topk_tree(topk, steps, budget, seed)
        scores, best = reference(topk, steps, budget, seed)
        paths = tree_paths(tree)
        assert set(paths) == best and len(paths) == len(best)
        assert tree.max_depth <= steps
        # BFS: families in their parents' order, best child first
        for j in range(1, len(tree)):
            if tree.parents[j] == tree.parents[j - 1]:
                assert scores[paths[j]] <= scores[paths[j - 1]]
            else:
                assert (tree.depths[j], tree.parents[j]) > (tree.depths[j - 1], tree.parents[j - 1])
        assert scores[paths[0]] == max(scores.values())  # the root's first child: the best guess


def test_frontier_keeps_the_k_best_of_k_times_k():
    tree = TopKTree(2)
    tree.expand([-1], [[5, 6]], [[-0.1, -2.0]])
    assert [tree.candidates[i].token for i in tree.frontier] == [5, 6]
    # 5's children score -0.1 + (-3, -4); 6's -2 + (-0.2, -0.3): the best two are 6's
    tree.expand(list(tree.frontier), [[7, 8], [9, 10]], [[-3.0, -4.0], [-0.2, -0.3]])
    assert [tree.candidates[i].token for i in tree.frontier] == [9, 10]
    assert [tree.candidates[i].score for i in tree.frontier] == pytest.approx([-2.2, -2.3])
    # a step's rows: the frontier and its ancestors, parents first
    assert [tree.candidates[i].token for i in tree.lineage()] == [6, 9, 10]
    rows = tree.step_rows()  # each row sees itself and its ancestors; logits at the frontier's rows
    assert rows.masks == [0b001, 0b011, 0b101] and rows.frontier_rows == [1, 2]
    assert tree_paths(tree.best_tree(3)) == [(5,), (6,), (6, 9)]


def test_ties_keep_ancestors_and_are_deterministic():
    """A child of probability 1 scores as its parent: the parent ranks first;
    equal scores at one depth: the earlier-made candidate."""
    cands = [Candidate(1, -1, 1, -0.5), Candidate(2, -1, 1, -0.5), Candidate(3, 0, 2, -0.5), Candidate(4, 1, 2, -0.5)]
    assert tree_paths(select_tree(cands, 3)) == [(1,), (2,), (1, 3)]
    assert tree_paths(select_tree(cands, 1)) == [(1,)]
    assert tree_paths(select_tree(cands, 4)) == [(1,), (2,), (1, 3), (2, 4)]


def test_duplicate_and_impossible_siblings_are_dropped():
    tree = TopKTree(3)
    tree.expand([-1], [[4, 4, 5]], [[-0.1, -0.2, -math.inf]])
    assert [c.token for c in tree.candidates] == [4]
    assert tree_paths(tree.best_tree(3)) == [(4,)]


def test_tree_verify_keeps_the_accepted_rows_features_in_path_order():
    """EAGLE-3 reads a verify step's captured features by position: after a
    tree verify only the root's and the accepted nodes' rows stay, in path order."""
    import torch

    rows = torch.arange(9)[:, None].float()  # request 0: rows 0..4, request 1: rows 5..8
    kept, lens = path_rows(rows, [5, 4], [[2, 4], []])
    assert kept[:, 0].tolist() == [0, 2, 4, 5] and lens == [3, 1]


def eagle_args(**kwargs) -> ServerArgs:
    return ServerArgs(speculative_algorithm="EAGLE3", speculative_draft_model_path="x", **kwargs)


def test_eagle_tree_flags():
    args = eagle_args(speculative_eagle_topk=4, speculative_num_steps=3)
    assert args.speculative_num_draft_tokens == 13  # the default: K per step, plus the root
    args = eagle_args(speculative_eagle_topk=2, speculative_num_steps=2, speculative_num_draft_tokens=6)
    assert (args.speculative_eagle_topk, args.speculative_num_draft_tokens) == (2, 6)
    assert eagle_args().speculative_eagle_topk == 1 and eagle_args().speculative_num_draft_tokens == 4
    for kwargs, field in [
        (dict(speculative_eagle_topk=0), "speculative_eagle_topk"),
        (dict(speculative_eagle_topk=4, speculative_num_draft_tokens=4), "speculative_eagle_topk"),
        (dict(speculative_eagle_topk=2, speculative_num_draft_tokens=65), "speculative_num_draft_tokens"),
        # 2 steps of top-2 make 2 + 4 candidates
        (dict(speculative_eagle_topk=2, speculative_num_steps=2, speculative_num_draft_tokens=8),
         "speculative_num_draft_tokens"),
        (dict(speculative_eagle_topk=8, speculative_num_steps=10, speculative_num_draft_tokens=16),
         "speculative_num_steps"),
        # topk 1: a chain, num_steps + 1
        (dict(speculative_num_steps=3, speculative_num_draft_tokens=6), "speculative_num_draft_tokens"),
    ]:
        with pytest.raises(ValueError, match=field):
            eagle_args(**kwargs)
    # STANDALONE drafts the same trees; NGRAM takes its breadth from its own flags
    args = ServerArgs(speculative_algorithm="STANDALONE", speculative_draft_model_path="x", speculative_eagle_topk=2)
    assert args.speculative_num_draft_tokens == 7
    with pytest.raises(ValueError, match="speculative_eagle_topk must be 1 with NGRAM"):
        ServerArgs(speculative_algorithm="NGRAM", speculative_eagle_topk=2)
