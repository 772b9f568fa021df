"""EAGLE drafts: a small head over the target's own hidden states, run by a
DraftRunner with its own KV. EAGLE3 heads (models/llama_eagle3.py) read three
of the target's layers; EAGLE (EAGLE-1/2) heads (models/llama_eagle.py) read
its final-normed output and may draft over a token map's "hot" tokens.

Each target forward (prefill chunks, verify steps, plain decode steps run
eagerly) captures the head's features for every token; they wait on the
request (`Req.spec_features`: (first position, [m, 3H]) pieces) until the
next draft. The head pairs the features of position p with the token at
p + 1, so drafting is one extend over the new pairs (the last pair ends at
the request's last token and gives draft 1) and k - 1 decode steps feeding
the head's own output back. A finished request's entries stay in the draft's
prefix tree (draft_prefix.py), for the next request that shares its tokens.
Positions without features (a prefix the target took from its radix cache
beyond the draft's, a CUDA-graph decode step) are skipped: the draft KV is
compact; a request whose last pair is missing drafts nothing this step.

With --speculative-eagle-topk K > 1 the drafts are a tree (topk_tree.py):
each later step is one extend over every request's frontier and the
frontier's ancestors (DraftRunner.tree_step), each node at its depth's
position and seeing only its own ancestors (a tree mask), reading its
parent's output hidden state; its entries are dropped before the next step
(a node must not see its cousins) and after the last. These extends carry
tree masks, so they run eagerly (the draft's CUDA graphs cover the chain's
forwards; the verify graph covers trees)."""

from __future__ import annotations

import logging
from typing import List, Sequence, Tuple

import torch

from radixserve.layers.sampler import row_argmax
from radixserve.model_executor.spec_graph_runner import SpecGraphShape
from radixserve.speculative.draft_runner import DraftRunner, DraftState, draft_rows_per_req
from radixserve.speculative.tree import DraftTree

logger = logging.getLogger(__name__)

# --speculative-algorithm -> (the head's architecture, its name in messages)
HEADS = {"EAGLE": ("LlamaForCausalLMEagle", "EAGLE"), "EAGLE3": ("LlamaForCausalLMEagle3", "EAGLE-3")}


