"""Admission control for prefill: which waiting requests join the next extend batch.

A request is admitted only if its new tokens plus a share of its expected
output fit in free KV memory after reserving room for the running requests'
expected growth (`new_token_ratio` of their remaining max_new_tokens). The
ratio adapts: it decays while decoding goes well and jumps back after a
retraction, as SGLang's does.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Callable, List, Optional

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
        lock: Callable[[Req], int] = lambda req: 0, unlock: Callable[[Req], None] = lambda req: None,
    ) -> None:
        """free_tokens counts evictable cache too; lock(req) pins a request's
        cached prefix and returns how many tokens stopped being evictable;
        unlock(req) undoes it for a request that did not fit."""
        self.lock, self.unlock = lock, unlock
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
        """Plan req's next extend. False when it does not fit, or when it was
        chunked (nothing more fits this round); the caller stops there (first
        come, first served: nobody jumps the queue)."""
        # A new (or retracted) request pins its cached prefix first: those
        # tokens were counted in free_tokens as evictable and are not any
        # more, so the fit checks below must see the budget without them.
        fresh = req.req_pool_idx is None
        locked = self.lock(req) if fresh else 0
        self.rem_total -= locked
        planned_before = len(self.plans)
        more = self._add_pinned(req)
        if fresh and len(self.plans) == planned_before:
            self.rem_total += locked
            self.unlock(req)
        return more

    def _add_pinned(self, req: Req) -> bool:
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


# Above this many waiting requests, prefix-aware ordering costs more than it
# saves; fall back to first come, first served (as SGLang does).
PREFIX_POLICY_MAX_QUEUE = 128


def order_waiting_queue(queue: List[Req], policy: str, prefix_cache) -> List[Req]:
    if policy == "fcfs" or len(queue) <= 1 or prefix_cache.tree is None:
        return queue
    if policy == "random":
        return random.sample(queue, len(queue))
    if len(queue) > PREFIX_POLICY_MAX_QUEUE:
        return queue
    for req in queue:
        prefix_cache.match(req)
    if policy == "lpm":
        # Longest cached prefix first; sorted() is stable, so ties stay in arrival order.
        return sorted(queue, key=lambda r: -r.prefix_len)
    return _dfs_weight_order(queue, prefix_cache.tree.root)


def _dfs_weight_order(queue: List[Req], root) -> List[Req]:
    """Walk the tree depth first, heaviest subtree (most waiting requests) first,
    so requests sharing a prefix run together while it is cached."""
    at_node = defaultdict(list)
    weight = defaultdict(int)
    for req in queue:
        at_node[id(req.last_node)].append(req)
        node = req.last_node
        while node is not None:
            weight[id(node)] += 1
            node = node.parent
    order: List[Req] = []
    stack = [root]
    while stack:
        node = stack.pop()
        order.extend(at_node.get(id(node), []))
        children = [c for c in node.children.values() if weight[id(c)]]
        stack.extend(sorted(children, key=lambda c: weight[id(c)]))  # heaviest popped first
    return order
