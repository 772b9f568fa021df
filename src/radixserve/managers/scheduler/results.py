"""The result processor: turns a BatchResult into request progress and the
outputs due now, which it returns (the loop sends them).

Extend results: the prompt's KV joins the prefix cache at once, requests whose
prefill completed take their first token and join the running batch. Decode
results: one token each; finished requests give their KV back. A mixed batch's
result is both, decode part first."""

from __future__ import annotations

import time
from typing import Any, Callable, List, Optional, Set

import torch

from radixserve.managers import io_struct as io
from radixserve.managers.batch_result import BatchResult
from radixserve.managers.logprobs import record_input_logprobs, record_output_logprob
from radixserve.managers.req import Req
from radixserve.managers.scheduler.grammar import GrammarWait
from radixserve.managers.scheduler.outputs import OutputBuilder, release_kv
from radixserve.managers.scheduler.running import RunningBatch
from radixserve.speculative.verify import SpecResult, keep_accepted_kv


class ResultProcessor:
    def __init__(self, prefix_cache, running: RunningBatch, outputs: OutputBuilder,
                 eos_token_ids: Set[int], context_len: int, tokenizer: Any) -> None:
        self.prefix_cache = prefix_cache
        self.running = running
        self.outputs = outputs
        self.eos_token_ids = eos_token_ids
        self.context_len = context_len
        self.tokenizer = tokenizer
        # Prefill/decode disaggregation (prefill side): takes a request its prefill
        # ended and returns True to keep it, its KV and its answer until the KV is sent.
        self.hand_off: Optional[Callable[[Req], bool]] = None

    def process(self, result: BatchResult) -> List[io.ReqOutput]:
        if isinstance(result, SpecResult):
            return self._process_verify(result)
        if not result.is_extend:
            return self._process_decode(result)
        # A mixed batch: the running requests' tokens first, then the new
        # requests join the running batch.
        outs = self._process_decode(result.decode_part) if result.decode_part is not None else []
        return outs + self._process_extend(result)

    def _process_extend(self, result: BatchResult) -> List[io.ReqOutput]:
        if result.sample is None:
            return self._process_embedding(result)
        batch = result.batch  # an extend batch is private: unchanged since launch
        if result.logits.all_logits is not None:
            record_input_logprobs(result.plans, result.logits.all_logits)
        next_ids, host = result.next_token_ids(), result.host_logprobs()
        keep = []
        for i, plan in enumerate(result.plans):
            req = plan.req
            # The prompt's KV joins the cache right away, not when the request
            # ends: requests queued behind it with the same prefix reuse it.
            if not req.to_abort:
                self.prefix_cache.cache_unfinished(req)
            if not plan.completes_prefill:
                continue  # a chunk: its sample is meaningless
            if req.sampling_params.max_new_tokens == 0:
                # Prefill only (SGLang's select/fork send it to score or cache a
                # prompt): no token, but the prompt's logprobs are recorded.
                req.finished_reason = {"type": "length", "length": 0}
                continue
            self.append_token(req, i, next_ids[i], host)
            if not req.finished:
                keep.append(i)
        finished = [p.req for p in result.plans if p.req.finished]
        kept = {id(r) for r in finished if self.hand_off is not None and self.hand_off(r)}
        release_kv(self.prefix_cache, [r for r in finished if id(r) not in kept])
        outs = self.outputs.build([p.req for p in result.plans if p.completes_prefill and id(p.req) not in kept])
        batch.filter(keep)
        self.running.absorb(batch)
        return outs

    def _process_embedding(self, result: BatchResult) -> List[io.ReqOutput]:
        """An embedding server's extend: each chunk's hidden states join the
        request's pooling; a completed prefill ends the request with its vector
        (no token, no decode) and its prompt's KV stays in the prefix cache."""
        for i, plan in enumerate(result.plans):
            req = plan.req
            if not req.to_abort:
                self.prefix_cache.cache_unfinished(req)
            req.pooled.add(result.logits, i, plan.extend_len)
            if plan.completes_prefill:
                req.embedding = req.pooled.embedding()
                req.finished_reason = {"type": "length", "length": 0}
        done = [p.req for p in result.plans if p.completes_prefill]
        release_kv(self.prefix_cache, done)
        return self.outputs.build(done)

    def _process_decode(self, result: BatchResult) -> List[io.ReqOutput]:
        next_ids, host = result.next_token_ids(), result.host_logprobs()
        live = []
        for i, req in enumerate(result.reqs):
            if req.finished:
                continue  # it ended one step earlier (overlap): this token is past its end
            self.append_token(req, i, next_ids[i], host)
            live.append(req)
        return self._output_and_release(live)

    def _process_verify(self, result: SpecResult) -> List[io.ReqOutput]:
        """A verify step: each request's accepted run, token by token, up to a
        stop; then its KV keeps the accepted path's nodes for the tokens kept
        (every other node's slot is freed now) and the batch's decode state follows."""
        batch, live = result.batch, []
        batch.spec_drafts, batch.spec_tree_mask = None, None
        for row, req in enumerate(result.reqs):
            if req.finished:
                continue
            start = req.kv_len - 1 - result.num_drafts[row]  # the position of its last token
            kept = 0
            for token, host in zip(result.tokens[row], result.logprobs):
                self.append_token(req, row, token, host)
                kept += 1
                if req.finished:
                    break
            req.spec_verify_ct += 1
            req.spec_draft_tokens += result.num_drafts[row]
            req.spec_accepted_tokens += len(result.tokens[row]) - 1
            path = result.paths[row] if result.paths is not None else None
            keep_accepted_kv(self.prefix_cache, batch.pools.kv_pool, req, start, path, kept)
            live.append(req)
        batch.seq_lens_cpu = torch.tensor([r.kv_len for r in batch.reqs], dtype=torch.int64)
        batch.seq_lens = batch.seq_lens_cpu.to(batch.device)
        batch.last_token_ids = torch.tensor([r.output_ids[-1] for r in batch.reqs], device=batch.device)
        return self._output_and_release(live)

    def _output_and_release(self, live: List[Req]) -> List[io.ReqOutput]:
        """The running requests' outputs after a step; the finished ones leave
        the running batch and give back their KV."""
        finished = [r for r in live if r.finished]
        outs = self.outputs.build(live)
        if finished:
            release_kv(self.prefix_cache, finished)
            self.running.remove(finished)
        return outs

    def append_token(self, req: Req, row: int, token: int, host) -> None:
        if not req.output_ids:
            req.first_token_at = time.monotonic()
        req.output_ids.append(token)
        GrammarWait.advance(req, token)
        if req.return_logprob:
            record_output_logprob(req, row, token, *host)
        req.check_finished(self.eos_token_ids, self.context_len, self.tokenizer)