class EagleDrafter:
    def __init__(self, args, target) -> None:
        self.draft = DraftRunner(args, target)
        self.head = self.draft.model
        architecture, name = HEADS[args.speculative_algorithm]
        if type(self.head).__name__ != architecture:
            raise ValueError(f"speculative_draft_model_path {args.speculative_draft_model_path!r} is not an "
                             f"{name} head (architectures: {architecture})")
        if args.speculative_token_map is not None:
            self.head.attach_target(target.model, load_token_map(args.speculative_token_map,
                                                                 target.config.vocab_size))
        else:
            self.head.attach_target(target.model)
        self.num_steps = args.speculative_num_steps
        self.topk = args.speculative_eagle_topk or 1
        self.tree_budget = args.speculative_num_draft_tokens - 1
        if self.topk > self.head.draft_vocab_size:
            raise ValueError(f"speculative_eagle_topk ({self.topk}) exceeds the head's draft vocabulary "
                             f"({self.head.draft_vocab_size})")
        self.aux_layers: Tuple[int, ...] = self.head.target_feature_layers(target.config.num_hidden_layers)
        want = len(self.aux_layers) * target.config.hidden_size
        if self.head.feature_dim != want:
            raise ValueError(f"the {name} head reads {self.head.feature_dim} features per token; "
                             f"this target gives {want}")

    @property
    def makes_trees(self) -> bool:
        return self.topk > 1

    def graph_shapes(self, width: int, max_bs: int) -> List[SpecGraphShape]:
        """The head's forwards: its extend over new (feature, token) pairs, which
        after a verify step are at most `width` per request, and its one-token
        steps over its own output hidden state."""
        return [SpecGraphShape(width, max_bs, spec_hidden_dim=self.head.feature_dim),
                SpecGraphShape(1, max_bs, spec_hidden_dim=self.head.config.hidden_size)]

    # ---- the target's features ----
    def keep_features(self, reqs: Sequence, firsts: List[int], lens: List[int], aux: torch.Tensor) -> None:
        """aux: [sum(lens), feature_dim], request i's rows are positions firsts[i] onward."""
        start = 0
        for req, first, n in zip(reqs, firsts, lens):
            req.spec_features.append((first, aux[start:start + n]))
            start += n

    def _new_pairs(self, req, next_position: int) -> Tuple[List[int], List[torch.Tensor]]:
        """Positions (and their features) from next_position on whose next token is known."""
        last = len(req.fill_ids) - 1
        positions, feats = [], []
        for first, piece in req.spec_features:
            lo, hi = max(first, next_position), min(first + len(piece), last)
            if hi > lo:
                positions += range(lo, hi)
                feats.append(piece[lo - first:hi - first])
        req.spec_features = []
        return positions, feats

    # ---- drafting ----
    def propose(self, reqs: Sequence, vocab_size: int) -> List[List[int]]:
        draft = self.draft
        states = draft.states_for(reqs)
        drafts: List[List[int]] = [[] for _ in reqs]
        rows, ids, positions, feats = [], [], [], []
        for i, (req, state) in enumerate(zip(reqs, states)):
            pos, f = self._new_pairs(req, state.next_position)
            if pos:
                history = req.fill_ids
                rows.append(i)
                ids.append([history[p + 1] for p in pos])
                positions.append(pos)
                feats += f
                state.next_position = pos[-1] + 1
        needed = sum(map(len, ids)) + len(rows) * draft_rows_per_req(self.num_steps, self.topk)
        if not rows or not draft.has_room(needed):
            return drafts
        active = [states[i] for i in rows]
        # (positions increase: they are contiguous from kv_len when the last is kv_len + count - 1)
        dense = [s.dense_len == s.kv_len == pos[0] and pos[-1] == pos[0] + len(pos) - 1
                 for s, pos in zip(active, positions)]
        out = draft.extend(active, ids, positions, torch.cat(feats))
        for state, whole in zip(active, dense):
            state.kv_len = state.spec_len  # entries from real tokens and target features
            if whole:  # no position skipped so far: entry i stands at position i
                state.dense_len = state.kv_len
        # only requests whose last pair ends at their last token can draft
        ready = [j for j, i in enumerate(rows) if positions[j][-1] == len(reqs[i].fill_ids) - 2]
        if not ready:
            return drafts
        index = torch.tensor(ready, device=out.hidden.device)
        hidden, logits = out.hidden[index], out.next_token_logits[index]
        chain_states = [active[j] for j in ready]
        position = [positions[j][-1] + 1 for j in ready]
        if self.makes_trees:
            trees = self._trees(chain_states, position, hidden, logits)
            for j, tree in zip(ready, trees):
                drafts[rows[j]] = tree
            return drafts
        tokens = self._tokens(logits)
        for j, t in zip(ready, tokens):
            drafts[rows[j]].append(t)
        for step in range(1, self.num_steps):
            out = draft.decode(chain_states, tokens, [p + step - 1 for p in position], hidden)
            hidden, tokens = out.hidden, self._tokens(out.next_token_logits)
            for j, t in zip(ready, tokens):
                drafts[rows[j]].append(t)
        return drafts

    # ---- top-K trees ----
    def _topk(self, logits: torch.Tensor) -> Tuple[List[List[int]], List[List[float]]]:
        """Each row's K likeliest target tokens and their log-probabilities (one host sync)."""
        values, ids = logits.float().log_softmax(-1).topk(self.topk, dim=-1)
        return self.head.to_target_ids(ids).tolist(), values.tolist()

    def _trees(self, states: List[DraftState], base: List[int], hidden: torch.Tensor,
               logits: torch.Tensor) -> List[DraftTree]:
        """Per request: base[i] is where its depth-1 nodes stand (its last
        token's position), hidden/logits the head's output after its last pair."""
        # a node's source: its input hidden state (its parent's output)
        return self.draft.draft_trees(states, base, logits, self._topk, self.topk, self.num_steps,
                                      self.tree_budget, first_sources=hidden)

    def _tokens(self, logits: torch.Tensor) -> List[int]:
        return self.head.to_target_ids(row_argmax(logits)).tolist()

    def commit(self, reqs: Sequence) -> None:
        """Drop the chain's draft KV (the next extend recomputes accepted
        positions from the target's features) and features of rejected drafts.
        (A finished request's state already ended with its KV: DraftRunner.finish.)"""
        for req in reqs:
            state = self.draft.states.get(req.rid)
            if req.finished:
                req.spec_features = []
                continue
            if state is not None:
                self.draft.truncate(state, state.kv_len)
            req.spec_features = [(first, piece[:max(req.kv_len - first, 0)])
                                 for first, piece in req.spec_features if first < req.kv_len]


def load_token_map(path: str, vocab_size: int) -> torch.Tensor:
    """--speculative-token-map: a torch file holding the hot token ids (a 1-D
    integer tensor or list, as SGLang's FR-Spec maps); their order is the draft vocabulary's."""
    try:
        ids = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"speculative_token_map {path!r} cannot be read as a torch file of token ids: {e}") from e
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"speculative_token_map {path!r} must hold a non-empty 1-D integer tensor of token ids, "
                         f"got {ids.dtype} of shape {tuple(ids.shape)}")
    ids = ids.to(torch.int64)
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"speculative_token_map {path!r} holds ids outside the target's vocabulary [0, {vocab_size})")
    if len(torch.unique(ids)) != len(ids):
        raise ValueError(f"speculative_token_map {path!r} repeats token ids")
    return ids
