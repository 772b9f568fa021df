"""Verification: one target forward over each request's last token and its
draft tree (a chain is the tree of breadth 1), on top of the request's KV (an
EXTEND forward with a tree mask: tree.py), then the tokens the target itself
would have produced, as far as the drafts agree.

Exactness. The drafts are deterministic guesses, so the draft distribution
is a point mass on each guess. For a point mass, speculative sampling's
rejection rule (accept d with probability min(1, p(d)/q(d)) = p(d), else draw
from the residual p without d) is the same as drawing x from the target's p
and accepting d iff x == d, else emitting x. On a tree the rule tries a
node's children c1, c2, ... in turn: accept c_i with probability
p_res(c_i), else zero it and renormalise; with nothing accepted, draw from
p_res. That accepts c_i with probability exactly p(c_i) (the renormalising
factors cancel: (1 - p(c1)) * p(c2) / (1 - p(c1)) = p(c2), ...) and emits any
other token x with probability p(x): the same as drawing x from p and
following the child whose token is x, if any. We draw x with the target's own
sampler (temperature, top-p/top-k/min-p, penalties as of that position),
whose seeded noise depends only on (seed, step, token): every emitted token
is exactly the token decoding without speculation would have sampled.
Penalty state advances token by token (masked per row), so a node sees the
history up to its own draft along its path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from radixserve.layers.sampler import Sampler, row_argmax
from radixserve.managers.req import Req
from radixserve.managers.schedule_batch import ScheduleBatch
from radixserve.model_executor.forward_batch import ForwardMode
from radixserve.sampling.sampling_batch_info import SamplingBatchInfo
from radixserve.speculative.tree import DraftTree, Drafts, TreeWalk, accepted_rows, as_tree

HostLogprobs = Tuple[Optional[list], Optional[list], Optional[list]]


@dataclass
class SpecResult:
    """A verify step's outcome, read back to the host (the step ran synchronously)."""

    batch: ScheduleBatch
    reqs: List[Req]
    tokens: List[List[int]]  # per request: the accepted drafts, then the target's own next token
    num_drafts: List[int]  # per request: drafts verified (tree nodes besides the root)
    logprobs: List[HostLogprobs]  # per position: the batch's (logprobs, top values, top ids) lists
    # per request: the verify rows (1.. in BFS order) of the accepted drafts, in path order
    paths: Optional[List[List[int]]] = None
    is_extend: bool = False
    decode_part: None = None

    def all_reqs(self) -> List[Req]:
        return self.reqs


def prepare_verify(batch: ScheduleBatch, drafts: List[Drafts]) -> bool:
    """KV slots and input tensors for [last token, drafts...] of every request
    at positions seq_len + depth, one slot per tree node. False (nothing
    allocated) when the allocator is short. The request's table holds the
    nodes' slots at positions [seq_len, seq_len + 1 + len(tree)) in BFS order
    and its kv_len covers them at once, so a failed batch frees them;
    ResultProcessor keeps the accepted path's (keep_accepted_kv)."""
    pools, dev = batch.pools, batch.device
    trees = [as_tree(d) for d in drafts]
    table = pools.req_to_token_pool.req_to_token
    prefix_lens = batch.seq_lens_cpu.tolist()
    extend_lens = [1 + len(t) for t in trees]
    seq_lens = [p + n for p, n in zip(prefix_lens, extend_lens)]
    rows = batch.req_pool_indices
    last_locs = table[rows, batch.seq_lens - 1].tolist()
    out_cache_loc = pools.allocator.alloc_extend(prefix_lens, seq_lens, last_locs)
    if out_cache_loc is None:
        return False
    last_ids = batch.last_token_ids.tolist()
    branched = not all(t.is_chain() for t in trees)
    input_ids, positions, masks, start = [], [], [], 0
    for req, last, tree, prefix, seq in zip(batch.reqs, last_ids, trees, prefix_lens, seq_lens):
        table[req.req_pool_idx, prefix:seq] = out_cache_loc[start:start + seq - prefix]
        input_ids += [last] + tree.tokens
        positions += [prefix + d for d in tree.row_depths()]
        if branched:
            masks += tree.row_masks()
        req.kv_len = seq
        start += seq - prefix
    batch.forward_mode = ForwardMode.EXTEND
    batch.input_ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
    batch.positions = torch.tensor(positions, dtype=torch.int64, device=dev)
    # Chains only: plain causal attention, exactly as without trees.
    batch.spec_tree_mask = torch.tensor(masks, dtype=torch.int64, device=dev) if branched else None
    batch.out_cache_loc = out_cache_loc
    batch.seq_lens_cpu = torch.tensor(seq_lens, dtype=torch.int64)
    batch.seq_lens = batch.seq_lens_cpu.to(dev)
    batch.logits_indices = torch.arange(start, dtype=torch.int64, device=dev)  # every position's logits
    batch.last_logit_rows = torch.tensor(seq_lens, device=dev) - torch.tensor(prefix_lens, device=dev)
    batch.last_logit_rows = torch.cumsum(batch.last_logit_rows, 0) - 1
    batch._prefix_lens, batch._extend_lens = prefix_lens, extend_lens
    batch.spec_drafts = trees
    return True


