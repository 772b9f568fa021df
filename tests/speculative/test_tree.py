"""Draft trees: their layout and masks, NGRAM's trees from the trie of
continuations, the acceptance walk (greedy and sampled: a chi-square test
that a tree's accepted runs follow the target's distribution, with a
penalty that must see each accepted node), and the accepted path's KV
becoming the request's next positions."""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from radixserve.layers.sampler import Sampler
from radixserve.mem_cache.allocator import KVPool, ReqToTokenPool, TokenAllocator
from radixserve.speculative import spec_args
from radixserve.speculative.ngram import NgramDrafter, NgramIndex, TreeShape
from radixserve.speculative.tree import MAX_TREE_ROWS, DraftTree
from radixserve.speculative.verify import accept, accept_greedy, accept_sampled, keep_accepted_kv
from tests.speculative.test_verify import (
    EARLIER_OUTPUT, FREQ, TEMPERATURE, TOP_K, VOCAB, batch_info, chi_square_critical, make_req, target_probs,
)

# root -> 11, 12, 13; 11 -> 14; 12 -> 15; 14 -> 16, 17 (verify rows 1..7)
TREE = DraftTree([11, 12, 13, 14, 15, 16, 17], [-1, -1, -1, 0, 1, 3, 3])


def test_tree_layout_and_masks():
    assert TREE.depths == [1, 1, 1, 2, 2, 3, 3] and TREE.max_depth == 3
    assert TREE.row_parents() == [-1, 0, 0, 0, 1, 2, 4, 4]
    assert TREE.row_depths() == [0, 1, 1, 1, 2, 2, 3, 3]
    masks = TREE.row_masks()
    assert masks[0] == 0b1 and masks[1] == 0b11 and masks[3] == 0b1001
    assert masks[6] == 0b1010011 and masks[7] == 0b10010011  # row 7: itself, 4, 1, root
    chain = DraftTree.chain([5, 6, 7])
    assert chain.is_chain() and not TREE.is_chain() and DraftTree().is_chain()
    assert chain.row_masks() == [1, 3, 7, 15]
    assert TREE.on_first_branch([1, 4, 6]) and not TREE.on_first_branch([1, 4, 7])
    assert not TREE.on_first_branch([2, 5])
    with pytest.raises(AssertionError):
        DraftTree([1, 2], [1, -1])  # a parent after its child
    with pytest.raises(AssertionError):
        DraftTree([1, 1], [-1, -1])  # siblings with one token
    assert spec_args.MAX_TREE_ROWS == MAX_TREE_ROWS


# ---- NGRAM trees ----
def tree_for(history, shape, by_frequency=False, max_n=4) -> DraftTree:
    index = NgramIndex(max_n=max_n, capacity=10_000)
    index.update(history)
    return index.propose_tree(history, shape, by_frequency)


def first_branch(tree: DraftTree) -> list:
    out, node = [], -1
    while node in tree.parents:
        node = tree.parents.index(node)
        out.append(tree.tokens[node])
    return out


def test_bfs_tree_branches_latest_first_within_its_budget():
    # [1, 2] (the longest suffix seen before) ended the history three times before:
    # continued by 3 4 8, 5 6 9, 3 7 0 (the latest)
    history = [1, 2, 3, 4, 8, 1, 2, 5, 6, 9, 1, 2, 3, 7, 0, 1, 2]
    tree = tree_for(history, TreeShape(max_nodes=6, max_depth=3, min_breadth=1, max_breadth=3))
    assert tree.tokens == [3, 5, 7, 4, 6, 0] and tree.parents == [-1, -1, 0, 0, 1, 2]
    # the first branch is the chain BFS drafts (the latest continuation)
    index = NgramIndex(4, 10_000)
    index.update(history)
    assert first_branch(tree) == index.propose(history, 3, False) == [3, 7, 0]
    # a smaller budget keeps the first level's best nodes first
    assert tree_for(history, TreeShape(2, 3, 1, 3)).tokens == [3, 5]
    # breadth 1 everywhere: a chain
    assert tree_for(history, TreeShape(6, 3, 1, 1)).is_chain()


