"""The running batch: requests that have their KV and decode one token per step.

Before each decode step it makes room for the new tokens: it evicts cached
prefixes, and when that is not enough it retracts the newest request (its KV
is freed and it goes back to the front of the queue, to be prefilled again).
"""

from __future__ import annotations

import logging
from typing import Callable, List, Optional, Tuple

import torch

from radixserve.managers.req import Req
from radixserve.managers.schedule_batch import ScheduleBatch
from radixserve.managers.schedule_policy import NewTokenRatio
from radixserve.managers.scheduler.outputs import BatchFailed, abort_reason, release_kv

logger = logging.getLogger(__name__)


class RunningBatch:
    def __init__(self, pools, device: torch.device, ratio: NewTokenRatio,
                 requeue: Callable[[Req], None]) -> None:
        self.batch = ScheduleBatch([], pools, device)
        self.prefix_cache = pools.prefix_cache
        self.allocator = pools.allocator
        self.ratio = ratio
        self.requeue = requeue
        self.num_retractions = 0

    @property
    def reqs(self) -> List[Req]:
        return self.batch.reqs

    def __len__(self) -> int:
        return len(self.batch)

    def is_empty(self) -> bool:
        return self.batch.is_empty()

    # ---- membership ----
    def absorb(self, batch: ScheduleBatch) -> None:
        """Requests whose prefill completed join (their sampling state with them)."""
        if not batch.is_empty():
            self.batch.merge(batch)

    def remove(self, reqs: List[Req]) -> None:
        self.batch.filter_out(reqs)

    def mark_aborted(self, matches: Callable[[Req], bool]) -> None:
        for req in self.batch.reqs:
            if matches(req):
                req.to_abort = True

    def reap_aborted(self) -> List[Req]:
        """End aborted requests now, freeing their KV at once."""
        aborted = [r for r in self.batch.reqs if r.to_abort]
        if aborted:
            for req in aborted:
                req.finished_reason = abort_reason()
            release_kv(self.prefix_cache, aborted)
            self.remove(aborted)
        return aborted

    # ---- the next decode step ----
    def decode_fits(self) -> bool:
        """Would the next decode step fit, evicting cached prefixes if need be?"""
        needed = self.batch.decode_tokens_needed()
        return self.allocator.available_size() + self.prefix_cache.evictable_size() >= needed

    def next_decode(self, tokens_per_req: int = 1, prepare: Optional[Callable[[ScheduleBatch], bool]] = None
                    ) -> Tuple[Optional[ScheduleBatch], List[Req]]:
        """(the batch prepared for one decode step or None, requests ended for lack of memory).
        A speculative verify step passes its own prepare and the most KV
        positions it may add per request."""
        batch = self.batch
        prepare = prepare or ScheduleBatch.prepare_for_decode
        while True:
            if batch.is_empty():
                return None, []
            if self.prefix_cache.make_room(batch.decode_tokens_needed(tokens_per_req)):
                try:
                    if prepare(batch):
                        break
                except Exception as e:
                    raise BatchFailed(batch.reqs, e) from e
                # make_room promised the slots; if the allocator still says no,
                # treat it as memory pressure rather than run without them.
                logger.warning("decode allocation failed after make_room; retracting")
            if len(batch) == 1:
                # One request has the whole pool: it cannot grow; end it.
                req = batch.reqs[0]
                req.finished_reason = {"type": "length", "length": len(req.output_ids)}
                release_kv(self.prefix_cache, [req])
                batch.filter([])
                return None, [req]
            self.retract_last()
        self.ratio.step()
        return batch, []

    def retract_last(self) -> None:
        """Free the newest request's KV and requeue it at the front; it will
        prefill its prompt and output so far again and carry on."""
        batch = self.batch
        req = batch.reqs[-1]
        batch.filter(list(range(len(batch) - 1)))
        self.retract(req)

    def retract(self, req: Req) -> None:
        """Free a request's own KV (what is in the radix cache stays there) and
        requeue it at the front. It is not (or no longer) in the batch."""
        self.prefix_cache.release(req)
        req.reset_for_retract()
        self.requeue(req)
        self.ratio.on_retract()
        self.num_retractions += 1
        logger.info("KV cache full: retracted request %s (%d tokens)", req.rid, req.seq_len)
