"""A speculative verify step over draft trees: each new token attends to its
request's whole cached prefix and to its own ancestors in the tree (and
itself), in both attention backends, against a dense reference written from
the definition (softmax over explicitly masked scores). The torch backend runs
twice: with autograd on (masked SDPA) and in inference mode, where on the CPU
each new token attends as a decode query over its prefix and ancestors
(cpu_kernels.decode_attention). With a sliding
window, a node counts as standing at prefix + its depth. A chain's masks are
the causal ones and give exactly the plain extend's output."""

from __future__ import annotations

import pytest
import torch

from radixserve.layers.attention.torch_native import TorchNativeAttnBackend
from radixserve.layers.attention.triton_attn_backend import TritonAttnBackend
from radixserve.speculative.tree import DraftTree
from tests.layers.test_paged_attention import (
    DEVICE, HEAD_DIM, KV_HEADS, Pools, extend_batch, rel, windowed_layer,
)

# Trees of drafts (the root, the request's last token, is row 0): a branching
# tree three levels deep, a chain, the root alone, a wide one-level tree.
TREES = [
    DraftTree([11, 12, 13, 14, 15, 16, 17], [-1, -1, -1, 0, 1, 3, 3]),
    DraftTree.chain([5, 6, 7]),
    DraftTree(),
    DraftTree([1, 2, 3, 4, 5], [-1, -1, -1, -1, -1]),
]
PREFIXES = [5, 17, 1, 30]


def row_visible(tree: DraftTree) -> torch.Tensor:
    """[rows, rows] bool: row j sees row k iff k is j or one of j's ancestors."""
    parents = tree.row_parents()
    rows = len(parents)
    seen = torch.zeros(rows, rows, dtype=torch.bool)
    for j in range(rows):
        k = j
        while k >= 0:
            seen[j, k] = True
            k = parents[k]
    return seen


def dense_reference(pools, row, prefix, tree, q, attn) -> torch.Tensor:
    """Scores of every query over every key of the request, masked to the
    prefix plus the query's ancestors (and, with a window, to keys whose
    position is within it: a node's is prefix + its depth), softmax (with the
    sink's logit in the denominator), weighted values. q [rows, heads*D] -> float32."""
    rows = 1 + len(tree)
    slots = pools.table.req_to_token[row, :prefix + rows].long()
    group = attn.num_heads // attn.num_kv_heads
    k = pools.kv.k_buffers[0][slots].float().repeat_interleave(group, dim=1)
    v = pools.kv.v_buffers[0][slots].float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,lhd->hql", q.float().view(rows, attn.num_heads, HEAD_DIM), k) * attn.scaling
    visible = torch.cat([torch.ones(rows, prefix, dtype=torch.bool), row_visible(tree)], 1)
    if attn.sliding_window is not None:
        depths = torch.tensor(tree.row_depths())
        key_pos = torch.cat([torch.arange(prefix), prefix + depths])
        visible &= key_pos[None, :] > (prefix + depths)[:, None] - attn.sliding_window
    visible = visible.to(DEVICE)
    scores = scores.masked_fill(~visible, float("-inf"))
    if attn.sinks is not None:
        sink = attn.sinks.float().view(-1, 1, 1).expand(-1, rows, 1)
        probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
    else:
        probs = torch.softmax(scores, -1)
    return torch.einsum("hql,lhd->qhd", probs, v).reshape(rows, -1)


def verify_inputs(trees, prefixes, page_size, group, with_sinks, seed=0, window=None):
    cases = [(p, 1 + len(t)) for p, t in zip(prefixes, trees)]
    pools = Pools([p + n for p, n in cases], page_size, torch.float32, seed=seed)
    attn = windowed_layer(group, window, with_sinks)
    total = sum(n for _, n in cases)
    g = torch.Generator().manual_seed(seed + 1)
    q, k, v = (torch.randn(total, n * HEAD_DIM, generator=g).to(DEVICE)
               for n in (attn.num_heads, KV_HEADS, KV_HEADS))
    masks = torch.tensor([m for t in trees for m in t.row_masks()], dtype=torch.int64, device=DEVICE)
    positions = torch.tensor([p + d for p, t in zip(prefixes, trees) for d in t.row_depths()], device=DEVICE)
    return pools, attn, cases, total, (q, k, v), (masks, positions)


BACKENDS = ["torch_native", "torch_native_inference", "triton"]


def make_backend(name: str):
    return TritonAttnBackend(DEVICE) if name == "triton" else TorchNativeAttnBackend()


def run(backend, pools, attn, cases, total, qkv, tree, inference: bool = False):
    fb = extend_batch(pools, cases, backend, total)
    if tree is not None:
        fb.spec_tree_mask, fb.positions = tree
    with torch.inference_mode(inference):
        backend.init_forward_metadata(fb)
        return backend.forward(*qkv, attn, fb)


@pytest.mark.parametrize("page_size,group,with_sinks,window",
                         [(1, 1, False, None), (4, 2, False, None), (1, 2, True, None), (1, 2, False, 3),
                          (4, 1, True, 6)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tree_attention_matches_dense_reference(backend, page_size, group, with_sinks, window):
    for shift, seed in ((0, 0), (2, 7)):  # the same trees at other prefix lengths and in another order
        trees = TREES[shift:] + TREES[:shift]
        prefixes = [p + 3 * shift for p in PREFIXES]
        pools, attn, cases, total, qkv, masks = verify_inputs(trees, prefixes, page_size, group, with_sinks, seed,
                                                              window)
        out = run(make_backend(backend), pools, attn, cases, total, qkv, masks, backend.endswith("inference"))
        # the new tokens' K/V are in the pool now: the reference reads them there
        start = 0
        for row, (prefix, n), tree in zip(pools.rows, cases, trees):
            want = dense_reference(pools, row, prefix, tree, qkv[0][start:start + n], attn)
            assert rel(out[start:start + n], want) < 1e-5, (backend, tree)
            start += n


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_masks_attend_exactly_as_causal(backend, window):
    chains = [DraftTree.chain([3, 4, 5]), DraftTree.chain([]), DraftTree.chain([9] * 6)]
    pools, attn, cases, total, qkv, masks = verify_inputs(chains, [4, 9, 2], 1, 2, False, window=window)
    impl, inference = make_backend(backend), backend.endswith("inference")
    with_masks = run(impl, pools, attn, cases, total, qkv, masks, inference)
    plain = run(impl, pools, attn, cases, total, qkv, None, inference)
    assert torch.equal(with_masks, plain)


def test_row_masks_of_a_deep_tree_use_the_sign_bit():
    """64 rows: the last row's bit is int64's sign bit, and the kernel reads it as a bit."""
    tree = DraftTree.chain(list(range(63)))
    masks = tree.row_masks()
    assert masks[-1] == -1 and masks[0] == 1 and masks[62] == (1 << 63) - 1
    pools, attn, cases, total, qkv, mask_t = verify_inputs([tree], [3], 1, 1, False)
    out = run(TritonAttnBackend(DEVICE), pools, attn, cases, total, qkv, mask_t)
    want = dense_reference(pools, pools.rows[0], 3, tree, qkv[0], attn)
    assert rel(out, want) < 1e-5
