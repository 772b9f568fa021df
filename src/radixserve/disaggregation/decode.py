"""The decode side: a request with a bootstrap_room gets its KV pages reserved
(after its own radix-cache hit, with --disaggregation-decode-enable-radix-cache),
looks up its prefill rank through the prefill server's bootstrap server (on a
helper thread), sends it a KVDestination, and waits, polled each scheduler
step, until the status word of its FirstTokenBoard row says the KV and the
first token are there. It then joins the running batch as if it had been
prefilled here.

A request that fails (no prefill server, the prefill side reports a failure,
--disaggregation-transfer-timeout passed) or is aborted ends at once, but its
pages stay reserved until the prefill side can no longer write into them: its
status word arrived, or the timeout passed once more (the prefill side drops a
destination once the time its decode side gave it is up).
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import zmq

from radixserve.disaggregation.bootstrap import RankRoute, lookup_route
from radixserve.disaggregation.rank_agreement import agree
from radixserve.disaggregation.stats import TransferStats
from radixserve.disaggregation.transfer import (
    PAYLOAD_WIDTH, FirstTokenBoard, KVDestination, MooncakeEngine, advertised_host, kv_buffers, room_tag,
    slot_bytes)
from radixserve.managers.req import Req
from radixserve.managers.scheduler.outputs import abort_reason

logger = logging.getLogger(__name__)


@dataclass
class Incoming:
    """A request with reserved pages, waiting for its KV."""

    req: Req
    deadline: float
    route: Future  # -> RankRoute
    sent_at: Optional[float] = None  # when the destination went out (from then on the prefill side may write)
    failed: bool = False  # it has ended; its pages wait for release_at (or the status word)
    release_at: float = math.inf


class DecodeReceiver:
    def __init__(self, server_args, pools, tp_rank: int, tp_size: int, max_running: int) -> None:
        self.timeout = server_args.disaggregation_transfer_timeout
        self.pools, self.tp_rank, self.tp_size, self.max_running = pools, tp_rank, tp_size, max_running
        self.prefix_cache, self.allocator = pools.prefix_cache, pools.allocator
        self.table = pools.req_to_token_pool.req_to_token
        self.engine = MooncakeEngine(advertised_host(server_args.host), server_args.disaggregation_ib_device)
        buffers = kv_buffers(pools.kv_pool)
        self.addrs, self.sizes = [b.data_ptr() for b in buffers], [slot_bytes(b) for b in buffers]
        self.board = FirstTokenBoard(pools.req_to_token_pool.size + 1)
        self.engine.register(buffers + self.board.tensors())
        self.zmq = zmq.Context(1)
        self.outboxes: Dict[str, zmq.Socket] = {}  # prefill rank endpoint -> PUSH socket
        self.resolver = ThreadPoolExecutor(4, thread_name_prefix="pd-route")
        self.routes: Dict[Tuple[str, int], RankRoute] = {}  # bootstrap host:port -> our prefill rank
        self.queue: List[Req] = []  # no pages yet
        self.incoming: Dict[str, Incoming] = {}  # rid -> request with pages
        self.stats = TransferStats()
        logger.info("decode server: transfer engine %s", self.engine.session_id)

    # ---- arrivals ----
    def add(self, req: Req) -> None:
        # Its input logprobs are the prefill half's: the gateway puts them in front of ours (none).
        req.input_logprobs_done = True
        self.queue.append(req)

    # ---- state ----
    def has_work(self) -> bool:
        return bool(self.queue or self.incoming)

    def kv_holders(self) -> List[Req]:
        return [i.req for i in self.incoming.values()]

    def num_waiting(self) -> int:
        return len(self.queue) + sum(not i.failed for i in self.incoming.values())

    def abort(self, matches: Callable[[Req], bool]) -> List[Req]:
        """Queued matches end now; the others are ended by the next step."""
        ended = [r for r in self.queue if matches(r)]
        self.queue = [r for r in self.queue if not matches(r)]
        for req in ended:
            req.finished_reason = abort_reason()
        for item in self.incoming.values():
            if matches(item.req):
                item.req.to_abort = True
        return ended

    # ---- the loop ----
    def step(self, num_running: int) -> Tuple[List[Req], List[Req]]:
        """(requests whose KV and first token arrived, requests that ended with an error)."""
        self._reserve(num_running)
        now = time.monotonic()
        for item in self.incoming.values():
            if item.sent_at is None and not item.failed and item.route.done():
                self._send(item, now)
        if not self.incoming:
            return [], []
        verdicts = agree({rid: self._verdict(item, now) for rid, item in self.incoming.items()
                          if not item.failed}, fail_fast=True)
        arrived, failed = [], []
        for rid, verdict in verdicts.items():
            item = self.incoming[rid]
            if verdict == "":
                del self.incoming[rid]
                moved = (len(item.req.origin_input_ids) - item.req.prefix_len) * sum(self.sizes)
                self.stats.on_transfer(moved + PAYLOAD_WIDTH * 8, now - item.sent_at)
                arrived.append(item.req)
            else:
                self._fail(item, verdict, now)
                failed.append(item.req)
        self._release_failed(now)
        return arrived, failed

    def _reserve(self, num_running: int) -> None:
        """Pages for queued requests, first come first served, while they fit
        (leaving each running request room for its next token)."""
        P = self.allocator.page_size
        while self.queue and num_running + len(self.incoming) < self.max_running \
                and self.pools.req_to_token_pool.available_size() > 0:
            req = self.queue[0]
            prompt_len = len(req.origin_input_ids)
            self.prefix_cache.match(req)
            self.prefix_cache.lock(req)
            needed = (-(-prompt_len // P) - (-(-req.prefix_len // P))) * P
            if not self.prefix_cache.make_room(needed + P * num_running):
                self.prefix_cache.unlock(req)
                req.prefix_len, req.prefix_slots, req.kv_len = 0, None, 0
                return
            row = self.pools.req_to_token_pool.alloc()
            req.req_pool_idx = row
            if req.prefix_len:
                self.table[row, :req.prefix_len] = req.prefix_slots
            last = int(self.table[row, req.prefix_len - 1]) if req.prefix_len else 0
            slots = self.allocator.alloc_extend([req.prefix_len], [prompt_len], [last])
            assert slots is not None, "make_room promised the slots"
            self.table[row, req.prefix_len:prompt_len] = slots
            req.prefix_slots, req.kv_len = None, prompt_len
            req.cached_tokens = req.prefix_len
            self.board.clear(row)
            self.queue.pop(0)
            self.incoming[req.rid] = Incoming(req, time.monotonic() + self.timeout, self._route(req))

    def _route(self, req: Req) -> Future:
        boot = req.bootstrap
        known = self.routes.get((boot.host, boot.port))
        if known is not None:
            done: Future = Future()
            done.set_result(known)
            return done
        return self.resolver.submit(lookup_route, boot.host, boot.port, self.tp_rank, self.timeout)

    def _send(self, item: Incoming, now: float) -> None:
        """Tell the prefill rank where to write (or note why we cannot)."""
        req, boot = item.req, item.req.bootstrap
        try:
            route = item.route.result()
        except Exception as e:
            item.route = _failed_route(str(e))
            return
        if route.tp_size != self.tp_size:
            item.route = _failed_route(f"the prefill server has tp_size {route.tp_size}, this decode server "
                                       f"{self.tp_size}: different tp sizes are not supported yet")
            return
        self.routes[(boot.host, boot.port)] = route
        row, prompt_len = req.req_pool_idx, len(req.origin_input_ids)
        dest = KVDestination(
            room=boot.room, session=self.engine.session_id, buffer_addrs=self.addrs, slot_bytes=self.sizes,
            start_pos=req.prefix_len, slots=self.table[row, req.prefix_len:prompt_len].tolist(),
            prompt_len=prompt_len, payload_addr=self.board.payload_addr(row),
            status_addr=self.board.status_addr(row), budget_s=max(item.deadline - now, 0.0))
        try:
            # JSON, not pickle: the peer is another host.
            self._outbox(route.endpoint).send_json(asdict(dest), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            item.route = _failed_route(f"cannot send to the prefill rank at {route.endpoint}: {e}")
            return
        item.sent_at = now

    def _outbox(self, endpoint: str) -> zmq.Socket:
        sock = self.outboxes.get(endpoint)
        if sock is None:
            sock = self.zmq.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 100000)
            sock.connect(endpoint)
            self.outboxes[endpoint] = sock
        return sock

    def _verdict(self, item: Incoming, now: float) -> Optional[str]:
        """This rank's view: "" (arrived), an error message, or None (not yet)."""
        req, row = item.req, item.req.req_pool_idx
        if req.to_abort:
            return "aborted"
        if item.sent_at is None and item.route.done() and item.route.exception() is not None:
            return f"KV transfer failed: {item.route.exception()}"
        tag = room_tag(req.bootstrap.room)
        if int(self.board.status[row, FirstTokenBoard.DONE]) == tag:
            return ""
        if int(self.board.status[row, FirstTokenBoard.FAILED]) == tag:
            return "KV transfer failed: the prefill server could not deliver this request's KV (see its log)"
        if now > item.deadline:
            boot = req.bootstrap
            return (f"KV transfer timed out after {self.timeout:g} s (--disaggregation-transfer-timeout) waiting "
                    f"for the prefill server at {boot.host}:{boot.port}")
        return None

    def _fail(self, item: Incoming, verdict: str, now: float) -> None:
        req = item.req
        item.failed = True
        req.finished_reason = abort_reason() if verdict == "aborted" else abort_reason(verdict, 500)
        # Until the prefill side can no longer write into them, the pages stay ours.
        item.release_at = now if item.sent_at is None else max(now, item.deadline) + self.timeout
        if verdict != "aborted":
            self.stats.on_failure()
            self.routes.pop((req.bootstrap.host, req.bootstrap.port), None)  # look it up afresh next time
            logger.warning("request %s: %s", req.rid, verdict)

    def _release_failed(self, now: float) -> None:
        failed = {rid: item for rid, item in self.incoming.items() if item.failed}
        if not failed:
            return
        tags = {rid: room_tag(item.req.bootstrap.room) for rid, item in failed.items()}
        freeable = agree({rid: "" if now >= item.release_at or tags[rid] in self.board.status[
            item.req.req_pool_idx].tolist() else None for rid, item in failed.items()})
        for rid in freeable:
            self.prefix_cache.release(self.incoming.pop(rid).req)