def test_breadth_falls_from_the_first_level_to_the_deepest():
    shape = TreeShape(max_nodes=20, max_depth=4, min_breadth=1, max_breadth=4)
    assert [shape.breadth(d) for d in (1, 2, 3, 4)] == [4, 3, 2, 1]
    # five continuations after [9]: the root keeps four (the latest), the next
    # level two children per node at most, the last one
    history = [9, 1, 1, 8, 9, 2, 1, 8, 9, 3, 1, 8, 9, 4, 2, 8, 9, 5, 1, 8, 9]
    shape = TreeShape(20, 3, 1, 4)
    assert [shape.breadth(d) for d in (1, 2, 3)] == [4, 2, 1]
    tree = tree_for(history, shape, max_n=1)
    assert [t for t, p in zip(tree.tokens, tree.parents) if p == -1] == [5, 4, 3, 2]
    assert tree.max_depth == 3
    assert all(tree.parents.count(j) <= (2 if tree.depths[j] == 1 else 1) for j in range(len(tree)))


def test_prob_tree_takes_the_likeliest_nodes():
    # after [1]: 9 three times (then 2, 3, 3), 7 once (latest)
    history = [1, 9, 2, 5, 1, 9, 3, 5, 1, 9, 3, 6, 1, 7, 4, 1]
    tree = tree_for(history, TreeShape(max_nodes=3, max_depth=3, min_breadth=1, max_breadth=3),
                    by_frequency=True, max_n=1)
    # 9 (3/4), then 9 -> 3 (2/4), then 7 (1/4) and 9 -> 2 (1/4) tie: the earlier offered (7) wins
    assert tree.tokens == [9, 7, 3] and tree.parents == [-1, -1, 0]
    bfs = tree_for(history, TreeShape(3, 3, 1, 3), by_frequency=False, max_n=1)
    assert bfs.tokens[:2] == [7, 9]  # latest first


def test_ngram_drafter_chain_with_breadth_one():
    req = SimpleNamespace(rid="a", fill_ids=[1, 2, 3, 1, 2])
    chain = NgramDrafter(3, 4, 1000, "BFS", TreeShape(3, 3, 1, 1))
    assert not chain.makes_trees and chain.propose([req], 100) == [[3, 1, 2]]
    trees = NgramDrafter(3, 4, 1000, "BFS", TreeShape(3, 3, 1, 2))
    assert trees.makes_trees and trees.propose([req], 100) == [DraftTree.chain([3, 1, 2])]


def test_bfs_first_branch_is_the_chain_on_random_histories():
    rng = random.Random(0)
    for _ in range(200):
        history = [rng.randrange(4) for _ in range(rng.randrange(2, 40))]
        index = NgramIndex(3, 10_000)
        index.update(history)
        chain = index.propose(history, 3, False)
        assert first_branch(index.propose_tree(history, TreeShape(63, 3, 1, 3), False)) == chain
        small = index.propose_tree(history, TreeShape(8, 3, 1, 3), False)  # the budget may cut it short
        assert chain[:len(first_branch(small))] == first_branch(small)
        assert len(small) <= 8 and small.max_depth <= 3


# ---- acceptance ----
def verify_batch(trees, reqs):
    sizes = torch.tensor([1 + len(t) for t in trees])
    return SimpleNamespace(spec_drafts=trees, reqs=reqs, last_logit_rows=torch.cumsum(sizes, 0) - 1)


def peaked_logits(argmaxes):
    logits = torch.full((len(argmaxes), 20), -5.0)
    for row, token in enumerate(argmaxes):
        logits[row, token] = 5.0
    return logits


def test_greedy_walk_follows_the_matching_child():
    # request 0 (TREE, rows 0..7): root -> 12 (row 2, not the first child) -> 15 (row 5) -> bonus 3
    # request 1 (TREE, rows 8..15): root -> 11 -> 14 -> 17 (row 7, the second child) -> bonus 19
    # request 2 (a chain, rows 16..18): rejects its first draft; bonus 2
    argmax_0 = [12, 0, 15, 0, 0, 3, 0, 0]
    argmax_1 = [11, 14, 0, 0, 17, 0, 0, 19]
    trees = [TREE, TREE, DraftTree.chain([4, 5])]
    batch = verify_batch(trees, [make_req(temperature=0)] * 3)
    logits = peaked_logits(argmax_0 + argmax_1 + [2, 5, 6])
    result = accept(batch, logits, batch_info(batch.reqs), Sampler())
    assert result.tokens == [[12, 15, 3], [11, 14, 17, 19], [2]]
    assert result.paths == [[2, 5], [1, 4, 7], []]
    assert result.num_drafts == [7, 7, 2]


