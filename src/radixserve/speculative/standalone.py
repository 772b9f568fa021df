"""STANDALONE drafts: a smaller model of the same tokenizer, run greedily by
its own ModelRunner with its own KV pool (draft_runner.py).

Drafting k tokens is one extend forward (catching up on the tokens the
target accepted since, ending at the request's last token, whose logits give
draft 1) and k - 1 decode forwards. After the verify step `commit` keeps the
draft KV of accepted tokens (the target's kv_len says how far the real
sequence has KV now) and frees the rest.

With --speculative-eagle-topk K > 1 the drafts are a top-K tree, as EAGLE-3's
(topk_tree.py, DraftRunner.tree_step): the catch-up extend's logits give the
root's K children, each later step one extend with tree masks over the
frontier and its ancestors, each node at position len(history) - 1 + depth."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from radixserve.layers.sampler import row_argmax
from radixserve.model_executor.spec_graph_runner import SpecGraphShape
from radixserve.speculative.draft_runner import DraftRunner, draft_rows_per_req


class StandaloneDrafter:
    def __init__(self, args, target) -> None:
        self.draft = DraftRunner(args, target)
        self.num_steps = args.speculative_num_steps
        self.topk = args.speculative_eagle_topk or 1
        self.tree_budget = args.speculative_num_draft_tokens - 1

    @property
    def makes_trees(self) -> bool:
        return self.topk > 1

    def graph_shapes(self, width: int, max_bs: int) -> List[SpecGraphShape]:
        """The draft's catch-up extend (the tokens a verify step emitted: at
        most `width` per request) and its one-token steps."""
        return [SpecGraphShape(width, max_bs), SpecGraphShape(1, max_bs)]

    def propose(self, reqs: Sequence, vocab_size: int) -> List[List[int]]:
        draft = self.draft
        states = draft.states_for(reqs)
        histories = [r.fill_ids for r in reqs]
        needed = sum(len(h) - s.kv_len for h, s in zip(histories, states)) + \
            len(reqs) * draft_rows_per_req(self.num_steps, self.topk)
        if not draft.has_room(needed):
            return [[] for _ in reqs]  # the draft pool is full: verify the last tokens alone
        ids = [h[s.kv_len:] for h, s in zip(histories, states)]
        positions = [list(range(s.kv_len, len(h))) for h, s in zip(histories, states)]
        for state, history in zip(states, histories):
            state.kv_len = len(history)  # the real tokens, up to the last one
        out = draft.extend(states, ids, positions)
        if self.makes_trees:
            return self._trees(states, [len(h) for h in histories], out.next_token_logits, vocab_size)
        tokens = self._greedy(out, vocab_size)
        drafts = [[t] for t in tokens]
        for _ in range(self.num_steps - 1):
            positions = [s.spec_len for s in states]
            tokens = self._greedy(draft.decode(states, tokens, positions), vocab_size)
            for chain, t in zip(drafts, tokens):
                chain.append(t)
        return drafts

    def commit(self, reqs: Sequence) -> None:
        for req in reqs:  # (a finished request's state already ended with its KV: DraftRunner.finish)
            state = self.draft.states.get(req.rid)
            if state is not None:
                self.draft.truncate(state, min(req.kv_len, state.spec_len))

    def _trees(self, states, base: List[int], logits: torch.Tensor, vocab_size: int) -> list:
        """base[i]: where request i's depth-1 nodes stand (its history's length)."""

        def topk(rows: torch.Tensor) -> Tuple[List[List[int]], List[List[float]]]:
            values, ids = rows[:, :vocab_size].float().log_softmax(-1).topk(self.topk, dim=-1)
            return ids.tolist(), values.tolist()

        return self.draft.draft_trees(states, base, logits, topk, self.topk, self.num_steps, self.tree_budget)

    @staticmethod
    def _greedy(out, vocab_size: int) -> List[int]:
        return row_argmax(out.next_token_logits[:, :vocab_size]).tolist()
