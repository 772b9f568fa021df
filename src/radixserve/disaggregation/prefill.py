"""The prefill side: requests whose prompt has been computed wait here, their
KV held, until their decode rank says where to write it (a KVDestination
over ZMQ). A worker thread then writes the KV, the first token's record and,
last, the status word into the decode side's memory; the request then ends
normally (its KV joins the radix cache) or, if the write failed or no
destination came in time, with an error, its KV freed. Nothing here blocks
the scheduler loop: it polls.
"""

from __future__ import annotations

import copy
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import zmq

from radixserve.disaggregation.bootstrap import BootstrapServer, RankRoute, register_route
from radixserve.disaggregation.rank_agreement import agree
from radixserve.disaggregation.stats import TransferStats
from radixserve.disaggregation.transfer import (
    PAYLOAD_WIDTH, FirstTokenBoard, KVDestination, MooncakeEngine, TransferError, advertised_host, kv_buffers,
    kv_write_list, room_tag, slot_bytes)
from radixserve.managers.io_struct import TokenizedGenerateReqInput
from radixserve.managers.req import Req
from radixserve.managers.scheduler.outputs import abort_reason

logger = logging.getLogger(__name__)


@dataclass
class HeldRequest:
    req: Req
    deadline: float  # by then a destination must have come
    started_at: float = 0.0
    write: Optional[Future] = None
    dest: Optional[KVDestination] = None


