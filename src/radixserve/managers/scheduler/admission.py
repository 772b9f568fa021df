"""Admission: the waiting queue, its ordering policy, the prefill budget
(PrefillAdder), the one chunked request, and the grammar wait in front of it.

It decides which waiting requests join the next extend batch and builds that
batch; requests join the running batch only when its results are processed.
"""

from __future__ import annotations

import random
import time
from typing import Callable, List, Optional, Union

import torch

from radixserve.layers.pooler import PooledState, PoolingConfig
from radixserve.managers import io_struct as io
from radixserve.managers.req import Req
from radixserve.managers.schedule_batch import ScheduleBatch
from radixserve.managers.schedule_policy import NewTokenRatio, PrefillAdder, order_waiting_queue
from radixserve.managers.scheduler.grammar import GrammarWait
from radixserve.managers.scheduler.outputs import BatchFailed, abort_reason
from radixserve.server_args import ServerArgs


def seed_of_replica(random_seed: Optional[int], dp_rank: int) -> Union[int, str, None]:
    """The seed of the generator that draws unseeded requests' seeds. Data-parallel
    replicas share --random-seed but must not draw the same seeds, or two samples
    of one prompt sent to two replicas would come out the same."""
    if random_seed is None or dp_rank == 0:
        return random_seed
    return f"{random_seed}/dp{dp_rank}"


