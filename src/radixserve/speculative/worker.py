"""The scheduler's side of speculative decoding: when a decode step
speculates, which drafter proposes, and the verify step itself.

A running batch speculates when it is small enough (`--speculative-max-batch-size`:
at large batches the target's forward is compute-bound and verifying drafts
costs more than it saves), no request in it is constrained by a grammar
(its mask would have to follow each draft token) and, unless
`--disable-speculative-adaptive`, the governor (governor.py) has measured
that speculating costs less per token than plain steps; otherwise the step is
a plain decode step."""

from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional, Tuple

import torch

from radixserve.layers.sampler import Sampler
from radixserve.managers.schedule_batch import ScheduleBatch
from radixserve.model_executor.spec_graph_runner import SpecGraphRunner, SpecGraphShape
from radixserve.sampling.sampling_batch_info import SamplingBatchInfo
from radixserve.speculative.governor import SpecGovernor
from radixserve.speculative.spec_args import HEAD_ALGORITHMS
from radixserve.speculative.verify import SpecResult, accept, prepare_verify

logger = logging.getLogger(__name__)


def verify_batch_limit(limit: int, runner: Any, tokens_per_req: int) -> int:
    """The largest running batch that speculates: `limit`, and where the CPU's
    fused decode layers run (runner.cpu_decode_layers), no more requests than
    keep a verify's rows on them. A larger verify runs eagerly through the
    dense copies: on a 2-core Zen 4, 5-8 requests' verify took about 38 ms
    against 10 for their plain step, and batches of 16 and 64 lost 12-18% to
    speculation in their drained tails (docs/benchmarks.md)."""
    layers = getattr(runner, "cpu_decode_layers", None)
    if layers is None:
        return limit
    fitting = [b for b in range(1, limit + 1) if layers.takes_decode_rows(b * tokens_per_req)]
    return max(fitting, default=limit)


def make_spec_worker(args: Any, runner: Any, eos_token_ids) -> Optional["SpecWorker"]:
    """The scheduler's worker, or None when speculation is off."""
    if not args.speculative_algorithm:
        return None
    if hasattr(getattr(runner, "config", None), "vision_config"):  # verify steps know no M-RoPE positions
        raise ValueError("speculative_algorithm cannot be combined with a vision-language model yet")
    return SpecWorker(args, runner, eos_token_ids)


def make_drafter(args: Any, runner: Any) -> Any:
    algo = args.speculative_algorithm
    if algo == "NGRAM":
        from radixserve.speculative.ngram import NgramDrafter, TreeShape

        shape = TreeShape(args.speculative_num_draft_tokens - 1, args.speculative_num_steps,
                          args.speculative_ngram_min_bfs_breadth, args.speculative_ngram_max_bfs_breadth)
        drafter = NgramDrafter(args.speculative_num_steps, args.speculative_ngram_max_trie_depth,
                               args.speculative_ngram_capacity, args.speculative_ngram_match_type, shape)
        return _refuse_trees_on_mla(drafter, runner, "speculative_ngram_max_bfs_breadth")
    if algo in HEAD_ALGORITHMS:
        from radixserve.speculative.eagle import EagleDrafter

        return _refuse_trees_on_mla(EagleDrafter(args, runner), runner, "speculative_eagle_topk")
    if algo == "STANDALONE":
        from radixserve.speculative.standalone import StandaloneDrafter

        return _refuse_trees_on_mla(StandaloneDrafter(args, runner), runner, "speculative_eagle_topk")
    raise ValueError(f"speculative_algorithm={algo} is not available")


def _refuse_trees_on_mla(drafter: Any, runner: Any, flag: str) -> Any:
    if drafter.makes_trees and _is_mla(runner):
        raise ValueError(f"{flag} > 1 (tree drafts) cannot be combined with an MLA model yet "
                         "(its attention takes no tree mask); use 1 for chains")
    return drafter


def _is_mla(runner: Any) -> bool:
    from radixserve.mem_cache.kv_layout import MLAKVLayout

    return isinstance(getattr(runner, "kv_layout", None), MLAKVLayout)


def graph_replays(runner: Any) -> int:
    """Forwards of `runner` that replayed a speculative CUDA graph."""
    return sum(g.replays for g in getattr(runner, "graph_runners", ()) if isinstance(g, SpecGraphRunner))