def _failed_route(message: str) -> Future:
    failed: Future = Future()
    failed.set_exception(RuntimeError(message))
    return failed


def first_token_host_lists(token_logprob: float, top: List[Tuple[float, int]]):
    """The (logprobs, top values, top ids) lists ResultProcessor.append_token reads, for one row."""
    return [token_logprob], [[v for v, _ in top]], [[t for _, t in top]]


def to_running_batch(reqs: List[Req], pools, device: torch.device):
    """A ScheduleBatch of requests whose KV and first token arrived, in the
    state a completed extend leaves: seq_lens = the prompt's KV, the last token
    its first output token."""
    from radixserve.managers.schedule_batch import ScheduleBatch, rope_deltas_of

    batch = ScheduleBatch(reqs, pools, device)
    batch.req_pool_indices = torch.tensor([r.req_pool_idx for r in reqs], dtype=torch.int64, device=device)
    batch.seq_lens_cpu = torch.tensor([r.kv_len for r in reqs], dtype=torch.int64)
    batch.seq_lens = batch.seq_lens_cpu.to(device)
    batch.last_token_ids = torch.tensor([r.output_ids[-1] for r in reqs], dtype=torch.int64, device=device)
    batch.rope_deltas = rope_deltas_of(reqs, device)
    return batch
