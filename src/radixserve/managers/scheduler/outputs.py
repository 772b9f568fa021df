"""What the scheduler says about requests (ReqOutput messages), how a request
that ends gives its KV back, and what a failed batch is."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from radixserve.managers import io_struct as io
from radixserve.managers.req import Req


def abort_reason(message: str = "aborted", status_code: Optional[int] = None) -> Dict[str, Any]:
    reason: Dict[str, Any] = {"type": "abort", "message": message}
    if status_code is not None:
        reason["status_code"] = status_code
    return reason


def release_kv(prefix_cache, reqs: List[Req]) -> None:
    """Ended requests' tokens join the prefix cache; aborted ones just let go."""
    for req in reqs:
        if req.finished_reason and req.finished_reason["type"] == "abort":
            prefix_cache.release(req)
        else:
            prefix_cache.cache_finished(req)


class BatchFailed(Exception):
    """Building or running a batch raised: the requests it touched, and why."""

    def __init__(self, reqs: List[Req], cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.reqs = list(reqs)
        self.cause = cause


class SchedulerStateLost(RuntimeError):
    """After failing a batch the KV accounting does not add up: the scheduler's
    state is unknown, so it must not go on serving."""


def is_fatal(exc: BaseException) -> bool:
    """Errors after which nothing on the device can be trusted (a CUDA error is
    sticky: every later kernel fails too); anything else fails only its batch."""
    return isinstance(exc, (MemoryError, SystemExit, KeyboardInterrupt)) or "CUDA error" in str(exc)


class OutputBuilder:
    """Turns requests into the ReqOutput messages due now: every finished one,
    and streamed ones with at least stream_interval new tokens."""

    def __init__(self, stream_interval: int, weight_version: Callable[[], str], speculative: bool = False) -> None:
        self.stream_interval = stream_interval
        self.weight_version = weight_version
        self.speculative = speculative  # outputs carry the verify counters

    def build(self, reqs: List[Req]) -> List[io.ReqOutput]:
        outs = []
        for req in reqs:
            new_tokens = len(req.output_ids) - req.sent_output_len
            if req.finished or (req.stream and new_tokens >= self.stream_interval):
                out = req_output(req, self.weight_version())
                if self.speculative:
                    out.spec = (req.spec_verify_ct, req.spec_draft_tokens, req.spec_accepted_tokens)
                outs.append(out)
        return outs


def req_output(req: Req, weight_version: str) -> io.ReqOutput:
    """The request's news since its last message (and mark it sent)."""
    sp = req.sampling_params
    out = io.ReqOutput(
        rid=req.rid,
        new_token_ids=req.output_ids[req.sent_output_len:],
        finished_reason=req.finished_reason,
        prompt_tokens=len(req.origin_input_ids),
        completion_tokens=len(req.output_ids),
        cached_tokens=req.cached_tokens or 0,
        cached_tokens_details=req.cached_tokens_details,
        skip_special_tokens=sp.skip_special_tokens,
        spaces_between_special_tokens=sp.spaces_between_special_tokens,
        no_stop_trim=sp.no_stop_trim or req.stopped_by_regex,
        stop_hold_back=max(sp.max_stop_str_len - 1, 0),
        queue_time=req.queue_time,
        first_token_at=req.first_token_at,
        weight_version=weight_version,
        embedding=req.embedding,
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