class PrefillSender:
    def __init__(self, server_args, pools, tp_rank: int, tp_size: int,
                 end: Callable[[List[Req]], None]) -> None:
        """end(reqs): the scheduler releases the requests' KV and sends their outputs."""
        self.timeout = server_args.disaggregation_transfer_timeout
        self.table = pools.req_to_token_pool.req_to_token
        self.end = end
        host = advertised_host(server_args.host)
        self.engine = MooncakeEngine(host, server_args.disaggregation_ib_device)
        buffers = kv_buffers(pools.kv_pool)
        self.addrs, self.sizes = [b.data_ptr() for b in buffers], [slot_bytes(b) for b in buffers]
        self.board = FirstTokenBoard(pools.req_to_token_pool.size + 1)
        self.engine.register(buffers + self.board.tensors())
        self.inbox = zmq.Context(1).socket(zmq.PULL)
        port = self.inbox.bind_to_random_port(f"tcp://{host}")
        route = RankRoute(tp_rank, tp_size, self.engine.session_id, f"tcp://{host}:{port}")
        boot_port = server_args.disaggregation_bootstrap_port
        self.bootstrap: Optional[BootstrapServer] = None
        if tp_rank == 0:
            self.bootstrap = BootstrapServer(server_args.host, boot_port)
            self.bootstrap.register(route)
        else:
            local = "127.0.0.1" if server_args.host in ("0.0.0.0", "::") else server_args.host
            register_route(local, boot_port, route)
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="pd-send")
        self.held: Dict[int, HeldRequest] = {}  # room -> request
        self.destinations: Dict[int, Tuple[KVDestination, float]] = {}  # room -> (where, until when)
        self.stats = TransferStats()
        logger.info("prefill server: bootstrap on port %d, transfer engine %s", boot_port, self.engine.session_id)

    # ---- arrivals ----
    def on_arrival(self, recv: TokenizedGenerateReqInput) -> Optional[TokenizedGenerateReqInput]:
        """The prefill half computes the prompt and the first token only."""
        sp = recv.sampling_params
        if sp.max_new_tokens and sp.max_new_tokens > 1:
            recv.sampling_params = copy.copy(sp)
            recv.sampling_params.max_new_tokens = 1
        return recv

    def hand_off(self, req: Req) -> bool:
        """Called when a request's prefill ended it: keep it (and its KV) until the write."""
        if req.bootstrap is None or not req.output_ids or req.finished_reason.get("type") == "abort":
            return False
        if req.bootstrap.room in self.held:
            req.finished_reason = abort_reason(f"bootstrap_room {req.bootstrap.room} is already in use by "
                                               "another request on this prefill server", 400)
            return False
        self.held[req.bootstrap.room] = HeldRequest(req, time.monotonic() + self.timeout)
        return True

    # ---- the loop ----
    def has_work(self) -> bool:
        return bool(self.held)

    def kv_holders(self) -> List[Req]:
        return [h.req for h in self.held.values()]

    def abort(self, matches: Callable[[Req], bool]) -> None:
        for held in self.held.values():
            if matches(held.req):
                held.req.to_abort = True

    def step(self) -> None:
        self._receive()
        now = time.monotonic()
        for room, held in self.held.items():
            if held.write is None and not held.req.to_abort and room in self.destinations:
                self._start_write(held, self.destinations.pop(room)[0])
        self.destinations = {r: d for r, d in self.destinations.items() if d[1] > now}
        if self.held:
            self._finish(agree({room: self._outcome(h, now) for room, h in self.held.items()}))

    def _receive(self) -> None:
        while True:
            try:
                dest = KVDestination(**self.inbox.recv_json(zmq.NOBLOCK))
            except zmq.Again:
                return
            except (ValueError, TypeError) as e:  # not from a decode server of ours
                logger.warning("ignoring a malformed KV destination: %s", e)
                continue
            self.destinations[dest.room] = (dest, time.monotonic() + dest.budget_s)

    def _start_write(self, held: HeldRequest, dest: KVDestination) -> None:
        req = held.req
        row, prompt_len = req.req_pool_idx, len(req.origin_input_ids)
        held.dest, held.started_at = dest, time.monotonic()
        src_slots = self.table[row, dest.start_pos:prompt_len].clone()
        logprob, top = 0.0, None
        if req.return_logprob:
            logprob = req.output_token_logprobs[0][0]
            top = req.output_top_logprobs[0] if req.top_logprobs_num > 0 else None
        self.board.stage(row, req.output_ids[0], logprob, top)
        held.write = self.writer.submit(self._write, row, prompt_len, src_slots, dest)

    def _write(self, row: int, prompt_len: int, src_slots, dest: KVDestination) -> int:
        """On the writer thread: the KV, the first token, then the status. Returns the bytes written."""
        if dest.prompt_len != prompt_len:
            raise TransferError(f"the decode server's prompt has {dest.prompt_len} tokens, the prefill "
                                f"server's {prompt_len} (different tokenizers?)")
        if dest.slot_bytes != self.sizes:
            raise TransferError("the decode server's KV layout differs from the prefill server's (the same "
                                "model, --kv-cache-dtype and --tp-size are needed on both)")
        srcs, dsts, lengths = kv_write_list(self.addrs, src_slots, dest, self.sizes)
        self.engine.write(dest.session, srcs, dsts, lengths)
        self.engine.write(dest.session, [self.board.payload_addr(row)], [dest.payload_addr], [PAYLOAD_WIDTH * 8])
        self._write_status(row, dest, FirstTokenBoard.DONE)
        return sum(lengths) + PAYLOAD_WIDTH * 8

    def _write_status(self, row: int, dest: KVDestination, column: int) -> None:
        self.board.status[row, column] = room_tag(dest.room)
        self.engine.write(dest.session, [self.board.status_addr(row, column)], [dest.status_addr + 8 * column], [8])

    def _outcome(self, held: HeldRequest, now: float) -> Optional[str]:
        """This rank's verdict: "" (written), an error message, or None (not yet)."""
        if held.write is not None:
            if not held.write.done():
                return None
            error = held.write.exception()
            return "" if error is None else f"the KV transfer to the decode server failed: {error}"
        if held.req.to_abort:
            return "aborted"
        if now > held.deadline:
            return (f"no decode server asked for this request's KV within {self.timeout:g} s "
                    "(--disaggregation-transfer-timeout)")
        return None

    def _finish(self, verdicts: Dict[int, str]) -> None:
        ended = []
        for room, verdict in verdicts.items():
            held = self.held.pop(room)
            req = held.req
            if verdict == "":
                self.stats.on_transfer(held.write.result(), time.monotonic() - held.started_at)
            else:
                self.stats.on_failure()
                req.finished_reason = abort_reason() if verdict == "aborted" else abort_reason(verdict, 500)
                if held.dest is not None:  # tell the decode side not to wait (best effort)
                    self.writer.submit(self._write_status, req.req_pool_idx, held.dest, FirstTokenBoard.FAILED)
                if verdict != "aborted":
                    logger.warning("request %s (room %d): %s", req.rid, room, verdict)
            ended.append(req)
        if ended:
            self.end(ended)