def test_greedy_fast_path_matches_the_sampler_path_on_trees():
    g = torch.Generator().manual_seed(0)
    rng = random.Random(1)
    for trial in range(20):
        trees = [random_tree(rng) for _ in range(1 + trial % 4)]
        total = sum(1 + len(t) for t in trees)
        logits = torch.randn(total, VOCAB, generator=g)
        start = 0
        for tree in trees:  # most nodes' first child right, some second children
            for row, parent in enumerate(tree.row_parents()[1:], 1):
                if rng.random() < 0.6:
                    logits[start + parent, tree.tokens[row - 1]] += 10.0
            start += 1 + len(tree)
        batch = verify_batch(trees, [make_req(temperature=0)] * len(trees))
        fast_info, slow_info = batch_info(batch.reqs), batch_info(batch.reqs)
        fast = accept_greedy(batch, logits, fast_info)
        slow = accept_sampled(batch, logits, slow_info, Sampler())
        assert fast.tokens == slow.tokens and fast.paths == slow.paths
        assert torch.equal(fast_info.steps, slow_info.steps)


def random_tree(rng: random.Random) -> DraftTree:
    """BFS-ordered, siblings distinct, tokens < VOCAB."""
    tokens, parents, level, depth = [], [], [-1], 0
    while level and len(tokens) < 7 and depth < 3:
        below = []
        for parent in level:
            for token in rng.sample(range(VOCAB), rng.randrange(0, 3)):
                if len(tokens) < 7:
                    tokens.append(token)
                    parents.append(parent)
                    below.append(len(tokens) - 1)
        level, depth = below, depth + 1
    return DraftTree(tokens, parents)


ROWS = 20000
# root -> 2, 4; 2 -> 1; 4 -> 2 (verify rows 0..4)
SAMPLED_TREE = DraftTree([2, 4, 1, 2], [-1, -1, 0, 1])


def test_sampled_tree_runs_follow_the_target_distribution():
    """Exact tree rejection sampling for one-hot drafts: each run's probability
    is the product of the target's probabilities along it, the frequency
    penalty at a node counting the accepted tokens above it."""
    gen = torch.Generator().manual_seed(0)
    node_logits = torch.randn(5, VOCAB, generator=gen) * 1.5
    node_logits[0, 2] = node_logits[0, 4] = node_logits[0].max()  # both root children likely
    node_logits[1, 1] = node_logits[1].max() + 1.0
    node_logits[2, 2] = node_logits[2].max() + 1.5  # 2 again after 4: a missed penalty would show
    reqs = [make_req(seed=3000 + i, output=(EARLIER_OUTPUT,), temperature=TEMPERATURE, top_k=TOP_K,
                     frequency_penalty=FREQ) for i in range(ROWS)]
    info = batch_info(reqs)
    batch = verify_batch([SAMPLED_TREE] * ROWS, reqs)
    result = accept(batch, node_logits.repeat(ROWS, 1), info, Sampler())
    observed = Counter(tuple(t) for t in result.tokens)

    def probs(row, *history):
        counts = torch.zeros(VOCAB)
        for token in (EARLIER_OUTPUT,) + history:
            counts[token] += 1
        return target_probs(node_logits[row], counts)

    expected = {}
    p_root = probs(0)
    for x in range(VOCAB):
        if x == 2:
            p_mid = probs(1, 2)
            for y in range(VOCAB):
                if y == 1:
                    p_leaf = probs(3, 2, 1)
                    expected.update({(2, 1, z): (p_root[2] * p_mid[1] * p_leaf[z]).item() for z in range(VOCAB)})
                else:
                    expected[(2, y)] = (p_root[2] * p_mid[y]).item()
        elif x == 4:
            p_mid = probs(2, 4)
            for y in range(VOCAB):
                if y == 2:
                    p_leaf = probs(4, 4, 2)
                    expected.update({(4, 2, z): (p_root[4] * p_mid[2] * p_leaf[z]).item() for z in range(VOCAB)})
                else:
                    expected[(4, y)] = (p_root[4] * p_mid[y]).item()
        else:
            expected[(x,)] = p_root[x].item()
    assert abs(sum(expected.values()) - 1) < 1e-5
    for leaf_run in ((4, 2), (2, 1)):  # both branches reach their leaf often
        assert sum(p for k, p in expected.items() if k[:2] == leaf_run and len(k) == 3) > 0.05
    assert set(observed) <= {k for k, p in expected.items() if p > 0}
    cells = {k: p for k, p in expected.items() if p * ROWS >= 5}  # chi-square wants expected counts >= 5
    rest = ROWS - sum(observed[k] for k in cells)
    stat = sum((observed[k] - ROWS * p) ** 2 / (ROWS * p) for k, p in cells.items())
    p_rest = 1 - sum(cells.values())
    if p_rest > 1e-9:
        stat += (rest - ROWS * p_rest) ** 2 / (ROWS * p_rest)
    assert stat < chi_square_critical(len(cells) - (p_rest <= 1e-9)), (stat, observed)
    assert info.steps.tolist() == [1 + len(t) for t in result.tokens]
    paths = Counter(tuple(p) for p in result.paths)
    assert paths[(2, 4)] > 0 and paths[(1, 3)] > 0  # both branches accepted, to the leaves