class Admission:
    def __init__(self, server_args: ServerArgs, pools, device: torch.device, max_running: int,
                 max_total_tokens: int, grammar: GrammarWait, ratio: NewTokenRatio, dp_rank: int = 0,
                 lora=None, pooling: Optional[PoolingConfig] = None) -> None:
        """lora: the runner's LoRAManager with --enable-lora (it caps the
        distinct adapters per batch), else None. pooling: an embedding
        server's pooling (every request is pooled, not sampled)."""
        self.policy = server_args.schedule_policy
        self.max_queued = server_args.max_queued_requests
        self.max_prefill_tokens = server_args.max_prefill_tokens
        self.chunk_size = server_args.resolved_chunked_prefill_size()
        self.seed_rng = random.Random(seed_of_replica(server_args.random_seed, dp_rank))
        self.pools, self.device = pools, device
        self.prefix_cache = pools.prefix_cache
        self.max_running = max_running
        self.max_total_tokens = max_total_tokens
        self.grammar = grammar
        self.ratio = ratio
        self.lora = lora
        self.pooling = pooling
        self.waiting: List[Req] = []
        self.chunked_req: Optional[Req] = None
        self.last_was_chunk = False  # the last extend was a chunk: running requests decode next
        self.last_admitted: List[Req] = []  # joined from the queue in the last prefill batch
        self.num_prefill_tokens = 0  # tokens computed by prefill (after cache hits)

    def queued(self) -> int:
        return len(self.waiting) + len(self.grammar)

    def waiting_on_storage(self) -> bool:
        """The head of the queue waits for its prefix from the storage tier."""
        return bool(self.waiting) and not self.prefix_cache.prefetch_ready(self.waiting[0])

    def has_work(self) -> bool:
        return bool(self.waiting or self.chunked_req is not None or len(self.grammar))

    # ---- arrivals ----
    def add(self, recv: io.TokenizedGenerateReqInput) -> Optional[Req]:
        """Queue a request; returns it, finished, when it is refused at once."""
        req = self.new_req(recv)
        if len(req.origin_input_ids) + 1 > self.max_total_tokens:
            # It could never fit; fail it now instead of queueing it forever.
            req.finished_reason = abort_reason(
                f"the prompt has {len(req.origin_input_ids)} tokens and can never fit "
                f"the KV cache ({self.max_total_tokens} tokens)", 400)
            return req
        if self.max_queued is not None and self.queued() >= self.max_queued:
            req.finished_reason = abort_reason(
                f"the server is overloaded: {self.max_queued} requests are already queued", 503)
            return req
        if not self.grammar.submit(req):
            self.waiting.append(req)
        self.prefix_cache.on_arrival(req)  # the hierarchical cache starts fetching its prefix from storage
        return None

    def new_req(self, recv: io.TokenizedGenerateReqInput) -> Req:
        """The request's scheduler state, with its sampling seed drawn if it has none."""
        seed = recv.sampling_params.sampling_seed
        req = Req(recv, self.seed_rng.getrandbits(62) if seed is None else seed)
        if self.pooling is not None:
            req.pooled = PooledState(self.pooling)
        return req

    def move_compiled(self) -> List[Req]:
        """Compiled requests join the queue; returns the ones that ended instead."""
        ready, ended = self.grammar.collect()
        self.waiting.extend(ready)
        return ended

    def requeue_front(self, req: Req) -> None:
        """A retracted request goes first: it was admitted before anyone waiting."""
        self.waiting.insert(0, req)

    # ---- aborts and failures ----
    def abort(self, matches: Callable[[Req], bool]) -> List[Req]:
        """Waiting matches end now (they hold no KV); the chunked request and
        compiling ones are marked and ended by whoever holds them."""
        self.grammar.abort(matches)
        ended = [r for r in self.waiting if matches(r)]
        self.waiting = [r for r in self.waiting if not matches(r)]
        for req in ended:
            req.finished_reason = abort_reason()
        if self.chunked_req is not None and matches(self.chunked_req):
            self.chunked_req.to_abort = True
        return ended

    def take_chunk(self) -> Optional[Req]:
        """The half-prefilled request, out of its slot (the caller retracts it)."""
        req = self.chunked_req
        self.chunked_req, self.last_was_chunk = None, False
        return req

    def take_aborted_chunk(self) -> Optional[Req]:
        req = self.chunked_req
        if req is None or not req.to_abort:
            return None
        self.chunked_req, self.last_was_chunk = None, False
        return req

    def forget(self, reqs: List[Req]) -> None:
        """These requests failed with their batch: drop them from the queue and the chunk slot."""
        gone = set(map(id, reqs))
        self.waiting = [r for r in self.waiting if id(r) not in gone]
        if self.chunked_req is not None and id(self.chunked_req) in gone:
            self.chunked_req, self.last_was_chunk = None, False

    # ---- the next extend batch ----
    def next_prefill(self, running: List[Req], admit_new: bool) -> Optional[ScheduleBatch]:
        """The chunked request's next chunk and as many waiting requests as fit;
        admit_new False (a weight update waits) admits none from the queue."""
        if not self.waiting and self.chunked_req is None:
            return None
        self.waiting = order_waiting_queue(self.waiting, self.policy, self.prefix_cache)
        adder = PrefillAdder(
            self.pools.allocator.available_size() + self.prefix_cache.evictable_size(), running,
            self.ratio.value, self.pools.allocator.page_size, self.chunk_size, self.max_prefill_tokens,
            lock=self.prefix_cache.lock, unlock=self.prefix_cache.unlock,
        )
        if self.chunked_req is not None:
            adder.add(self.chunked_req)
            if not adder.plans:
                # It cannot continue this round (memory is short): start nothing
                # ahead of it, or a new chunked request would take its place and
                # orphan it with its KV and locks. Decoding frees memory meanwhile.
                return None
        adapters = {r.lora_id for r in running} | {p.req.lora_id for p in adder.plans}
        for req in (self.waiting if admit_new else []):
            if len(running) + len(adder.plans) >= self.max_running or not self.prefix_cache.prefetch_ready(req):
                break
            if self.lora is not None and not self.lora.admits(adapters, req.lora_id):
                continue  # its adapter would be one too many in this batch; it waits for a later one
            self.prefix_cache.match(req)
            if not adder.add(req):
                break
            adapters.add(req.lora_id)
        if not adder.plans:
            return None
        return self._build(adder)

    def _dequeue(self, admitted: List[Req]) -> None:
        """Admitted requests leave the queue (not always its head: a request
        whose LoRA adapter did not fit the batch is skipped, keeping its place)."""
        gone = set(map(id, admitted))
        self.waiting = [r for r in self.waiting if id(r) not in gone]

    def _build(self, adder: PrefillAdder) -> Optional[ScheduleBatch]:
        admitted = [p.req for p in adder.plans if p.req is not self.chunked_req]
        batch = ScheduleBatch([p.req for p in adder.plans], self.pools, self.device)
        try:
            prepared = batch.prepare_for_extend(adder.plans)
        except Exception as e:
            self._dequeue(admitted)
            raise BatchFailed(batch.reqs, e) from e
        if not prepared:
            for req in admitted:
                self.prefix_cache.release(req)
            return None
        for req in admitted:
            if req.cached_tokens is None:  # first admission: prompt tokens served from cache
                req.cached_tokens = min(req.prefix_len, len(req.origin_input_ids))
                req.cached_tokens_details = self.prefix_cache.cached_tokens_details(req)
                req.queue_time = time.monotonic() - req.created_at
        self._dequeue(admitted)
        self.num_prefill_tokens += sum(p.extend_len for p in adder.plans)
        self.last_admitted = admitted
        self.chunked_req = adder.new_chunked_req
        self.last_was_chunk = self.chunked_req is not None
        return batch