def path_rows(rows: Any, lens: List[int], paths: List[List[int]]) -> Tuple[Any, List[int]]:
    """Of a verify forward's per-row outputs (request i's lens[i] rows in a
    row), each request's root row and its accepted rows in path order."""
    index, start = [], 0
    for n, path in zip(lens, paths):
        index += [start] + [start + r for r in path]
        start += n
    return rows[torch.tensor(index, dtype=torch.int64, device=rows.device)], [1 + len(p) for p in paths]


class SpecWorker:
    def __init__(self, args: Any, runner: Any, eos_token_ids) -> None:
        self.runner = runner
        self.eos_token_ids = eos_token_ids
        self.drafter = make_drafter(args, runner)
        self.num_steps = args.speculative_num_steps
        self.num_draft_tokens = args.speculative_num_draft_tokens
        self.makes_trees = getattr(self.drafter, "makes_trees", False)
        self.off_first_branch = 0  # accepted paths that left a node's first child (trees only)
        self.max_batch_size = verify_batch_limit(args.speculative_max_batch_size, runner, self.num_draft_tokens)
        self.algorithm = args.speculative_algorithm
        self.sampler = Sampler()
        self.verify_ct = 0  # verify steps so far
        self.verified_rows = 0  # requests they verified (a step verifies its whole batch)
        self.emitted = 0  # tokens they produced
        self.governor = None if args.disable_speculative_adaptive else SpecGovernor()
        self._counts_at_step = (0, 0)  # (emitted, verified_rows) when the timed step started
        self._planned: Optional[bool] = None  # plan_next_decode's decision, for the next decode step
        if runner.device.type == "cuda" and not args.disable_cuda_graph:
            self._add_graphs()

    def _add_graphs(self) -> None:
        """CUDA graphs for the verify step and the draft model's forwards, for
        batches up to the largest that speculates."""
        max_bs = min(self.max_batch_size, self.runner.max_running_requests)
        aux_layers = getattr(self.drafter, "aux_layers", None)
        self.runner.add_spec_graphs([SpecGraphShape(self.tokens_per_req, max_bs, aux_layers=aux_layers,
                                                    tree=self.makes_trees)])
        if hasattr(self.drafter, "graph_shapes"):
            self.drafter.draft.runner.add_spec_graphs(self.drafter.graph_shapes(self.tokens_per_req, max_bs))

    def follow_load(self, requests: Callable[[], int]) -> None:
        """requests(): how many requests run and wait. While they are more than
        a speculating batch, an admitted request takes the target's whole cached
        prefix: the head's catch-up (draft_prefix.CATCH_UP_TOKENS recomputed)
        pays only if it speculates soon. Without this, repeated prompts of under
        64 tokens were prefilled again in every batch of 16 and 64 that never
        speculated (0.39 against 0.07 s of prefill GEMMs for 16, 2-core Zen 4)."""
        draft = getattr(self.drafter, "draft", None)  # (a DraftRunner; NGRAM drafts without one)
        if draft is not None:
            draft.catch_up = lambda: requests() <= self.max_batch_size

    @property
    def tokens_per_req(self) -> int:
        """KV positions one verify step may need per request: its last token
        and its drafts (a chain: one per step; a tree: up to num_draft_tokens - 1)."""
        return self.num_draft_tokens

    def eligible(self, reqs: List[Any]) -> bool:
        return 0 < len(reqs) <= self.max_batch_size and all(r.grammar is None for r in reqs)

    def prepare(self, batch: ScheduleBatch) -> bool:
        """Draft, then allocate the verify step's KV (RunningBatch.next_decode made room)."""
        drafts = self.drafter.propose(batch.reqs, self.runner.vocab_size)
        return prepare_verify(batch, drafts)

    def _decide(self, reqs: List[Any]) -> bool:
        """Whether a decode step of these requests speculates."""
        return self.eligible(reqs) and (self.governor is None or self.governor.choose(len(reqs)))

    def plan_next_decode(self, running: Any) -> bool:
        """Under the overlap schedule, while a plain step is in flight: the next
        decode step's mode, decided now. True: it speculates, and its drafts
        need the in-flight step's tokens, so the scheduler processes them first;
        False: the plain step overlaps as without speculation."""
        self._planned = self._decide(running.reqs)
        return self._planned

    def next_decode(self, running: Any) -> Tuple[Optional[ScheduleBatch], List[Any]]:
        """The running batch prepared for a verify step when it qualifies, else for a plain decode step."""
        reqs = running.reqs
        planned, self._planned = self._planned, None
        if self.governor is not None:
            self._close_timed_step()
        eligible = self.eligible(reqs)
        if planned is not None:  # decided while the last step was in flight (plan_next_decode)
            speculate = planned and eligible
        else:
            speculate = eligible and (self.governor is None or self.governor.choose(len(reqs)))
        if self.governor is not None and eligible:
            self.governor.step_started(len(reqs), speculate)
            self._counts_at_step = (self.emitted, self.verified_rows)
        if speculate:
            return running.next_decode(self.tokens_per_req, self.prepare)
        return running.next_decode()

    def _close_timed_step(self) -> None:
        """The last decode step's results are processed: its tokens per request
        (a verify step's accepted runs; one for a plain step) go to the governor."""
        emitted, rows = self.emitted - self._counts_at_step[0], self.verified_rows - self._counts_at_step[1]
        self.governor.step_finished(emitted / rows if rows else 1.0)

    def launch(self, batch: ScheduleBatch, sample: Callable[[ScheduleBatch, Any], Any]) -> Any:
        """Any batch's forward: a verify step's, or a plain one's (its hidden
        states kept for the draft head; `sample` is the scheduler's)."""
        if batch.spec_drafts is not None:
            return self.verify(batch)
        if self.governor is not None and batch.forward_mode.is_extend():
            self.governor.interrupt()  # a prefill's time is no decode step's
        fb = batch.to_forward_batch()
        self.before_target_forward(fb)
        logits = self.runner.forward(fb)
        self.after_target_forward(batch, logits)
        return sample(batch, logits)

    def verify(self, batch: ScheduleBatch) -> SpecResult:
        """The verify forward and the accepted tokens (synchronously)."""
        if batch.sampling_info is None:
            batch.sampling_info = SamplingBatchInfo.from_reqs(batch.reqs, self.runner.vocab_size, batch.device,
                                                              self.eos_token_ids)
        fb = batch.to_forward_batch()
        self.before_target_forward(fb)
        out = self.runner.forward(fb)
        logits = out.all_logits if out.all_logits is not None else out.next_token_logits
        result = accept(batch, logits, batch.sampling_info, self.sampler)
        self.after_target_forward(batch, out, result.paths if self.makes_trees else None)
        self.verify_ct += 1
        self.verified_rows += len(result.reqs)
        self.emitted += sum(map(len, result.tokens))
        if self.makes_trees:
            self.off_first_branch += sum(not tree.on_first_branch(p)
                                         for tree, p in zip(batch.spec_drafts, result.paths))
        return result

    # ---- the target's hidden states, for draft heads that read them (EAGLE, EAGLE-3) ----
    def before_target_forward(self, fb: Any) -> None:
        fb.capture_aux_layers = getattr(self.drafter, "aux_layers", None)

    def after_target_forward(self, batch: ScheduleBatch, out: Any, paths: Optional[List[List[int]]] = None) -> None:
        """Every target forward's captured states wait on their requests for
        the next draft. paths: a tree verify's accepted rows per request; only
        the root's and theirs are kept, in path order (the positions they now hold)."""
        if out.aux_hidden is None:
            return
        if batch.forward_mode.is_extend():
            aux, lens = out.aux_hidden, batch._extend_lens
            if paths is not None:
                aux, lens = path_rows(aux, lens, paths)
            self.drafter.keep_features(batch.reqs, batch._prefix_lens, lens, aux)
        else:  # a plain decode step: each request's input token stands at seq_len - 1
            firsts = (batch.seq_lens_cpu - 1).tolist()
            self.drafter.keep_features(batch.reqs, firsts, [1] * len(firsts), out.aux_hidden)

    def commit(self, result: SpecResult) -> None:
        """After the result was processed: the drafter keeps what was accepted."""
        self.drafter.commit(result.reqs)

    def info(self) -> dict:
        """For get_server_info."""
        draft = getattr(self.drafter, "draft", None)  # a DraftRunner (STANDALONE, EAGLE-3)
        return {"algorithm": self.algorithm, "num_steps": self.num_steps, "verify_ct": self.verify_ct,
                "num_draft_tokens": self.num_draft_tokens, "trees": self.makes_trees,
                "off_first_branch": self.off_first_branch,
                "mean_accept_length": self.mean_accept_length(), "max_batch_size": self.max_batch_size,
                "adaptive": None if self.governor is None else self.governor.info(),
                "draft_kv": None if draft is None else draft.kv_info(),
                "graph_replays": {"target": graph_replays(self.runner),
                                  "draft": graph_replays(getattr(draft, "runner", None))}}

    def mean_accept_length(self) -> Optional[float]:
        """Tokens per request per verify step, over every step so far."""
        return self.emitted / self.verified_rows if self.verified_rows else None