# ---- KV of the accepted path ----
@pytest.mark.parametrize("page_size", [1, 4])
def test_accepted_path_kv_becomes_the_next_positions(page_size):
    prefix, nodes = 6, 1 + len(TREE)
    alloc = TokenAllocator(64, page_size, torch.device("cpu"))
    table = ReqToTokenPool(2, 32, torch.device("cpu"))
    kv = KVPool(alloc.num_slots, 2, 1, 2, torch.float32, torch.device("cpu"))
    for layer in range(2):
        kv.k_buffers[layer].copy_(torch.arange(alloc.num_slots, dtype=torch.float32)[:, None, None] + layer)
        kv.v_buffers[layer].copy_(-kv.k_buffers[layer])
    row = table.alloc()
    table.req_to_token[row, :prefix] = alloc.alloc_extend([0], [prefix], [0])
    last = int(table.req_to_token[row, prefix - 1])
    table.req_to_token[row, prefix:prefix + nodes] = alloc.alloc_extend([prefix], [prefix + nodes], [last])
    node_slots = table.req_to_token[row, prefix:prefix + nodes].clone()
    node_k = [kv.k_buffers[layer][node_slots].clone() for layer in range(2)]
    req = SimpleNamespace(req_pool_idx=row, kv_len=prefix + nodes)
    cache = SimpleNamespace(table=table.req_to_token, allocator=alloc, page_size=page_size)
    # path root -> 11 (row 1) -> 14 (row 4) -> 17 (row 7); a stop kept 3 tokens: root, 11, 14 hold KV
    keep_accepted_kv(cache, kv, req, prefix, [1, 4, 7], 3)
    assert req.kv_len == prefix + 3
    for layer in range(2):
        got = kv.k_buffers[layer][table.req_to_token[row, prefix:prefix + 3]]
        assert torch.equal(got, node_k[layer][[0, 1, 4]])
        assert torch.equal(kv.v_buffers[layer][table.req_to_token[row, prefix:prefix + 3]], -got)
    used = -(-req.kv_len // page_size) * page_size
    assert alloc.available_size() == alloc.total_tokens - used  # every other node's slot is free again
    if page_size == 1:
        assert table.req_to_token[row, prefix + 2] == node_slots[4]  # the table moved, not the KV


def test_trees_refused_where_attention_takes_no_tree_mask():
    """MLA's attention takes no tree mask: NGRAM trees are refused there,
    naming the flag; chains are not."""
    from radixserve.mem_cache.kv_layout import MLAKVLayout
    from radixserve.server_args import ServerArgs
    from radixserve.speculative.worker import make_drafter

    mla = SimpleNamespace(kv_layout=MLAKVLayout(2, 16, 8))
    with pytest.raises(ValueError, match="speculative_ngram_max_bfs_breadth"):
        make_drafter(ServerArgs(speculative_algorithm="NGRAM"), mla)
    chain = make_drafter(ServerArgs(speculative_algorithm="NGRAM", speculative_ngram_max_bfs_breadth=1), mla)
    assert not chain.makes_trees