def accept(batch: ScheduleBatch, logits: torch.Tensor, info: SamplingBatchInfo, sampler: Sampler) -> SpecResult:
    """logits: [num_tokens, vocab], one row per verified position, in batch order."""
    if is_plain_greedy(info):
        return accept_greedy(batch, logits, info)
    return accept_sampled(batch, logits, info, sampler)


def is_plain_greedy(info: SamplingBatchInfo) -> bool:
    """Every row greedy, and nothing that changes logits from one position to
    the next (penalties, a bias, min_new_tokens) or asks for logprobs: each
    position's token is the argmax of its own logits."""
    return (info.all_greedy and not info.return_logprob and info.grammar_mask is None and info.seen_mask is None
            and info.output_counts is None and info.logit_bias is None and info.stop_mask is None)


def _walk(batch: ScheduleBatch, dev: torch.device) -> Tuple[List[DraftTree], TreeWalk]:
    trees = batch.spec_drafts  # DraftTrees (prepare_verify)
    return trees, TreeWalk.build(trees, batch.last_logit_rows.to(dev))


def accept_greedy(batch: ScheduleBatch, logits: torch.Tensor, info: SamplingBatchInfo) -> SpecResult:
    """One argmax over every verified position, then each request's walk down
    its tree: the child whose draft equals the argmax at the current node, and
    the argmax at the last node reached."""
    trees = batch.spec_drafts  # DraftTrees (prepare_verify)
    if all(t.is_chain() for t in trees):
        return _accept_greedy_chains(batch, trees, logits, info)
    walk = TreeWalk.build(trees, batch.last_logit_rows.to(logits.device))
    chosen_all = row_argmax(logits)
    node = torch.zeros_like(walk.first_rows)
    alive = torch.ones_like(node, dtype=torch.bool)
    chosen, emitted, nodes = [], [], []
    for depth in range(walk.max_depth + 1):
        token = chosen_all[walk.first_rows + node]
        chosen.append(token)
        emitted.append(alive)
        if depth < walk.max_depth:
            node, alive = _descend(walk, node, token, alive)
            nodes.append(node)
    return _result(batch, trees, info, chosen, emitted, nodes, [(None, None, None)] * len(chosen), greedy=True)


def _accept_greedy_chains(batch: ScheduleBatch, chains: List[DraftTree], logits: torch.Tensor,
                          info: SamplingBatchInfo) -> SpecResult:
    """Chains only: every verified row's argmax, read back at once, then on the
    host each request's drafts as far as they equal the argmax and the argmax
    after them (a dozen small tensor ops took 0.2 ms of a 9 ms CPU cycle)."""
    chosen = row_argmax(logits).tolist()  # the step's one host sync
    tokens, start = [], 0
    for chain in chains:  # a request's rows (prepare_verify): its last token, then its drafts
        drafts = chain.tokens
        argmax = chosen[start:start + 1 + len(drafts)]
        kept = 0
        while kept < len(drafts) and drafts[kept] == argmax[kept]:
            kept += 1
        tokens.append(argmax[:kept + 1])
        start += 1 + len(drafts)
    counts = torch.tensor([len(t) for t in tokens], dtype=info.steps.dtype)
    info.steps += counts.to(info.steps.device)  # (as a token-by-token record of the emitted ones)
    width = 1 + max(len(c) for c in chains)
    return SpecResult(batch, list(batch.reqs), tokens, [len(c) for c in chains], [(None, None, None)] * width,
                      paths=[list(range(1, len(t))) for t in tokens])


