"""STANDALONE drafts: a smaller model of the same tokenizer, run greedily by
its own ModelRunner with its own KV pool (no prefix cache).

Per request the draft keeps a row of its request-to-token table and how many
positions hold KV that matches the real sequence (`kv_len`). Drafting k
tokens is one extend forward (catching up on the tokens the target accepted
since, ending at the request's last token, whose logits give draft 1) and
k - 1 decode forwards. After the verify step, `commit` keeps the draft KV of
accepted tokens and frees the rest."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

from radixserve.managers.schedule_batch import set_extend_lens
from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode

logger = logging.getLogger(__name__)


@dataclass
class DraftState:
    row: int  # in the draft's request-to-token table
    kv_len: int = 0  # positions whose draft KV matches the real tokens
    spec_len: int = 0  # positions with draft KV, including the last drafts'


def draft_server_args(args, max_total_tokens: int, max_running: int):
    """The draft runner's configuration: the target's, for the draft model,
    without a prefix cache, pages or CUDA graphs."""
    return dataclasses.replace(
        args, model_path=args.speculative_draft_model_path, tokenizer_path=None, speculative_algorithm=None,
        disable_radix_cache=True, page_size=1, max_total_tokens=max_total_tokens, max_running_requests=max_running,
        disable_cuda_graph=True, enable_hierarchical_cache=False, hicache_storage_backend=None,
        context_length=args.context_length, quantization=None, torchao_config=None)


class StandaloneDrafter:
    def __init__(self, args, target) -> None:
        from radixserve.model_executor.model_runner import ModelRunner

        k = args.speculative_num_steps
        draft_args = draft_server_args(args, target.max_total_num_tokens + target.max_running_requests * (k + 1),
                                       target.max_running_requests)
        self.runner = ModelRunner(draft_args)
        self.num_steps = k
        self.pools = self.runner.pools
        self.table = self.pools.req_to_token_pool.req_to_token
        self.states: Dict[str, DraftState] = {}
        logger.info("STANDALONE draft %s: %d KV tokens", draft_args.model_path, self.runner.max_total_num_tokens)

    # ---- memory ----
    def _release(self, rid: str) -> None:
        state = self.states.pop(rid)
        self.pools.allocator.free(self.table[state.row, :state.spec_len])
        self.pools.req_to_token_pool.free(state.row)

    def _truncate(self, state: DraftState, length: int) -> None:
        if state.spec_len > length:
            self.pools.allocator.free(self.table[state.row, length:state.spec_len])
        state.kv_len = state.spec_len = length

    def _states_for(self, reqs: Sequence) -> List[DraftState]:
        live = {r.rid for r in reqs}
        for rid in [rid for rid in self.states if rid not in live]:
            self._release(rid)
        states = []
        for req in reqs:
            state = self.states.get(req.rid)
            if state is None:
                state = self.states[req.rid] = DraftState(self.pools.req_to_token_pool.alloc())
            # drafts of the last step are not part of the sequence yet
            self._truncate(state, min(state.kv_len, len(req.fill_ids) - 1))
            states.append(state)
        return states

    # ---- drafting ----
    def propose(self, reqs: Sequence, vocab_size: int) -> List[List[int]]:
        states = self._states_for(reqs)
        histories = [r.fill_ids for r in reqs]
        needed = sum(len(h) - s.kv_len for h, s in zip(histories, states)) + len(reqs) * (self.num_steps - 1)
        if needed > self.pools.allocator.available_size():
            return [[] for _ in reqs]  # the draft pool is full: verify the last tokens alone
        tokens = self._extend(states, histories, vocab_size)
        drafts = [[t] for t in tokens]
        for _ in range(self.num_steps - 1):
            tokens = self._decode(states, tokens, vocab_size)
            for draft, t in zip(drafts, tokens):
                draft.append(t)
        return drafts

    def commit(self, reqs: Sequence) -> None:
        """After the verify step: the draft KV of accepted tokens stays (the
        target's kv_len says how far the real sequence has KV now)."""
        for req in reqs:
            state = self.states.get(req.rid)
            if state is None:
                continue
            if req.finished:
                self._release(req.rid)
            else:
                self._truncate(state, min(req.kv_len, state.spec_len))

    def _extend(self, states: List[DraftState], histories: List[List[int]], vocab_size: int) -> List[int]:
        dev = self.runner.device
        prefix = [s.kv_len for s in states]
        seq = [len(h) for h in histories]
        slots = self.pools.allocator.alloc_extend(prefix, seq, [0] * len(states))
        ids, positions, start = [], [], 0
        for state, history, p, n in zip(states, histories, prefix, seq):
            self.table[state.row, p:n] = slots[start:start + n - p]
            ids += history[p:n]
            positions.append(torch.arange(p, n))
            state.kv_len = state.spec_len = n
            start += n - p
        lens = torch.tensor([n - p for p, n in zip(prefix, seq)], device=dev)
        fb = self._batch(ForwardMode.EXTEND, states, ids, torch.cat(positions).to(dev), slots, seq)
        fb.logits_indices = torch.cumsum(lens, 0) - 1
        fb.last_logit_rows = torch.arange(len(states), device=dev)
        set_extend_lens(fb, prefix, [n - p for p, n in zip(prefix, seq)], dev)
        return self._greedy(fb, vocab_size)

    def _decode(self, states: List[DraftState], last: List[int], vocab_size: int) -> List[int]:
        dev = self.runner.device
        positions = [s.spec_len for s in states]
        slots = self.pools.allocator.alloc_extend(positions, [p + 1 for p in positions], [0] * len(states))
        for state, slot in zip(states, slots.tolist()):
            self.table[state.row, state.spec_len] = slot
            state.spec_len += 1
        fb = self._batch(ForwardMode.DECODE, states, last, torch.tensor(positions, device=dev), slots,
                         [s.spec_len for s in states])
        return self._greedy(fb, vocab_size)

    def _batch(self, mode: ForwardMode, states, ids, positions, slots, seq_lens) -> ForwardBatch:
        dev = self.runner.device
        return ForwardBatch(
            forward_mode=mode, batch_size=len(states), input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=positions, req_pool_indices=torch.tensor([s.row for s in states], device=dev),
            seq_lens=torch.tensor(seq_lens, device=dev), out_cache_loc=slots, seq_lens_cpu=list(seq_lens),
            req_to_token_pool=self.pools.req_to_token_pool, kv_pool=self.pools.kv_pool)

    def _greedy(self, fb: ForwardBatch, vocab_size: int) -> List[int]:
        logits = self.runner.forward(fb).next_token_logits
        return logits[:, :vocab_size].argmax(-1).tolist()
