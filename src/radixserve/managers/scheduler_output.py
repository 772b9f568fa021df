"""The scheduler's bookkeeping after a forward: append tokens, finish, free, send."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, List

from radixserve.managers import io_struct as io
from radixserve.managers.logprobs import record_input_logprobs, record_output_logprob
from radixserve.managers.req import Req

if TYPE_CHECKING:
    from radixserve.managers.batch_result import BatchResult
    from radixserve.managers.scheduler import Scheduler


class SchedulerOutputMixin:
    def process_batch_result(self: "Scheduler", result: "BatchResult") -> None:
        if result.is_extend:
            self.process_extend_result(result)
        else:
            self.process_decode_result(result)

    def process_extend_result(self: "Scheduler", result: "BatchResult") -> None:
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
            self._append_token(req, i, next_ids[i], host)
            if not req.finished:
                keep.append(i)
        finished = [p.req for p in result.plans if p.req.finished]
        self.finish_requests(finished)
        self.send_outputs([p.req for p in result.plans if p.completes_prefill])
        batch.filter(keep)
        if not batch.is_empty():
            self.running_batch.merge(batch)

    def process_decode_result(self: "Scheduler", result: "BatchResult") -> None:
        next_ids, host = result.next_token_ids(), result.host_logprobs()
        live = []
        for i, req in enumerate(result.reqs):
            if req.finished:
                continue  # it ended one step earlier (overlap): this token is past its end
            self._append_token(req, i, next_ids[i], host)
            live.append(req)
        finished = [r for r in live if r.finished]
        self.send_outputs(live)
        if finished:
            self.finish_requests(finished)
            self.running_batch.filter_out(finished)

    def _append_token(self: "Scheduler", req: Req, row: int, token: int, host) -> None:
        if not req.output_ids:
            req.first_token_at = time.monotonic()
        req.output_ids.append(token)
        self.advance_grammar(req, token)
        if req.return_logprob:
            record_output_logprob(req, row, token, *host)
        req.check_finished(self.eos_token_ids, self.context_len, self.tokenizer)

    def finish_requests(self: "Scheduler", reqs: List[Req]) -> None:
        """Finished requests' tokens join the prefix cache; aborted ones just let go."""
        for req in reqs:
            if req.finished_reason and req.finished_reason["type"] == "abort":
                self.prefix_cache.release(req)
            else:
                self.prefix_cache.cache_finished(req)

    # ---- aborts ----
    def abort(self: "Scheduler", msg: io.AbortReq) -> None:
        def matches(req: Req) -> bool:
            # An n > 1 request's copies share its rid as a prefix.
            return msg.abort_all or req.rid == msg.rid or req.rid.startswith(f"{msg.rid}#")

        for req in self.grammar_queue:
            req.to_abort = req.to_abort or matches(req)  # reaped when its compile finishes
        waiting = [r for r in self.waiting_queue if matches(r)]
        self.waiting_queue = [r for r in self.waiting_queue if not matches(r)]
        for req in waiting:
            req.finished_reason = {"type": "abort", "message": "aborted"}
        self.send_outputs(waiting)
        for req in self.kv_holders():
            if matches(req):
                req.to_abort = True
        self.reap_aborted()

    def reap_aborted(self: "Scheduler") -> None:
        """End aborted running requests now, freeing their KV at once."""
        batch = self.running_batch
        aborted = [r for r in batch.reqs if r.to_abort]
        if self.chunked_req is not None and self.chunked_req.to_abort:
            aborted.append(self.chunked_req)
            self.chunked_req = None
            self.last_was_chunk = False
        if not aborted:
            return
        for req in aborted:
            req.finished_reason = {"type": "abort", "message": "aborted"}
        self.finish_requests(aborted)
        self.send_outputs(aborted)
        batch.filter([i for i, r in enumerate(batch.reqs) if not r.to_abort])

    # ---- sending ----
    def send_outputs(self: "Scheduler", reqs: List[Req]) -> None:
        interval = self.server_args.stream_interval
        outs = []
        for req in reqs:
            new_tokens = len(req.output_ids) - req.sent_output_len
            if not req.finished and not (req.stream and new_tokens >= interval):
                continue
            outs.append(_req_output(req, self.weight_version))
        if outs:
            self.send_sock.send_pyobj(io.BatchTokenIDOut(outs))


def _req_output(req: Req, weight_version: str) -> io.ReqOutput:
    sp = req.sampling_params
    out = io.ReqOutput(
        rid=req.rid,
        new_token_ids=req.output_ids[req.sent_output_len:],
        finished_reason=req.finished_reason,
        prompt_tokens=len(req.origin_input_ids),
        completion_tokens=len(req.output_ids),
        cached_tokens=req.cached_tokens or 0,
        skip_special_tokens=sp.skip_special_tokens,
        spaces_between_special_tokens=sp.spaces_between_special_tokens,
        no_stop_trim=sp.no_stop_trim,
        stop_hold_back=max(sp.max_stop_str_len - 1, 0),
        queue_time=req.queue_time,
        first_token_at=req.first_token_at,
        weight_version=weight_version,
    )
    req.sent_output_len = len(req.output_ids)
    if req.return_logprob:
        start = req.sent_logprob_len
        out.output_token_logprobs = req.output_token_logprobs[start:]
        if req.top_logprobs_num > 0:
            out.output_top_logprobs = req.output_top_logprobs[start:]
        req.sent_logprob_len = len(req.output_token_logprobs)
        if not req.sent_input_logprobs and req.input_logprobs_done:
            out.input_token_logprobs = req.input_token_logprobs
            out.input_top_logprobs = req.input_top_logprobs if req.top_logprobs_num > 0 else None
            req.sent_input_logprobs = True
    return out
