"""A draft model's runner and KV: its own ModelRunner and pools (no pages),
one row of its request-to-token table per request, and extend/decode
forwards built directly from lists. An EAGLE head's entries outlive their
request in a prefix tree of their own (draft_prefix.py) when the target has
a radix cache.

Per request, `kv_len` counts the draft KV entries that stay valid (computed
from real tokens) and `spec_len` those of the last drafts too; `truncate`
drops the latter. The table is compact: a draft head may skip positions it
has no target features for, so RoPE positions are passed separately."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from radixserve.managers.schedule_batch import set_extend_lens
from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode
from radixserve.mem_cache.radix_tree import TreeNode
from radixserve.model_executor.model_runner import LogitsOutput
from radixserve.speculative.draft_prefix import DraftPrefixTree
from radixserve.speculative.spec_args import HEAD_ALGORITHMS
from radixserve.speculative.topk_tree import TopKTree
from radixserve.speculative.tree import DraftTree

logger = logging.getLogger(__name__)


@dataclass
class DraftState:
    row: int  # in the draft's request-to-token table
    kv_len: int = 0  # KV entries computed from the real sequence
    spec_len: int = 0  # entries including the last drafts'
    next_position: int = 0  # the position the next entry stands at
    shared_len: int = 0  # leading entries the prefix tree owns (locked through `node`)
    dense_len: int = 0  # leading entries that stand at their own positions (they may join the tree)
    node: Optional[TreeNode] = None


def draft_server_args(args, max_total_tokens: int, max_running: int, device_type: str):
    """The draft runner's configuration: the target's, for the draft model,
    without a prefix cache, pages or CUDA graphs, and without the target's
    quantization. On the CPU an EAGLE head's weights are int8: each draft
    step reads all of them for a few rows, and in float32 the three draft
    steps cost a third of a plain decode step. (A STANDALONE draft keeps
    them as loaded: the target itself as its own draft agrees with it exactly.)"""
    int8_head = device_type == "cpu" and args.dtype == "auto" and args.speculative_algorithm in HEAD_ALGORITHMS
    return dataclasses.replace(
        args, model_path=args.speculative_draft_model_path, tokenizer_path=None, speculative_algorithm=None,
        disable_radix_cache=True, page_size=1, max_total_tokens=max_total_tokens, max_running_requests=max_running,
        disable_cuda_graph=True, enable_hierarchical_cache=False, hicache_storage_backend=None,
        quantization=None, torchao_config="int8wo" if int8_head else None)


def draft_rows_per_req(num_steps: int, topk: int) -> int:
    """Draft KV entries a request may hold beyond its real tokens while
    drafting: one per step for a chain; for top-K trees, a step's frontier
    and its ancestors (at most K per level below the last)."""
    return max(num_steps, topk * (num_steps - 1))


class DraftRunner:
    def __init__(self, args, target) -> None:
        from radixserve.model_executor.model_runner import ModelRunner

        extra = target.max_running_requests * (
            draft_rows_per_req(args.speculative_num_steps, args.speculative_eagle_topk or 1) + 1)
        # An EAGLE head cannot run alone (it reads the target's embedding and
        # features), so it skips the start-up kernel warm-up; the target's covers its kernels.
        self.runner = ModelRunner(draft_server_args(args, target.max_total_num_tokens + extra,
                                                    target.max_running_requests, target.device.type),
                                  warm_up=args.speculative_algorithm == "STANDALONE")
        self.model = self.runner.model
        self.pools = self.runner.pools
        self.table = self.pools.req_to_token_pool.req_to_token
        # A head's extends (its first draft step) on the decode step's kernels:
        # on AMX, torch's int8 kernel took 0.6 ms of each 3.2 ms draft at one row.
        self.extends_as_decode = args.speculative_algorithm in HEAD_ALGORITHMS
        self.states: Dict[str, DraftState] = {}
        self.prefix = self._follow_prefix_cache(args, target)
        # Whether a request admitted now may soon speculate, so that the target gives back
        # some of its cached prefix for the head's features (SpecWorker.follow_load)
        self.catch_up: Callable[[], bool] = lambda: True
        logger.info("draft %s: %d KV tokens", args.speculative_draft_model_path, self.runner.max_total_num_tokens)

    def _follow_prefix_cache(self, args, target) -> Optional[DraftPrefixTree]:
        """Follow the target's prefix cache, which tells of every request that
        ends or lets its KV go (whatever step it was in); a head's entries are
        kept across requests beside the target's radix cache (the returned tree)."""
        target_cache = getattr(getattr(target, "pools", None), "prefix_cache", None)
        if target_cache is None:
            return None
        target_cache.follower = self
        if args.speculative_algorithm not in HEAD_ALGORITHMS or target_cache.tree is None:
            return None
        return DraftPrefixTree(self.pools.allocator, target.config.vocab_size)

    # ---- memory ----
    def states_for(self, reqs: Sequence) -> List[DraftState]:
        """Each request's state (new ones get a row, and the prefix tree's
        entries for their first positions); requests gone from the batch give
        theirs back; the last drafts' entries are dropped."""
        live = {r.rid for r in reqs}
        for rid in [rid for rid in self.states if rid not in live]:
            self.release(rid)
        states = []
        for req in reqs:
            state = self.states.get(req.rid)
            if state is None:
                state = self.states[req.rid] = self._new_state(req)
            self.truncate(state, state.kv_len)
            states.append(state)
        return states

    def _new_state(self, req) -> DraftState:
        row = self.pools.req_to_token_pool.alloc()
        if self.prefix is None:
            return DraftState(row)
        slots, node = self.prefix.match(req.fill_ids, req.lora_id)
        self.prefix.lock(node)
        n = 0 if slots is None else len(slots)
        if n:
            self.table[row, :n] = slots
        return DraftState(row, kv_len=n, spec_len=n, next_position=n, shared_len=n, dense_len=n, node=node)

    def release(self, rid: str) -> None:
        """A request left (aborted, retracted): its own entries are freed."""
        state = self.states.pop(rid, None)
        if state is not None:
            self._drop(state, state.shared_len)

    def finish(self, req) -> None:
        """A request ended: its entries that stand at their own positions join
        the prefix tree (when there is one); the rest are freed."""
        state = self.states.pop(req.rid, None)
        if state is None:
            return
        kept = state.shared_len
        if self.prefix is not None and state.dense_len > state.shared_len:
            kept = state.dense_len
            self.prefix.insert(req.fill_ids, req.lora_id, self.table[state.row, :kept], state.shared_len)
        self._drop(state, kept)

    def _drop(self, state: DraftState, kept: int) -> None:
        """Free a state's entries after the first `kept` (the tree's) and its row."""
        self.pools.allocator.free(self.table[state.row, kept:state.spec_len])
        self.pools.req_to_token_pool.free(state.row)
        if self.prefix is not None:
            self.prefix.unlock(state.node)

    # ---- in step with the target's radix cache (PrefixCache.follower) ----
    def target_limit(self, tokens: List[int], namespace: Optional[int], matched: int) -> int:
        if self.prefix is None:  # no head entries to keep in step with: no limit (any tier's tokens too)
            return len(tokens)
        if not self.catch_up():  # it will decode plainly for now: recomputing its prefix would be waste
            return matched
        return self.prefix.target_limit(tokens, namespace, matched)

    def reset(self) -> None:
        """The target's cache was emptied, which happens only when no request
        runs or waits: every state left is stale, and every entry goes."""
        for rid in list(self.states):
            self.release(rid)
        if self.prefix is not None:
            self.prefix.clear()

    def truncate(self, state: DraftState, length: int) -> None:
        if state.spec_len > length:
            self.pools.allocator.free(self.table[state.row, length:state.spec_len])
        state.kv_len = state.spec_len = length

    def kv_info(self) -> dict:
        """The draft pool's accounting: every slot is free, held by a request's
        own entries or in the prefix tree."""
        return {"total_tokens": self.pools.allocator.total_tokens, "free_tokens": self.pools.allocator.available_size(),
                "in_use_tokens": sum(s.spec_len - s.shared_len for s in self.states.values()),
                "cached_tokens": 0 if self.prefix is None else self.prefix.size()}

    def has_room(self, tokens: int) -> bool:
        if self.prefix is not None:
            self.prefix.make_room(tokens)
        return tokens <= self.pools.allocator.available_size()

    # ---- forwards ----
    def extend(self, states: List[DraftState], ids: List[List[int]], positions: List[List[int]],
               hidden: Optional[torch.Tensor] = None, tree_masks: Optional[List[List[int]]] = None,
               logit_rows: Optional[List[List[int]]] = None) -> LogitsOutput:
        """New entries for each state (after its spec_len); logits (and the
        output hidden state) at each one's last new token, or at the new
        tokens `logit_rows` names (per state, indices among its new ones).
        tree_masks: per new token the bits of its state's new tokens it sees
        (tree.py), on top of the state's earlier entries."""
        dev = self.runner.device
        prefix = [s.spec_len for s in states]
        lens = [len(i) for i in ids]
        seq = [p + n for p, n in zip(prefix, lens)]
        slots = self.pools.allocator.alloc_extend(prefix, seq, [0] * len(states))
        start = 0
        for state, p, n in zip(states, prefix, seq):
            self.table[state.row, p:n] = slots[start:start + n - p]
            state.spec_len = n
            start += n - p
        fb = self._batch(ForwardMode.EXTEND, states, [t for i in ids for t in i],
                         [p for ps in positions for p in ps], slots, seq, hidden)
        if logit_rows is None:
            logit_rows = [[n - 1] for n in lens]
        starts = [sum(lens[:i]) for i in range(len(lens))]
        wanted = [s + r for s, rows in zip(starts, logit_rows) for r in rows]
        fb.logits_indices = torch.tensor(wanted, dtype=torch.int64, device=dev)
        fb.last_logit_rows = torch.arange(len(wanted), device=dev)
        if tree_masks is not None:
            fb.spec_tree_mask = torch.tensor([m for ms in tree_masks for m in ms], dtype=torch.int64, device=dev)
        fb.as_decode_step = self.extends_as_decode
        set_extend_lens(fb, prefix, lens, dev)
        return self.runner.forward(fb)

    def draft_trees(self, states: List[DraftState], base: List[int], first_logits: torch.Tensor,
                    topk: Callable[[torch.Tensor], Tuple[List[List[int]], List[List[float]]]], k: int,
                    num_steps: int, budget: int, first_sources: Optional[torch.Tensor] = None) -> List[DraftTree]:
        """Top-k trees for `states` (topk_tree.py): the root's children from
        first_logits (row i: request i's logits after its last token; its
        first_sources row, if any, those children's input hidden state), then
        num_steps - 1 tree steps; each tree the `budget` best candidates."""
        tokens, logprobs = topk(first_logits)
        trees = [TopKTree(k) for _ in states]
        for i, tree in enumerate(trees):
            sources = [first_sources[i]] if first_sources is not None else ()
            tree.expand([-1], [tokens[i]], [logprobs[i]], sources)
        for _ in range(1, num_steps):
            self.tree_step(states, base, trees, topk)
        return [t.best_tree(budget) for t in trees]

    def tree_step(self, states: List[DraftState], base: List[int], trees: List[TopKTree],
                  topk: Callable[[torch.Tensor], Tuple[List[List[int]], List[List[float]]]]) -> None:
        """One top-K tree draft step (topk_tree.py): one extend over every
        request's frontier and its ancestors, a node of depth d at base + d - 1
        seeing its own ancestors only (tree masks); topk(logits) gives each
        frontier node's K likeliest (tokens, log-probabilities). A node's
        `source`, when set, is its input hidden state (EAGLE-3). The step's
        entries are freed at once: the next step's nodes must not see their cousins."""
        active = [i for i, t in enumerate(trees) if t.frontier]
        if not active:
            return
        rows = [trees[i].step_rows() for i in active]
        nodes = [[trees[i].candidates[n] for n in r.nodes] for i, r in zip(active, rows)]
        sources = [c.source for cs in nodes for c in cs]
        hidden = torch.stack(sources) if sources[0] is not None else None
        chosen = [states[i] for i in active]
        out = self.extend(chosen, [[c.token for c in cs] for cs in nodes],
                          [[base[i] + c.depth - 1 for c in cs] for i, cs in zip(active, nodes)], hidden,
                          tree_masks=[r.masks for r in rows], logit_rows=[r.frontier_rows for r in rows])
        for state in chosen:
            self.truncate(state, state.kv_len)
        tokens, logprobs = topk(out.next_token_logits)
        start = 0
        for i in active:
            parents = list(trees[i].frontier)
            end = start + len(parents)
            outputs = [out.hidden[r] for r in range(start, end)] if out.hidden is not None else ()
            trees[i].expand(parents, tokens[start:end], logprobs[start:end], outputs)
            start = end

    def decode(self, states: List[DraftState], ids: List[int], positions: List[int],
               hidden: Optional[torch.Tensor] = None) -> LogitsOutput:
        slots = self.pools.allocator.alloc_extend([s.spec_len for s in states],
                                                  [s.spec_len + 1 for s in states], [0] * len(states))
        for state, slot in zip(states, slots.tolist()):
            self.table[state.row, state.spec_len] = slot
            state.spec_len += 1
        fb = self._batch(ForwardMode.DECODE, states, ids, positions, slots, [s.spec_len for s in states], hidden)
        return self.runner.forward(fb)

    def _batch(self, mode, states, ids, positions, slots, seq_lens, hidden) -> ForwardBatch:
        dev = self.runner.device
        return ForwardBatch(
            forward_mode=mode, batch_size=len(states), input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            req_pool_indices=torch.tensor([s.row for s in states], device=dev),
            seq_lens=torch.tensor(seq_lens, device=dev), out_cache_loc=slots, seq_lens_cpu=list(seq_lens),
            req_to_token_pool=self.pools.req_to_token_pool, kv_pool=self.pools.kv_pool,
            spec_hidden=hidden, return_hidden=hidden is not None)