def accept_sampled(batch: ScheduleBatch, logits: torch.Tensor, info: SamplingBatchInfo,
                   sampler: Sampler) -> SpecResult:
    """Depth by depth through the target's own sampler (module docstring)."""
    trees, walk = _walk(batch, logits.device)
    node = torch.zeros_like(walk.first_rows)
    alive = torch.ones_like(node, dtype=torch.bool)
    chosen, emitted, nodes, outs = [], [], [], []
    for depth in range(walk.max_depth + 1):
        out = sampler.forward(logits[walk.first_rows + node], info)
        info.record(out.next_token_ids, mask=alive)
        chosen.append(out.next_token_ids)
        emitted.append(alive)
        outs.append(out)
        if depth < walk.max_depth:
            node, alive = _descend(walk, node, out.next_token_ids, alive)
            nodes.append(node)
    return _result(batch, trees, info, chosen, emitted, nodes, [host_logprobs(o) for o in outs], greedy=False)


def _descend(walk: TreeWalk, node: torch.Tensor, token: torch.Tensor, alive: torch.Tensor):
    """(each request's next node, whether its walk goes on): the child holding
    the target's token; a request with no such child stops where it is."""
    child, found = walk.child(node, token)
    alive = alive & found
    return torch.where(alive, child, node), alive


def _result(batch: ScheduleBatch, trees: List[DraftTree], info: SamplingBatchInfo, chosen: list, emitted: list,
            nodes: list, logprobs: List[HostLogprobs], greedy: bool) -> SpecResult:
    counts = torch.stack(emitted, 1).sum(1)
    if greedy:
        info.steps += counts.to(info.steps.dtype)  # (the sampler path records token by token)
    ids = torch.stack(chosen, 1)
    node_ids = torch.stack(nodes, 1) if nodes else ids[:, :0]
    host = torch.cat([ids, node_ids, counts[:, None]], 1).tolist()  # the step's one host sync
    width = ids.shape[1]
    tokens = [row[:row[-1]] for row in host]
    paths = accepted_rows([row[width:-1] for row in host], [row[-1] for row in host])
    return SpecResult(batch, list(batch.reqs), tokens, [len(t) for t in trees], logprobs, paths=paths)


def host_logprobs(out) -> HostLogprobs:
    if out.logprobs is None:
        return None, None, None
    vals = out.top_logprobs_val.tolist() if out.top_logprobs_val is not None else None
    idx = out.top_logprobs_idx.tolist() if out.top_logprobs_idx is not None else None
    return out.logprobs.tolist(), vals, idx


def trim_kv(prefix_cache, req: Req, new_kv_len: int) -> None:
    """Free the slots of positions [new_kv_len, kv_len): rejected drafts (whole
    pages only; a partly used last page stays with the request)."""
    page = prefix_cache.page_size
    keep_to = -(-new_kv_len // page) * page
    if req.kv_len > keep_to:
        prefix_cache.allocator.free(prefix_cache.table[req.req_pool_idx, keep_to:req.kv_len])
    req.kv_len = new_kv_len


def keep_accepted_kv(prefix_cache, kv_pool, req: Req, start: int, path: Optional[List[int]], kept: int) -> None:
    """After a verify step that emitted `kept` tokens for `req`, whose root
    (last token) stood at position `start` and whose tree nodes fill positions
    [start, kv_len): the KV of the root and the first kept - 1 accepted nodes
    (verify rows `path`) becomes positions [start, start + kept); every other
    node's slot is freed now. With one-slot pages the table is rewritten in
    path order (no KV moves); with larger pages a page's slots must stay in
    position order, so the accepted nodes' KV is copied to the path's positions."""
    rows = list(range(1, kept)) if path is None else list(path[:kept - 1])  # (None: a chain)
    if rows == list(range(1, kept)):  # a chain's prefix: the nodes already stand in path order
        trim_kv(prefix_cache, req, start + kept)
        return
    table = prefix_cache.table[req.req_pool_idx]
    node_slots = table[start:req.kv_len].clone()
    kept_rows = torch.tensor([0] + rows, dtype=torch.int64, device=node_slots.device)
    if prefix_cache.page_size == 1:
        table[start:start + kept] = node_slots[kept_rows]
        dropped = torch.ones(len(node_slots), dtype=torch.bool, device=node_slots.device)
        dropped[kept_rows] = False
        prefix_cache.allocator.free(node_slots[dropped])
        req.kv_len = start + kept
        return
    kv_pool.move_slots(node_slots[kept_rows], node_slots[:kept])
    trim_kv(prefix_cache, req, start + kept)
