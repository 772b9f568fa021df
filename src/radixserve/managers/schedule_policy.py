"""Admission control for prefill: which waiting requests join the next extend batch.

A request is admitted only if its new tokens plus a share of its expected
output fit in free KV memory after reserving room for the running requests'
expected growth (`new_token_ratio` of their remaining max_new_tokens). The
ratio adapts: it decays while decoding goes well and jumps back after a
retraction, as SGLang's does.
"""

from __future__ import annotations

from typing import List, Optional

from radixserve.managers.req import Req
from radixserve.managers.schedule_batch import ExtendPlan

# A request's reservation counts at most this many future tokens, so one
# request with a huge max_new_tokens does not block admission forever.
CLIP_MAX_NEW_TOKENS = 4096


def remaining_new_tokens(req: Req) -> int:
    return min(req.sampling_params.max_new_tokens - len(req.output_ids), CLIP_MAX_NEW_TOKENS)


class NewTokenRatio:
    def __init__(self, conservativeness: float) -> None:
        self.init = min(0.7 * conservativeness, 1.0)
        self.min = min(0.1 * conservativeness, 1.0)
        self.decay = (self.init - self.min) / 600
        self.value = self.init

    def step(self) -> None:
        self.value = max(self.value - self.decay, self.min)

    def on_retract(self) -> None:
        self.value = self.init


class PrefillAdder:
    def __init__(
        self, free_tokens: int, running_reqs: List[Req], ratio: float, page_size: int,
        chunk_budget: Optional[int], max_prefill_tokens: int,
    ) -> None:
        self.page_size = page_size
        reserved = sum(remaining_new_tokens(r) for r in running_reqs) * ratio
        self.rem_total = free_tokens - reserved
        self.rem_chunk = chunk_budget
        self.rem_input = max_prefill_tokens
        self.ratio = ratio
        # With nothing running, nothing will free memory later: admit the first
        # request on its raw token count alone, or it could wait forever.
        self.lenient = not running_reqs
        self.plans: List[ExtendPlan] = []
        self.new_chunked_req: Optional[Req] = None

    def _page_round(self, n: int) -> int:
        return -(-n // self.page_size) * self.page_size

    def add(self, req: Req) -> bool:
        """Plan req's next extend. False when it does not fit; the caller stops there
        (first come, first served: nobody jumps the queue)."""
        extend_len = req.seq_len - req.kv_len
        if self.rem_chunk is not None and extend_len > self.rem_chunk:
            # Chunk it: the budget left, page-aligned so the next chunk starts on a page.
            chunk = self.rem_chunk // self.page_size * self.page_size
            if chunk <= 0 or self._page_round(chunk) + self._slack() > self.rem_total:
                return False
            self._plan(req, chunk)
            self.new_chunked_req = req
            self.rem_chunk = 0
            return False  # nothing more fits this round
        reserve = self._page_round(extend_len) + self._slack()
        if not (self.lenient and not self.plans):
            reserve += remaining_new_tokens(req) * self.ratio
        if reserve > self.rem_total or (extend_len > self.rem_input and self.plans):
            return False
        self._plan(req, extend_len)
        self.rem_total -= reserve
        self.rem_input -= extend_len
        if self.rem_chunk is not None:
            self.rem_chunk -= extend_len
        return True

    def _slack(self) -> int:
        """A partly filled last page of the prefix may need one more page."""
        return 0 if self.lenient and not self.plans else self.page_size

    def _plan(self, req: Req, extend_len: int) -> None:
        self.plans.append(
            ExtendPlan(
                req, extend_len, input_logprob_positions(req, extend_len),
                completes_prefill=req.kv_len + extend_len == req.seq_len,
            )
        )


def input_logprob_positions(req: Req, extend_len: int) -> range:
    """Positions in [kv_len, kv_len + extend_len) whose logits score the next
    prompt token, for tokens at index >= logprob_start_len."""
    if req.input_logprobs_done:
        return range(0)
    start = req.kv_len
    first = max(start, req.logprob_start_len - 1, 0)
    last = min(start + extend_len, len(req.origin_input_ids) - 1)
    return range(first, max(first, last))
