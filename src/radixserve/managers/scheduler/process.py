"""The scheduler process: builds the model runner, the tokenizer and the ZMQ
sockets, hands them to a Scheduler and runs its loop.

With tensor parallelism there is one such process per rank. Rank 0 alone binds
the sockets: each loop turn it broadcasts what it received (an empty list
too) to the other ranks, which block in that broadcast instead of polling, so
every rank dispatches the same messages in the same order and reaches the same
scheduling decisions. Only rank 0's outputs go to the detokenizer; the other
ranks' are dropped.

With data parallelism (--dp-size) each replica is such a group of ranks of
its own, with its own input socket; every replica's rank 0 sends to the one
detokenizer."""

from __future__ import annotations

import logging
import os
import traceback
from typing import Any, Callable, List, Optional, Tuple

import torch
import zmq

from radixserve.distributed.rank_sync import broadcast_messages
from radixserve.managers.ipc import PortArgs, die_with_parent, make_socket
from radixserve.managers.scheduler.core import Scheduler
from radixserve.server_args import ServerArgs

logger = logging.getLogger(__name__)


class ZmqChannel:
    """Requests in from the TokenizerManager, everything out to the detokenizer
    (which passes control replies on to the TokenizerManager)."""

    def __init__(self, port_args: PortArgs, dp_rank: int = 0) -> None:
        ctx = zmq.Context(2)
        self.recv_sock = make_socket(ctx, zmq.PULL, port_args.scheduler_input(dp_rank), bind=True)
        self.send_sock = make_socket(ctx, zmq.PUSH, port_args.scheduler_to_detokenizer, bind=False)
        self.poller = zmq.Poller()
        self.poller.register(self.recv_sock, zmq.POLLIN)

    def receive(self, timeout_s: float) -> List[Any]:
        """Every message waiting now, after waiting up to timeout_s for the first."""
        if timeout_s > 0:
            self.poller.poll(timeout=int(timeout_s * 1000))
        msgs = []
        while True:
            try:
                msgs.append(self.recv_sock.recv_pyobj(zmq.NOBLOCK))
            except zmq.Again:
                return msgs

    def send(self, msg: Any) -> None:
        self.send_sock.send_pyobj(msg)


Receive = Callable[[float], List[Any]]


def drop_output(msg: Any) -> None:
    """The output sink of ranks other than 0: rank 0 already sent the same message."""


def first_rank_receive(channel: ZmqChannel) -> Receive:
    """Rank 0: what arrived, also broadcast to the other ranks. The broadcast
    follows the poll whether or not anything came, so an idle server makes one
    broadcast per poll timeout (1 s) rather than spinning."""
    def receive(timeout_s: float) -> List[Any]:
        return broadcast_messages(channel.receive(timeout_s))

    return receive


def follower_receive(timeout_s: float) -> List[Any]:
    """Ranks other than 0: wait in the broadcast for rank 0's messages."""
    return broadcast_messages(None)


def build_scheduler(server_args: ServerArgs, port_args: PortArgs, tp_rank: int = 0,
                    dist_init_method: Optional[str] = None, dp_rank: int = 0) -> Tuple[Scheduler, Receive]:
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.utils.hf_utils import get_eos_token_ids, load_tokenizer

    if server_args.random_seed is not None:
        torch.manual_seed(server_args.random_seed)  # before the model: dummy weights are random
    runner = ModelRunner(server_args, tp_rank, dist_init_method, dp_rank)
    tokenizer = load_tokenizer(runner.source, server_args.tokenizer_path)
    eos_token_ids = get_eos_token_ids(runner.source, runner.config, tokenizer)
    if tp_rank == 0:
        channel = ZmqChannel(port_args, dp_rank)
        send, receive = channel.send, first_rank_receive(channel)
    else:
        send, receive = drop_output, follower_receive
    return Scheduler(server_args, runner, tokenizer, eos_token_ids, send), receive


def limit_threads(server_args: ServerArgs) -> None:
    """CPU ranks share the cores: each gets its share of intra-op threads, so
    two ranks on two cores do not each start two threads and thrash."""
    ranks_here = server_args.ranks_per_node
    if ranks_here > 1 and server_args.resolved_device() == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_here))


def log_name(server_args: ServerArgs, tp_rank: int, dp_rank: int) -> str:
    """scheduler, scheduler tp1, scheduler dp1, scheduler dp1 tp0: the parts that vary."""
    parts = ["scheduler"]
    if server_args.dp_size > 1:
        parts.append(f"dp{dp_rank}")
    if server_args.tp_size > 1:
        parts.append(f"tp{tp_rank}")
    return " ".join(parts)


def run_scheduler_process(server_args: ServerArgs, port_args: PortArgs, ready_pipe, parent_pid: int,
                          tp_rank: int = 0, dist_init_method: Optional[str] = None, dp_rank: int = 0) -> None:
    die_with_parent(parent_pid)
    name = log_name(server_args, tp_rank, dp_rank)
    level = logging.getLevelName(server_args.log_level.upper())
    logging.basicConfig(
        # The other ranks' info lines would repeat rank 0's (same batches, same stats).
        level=level if tp_rank == 0 else max(level, logging.WARNING),
        format=f"[%(asctime)s {name}] %(levelname)s %(message)s",
    )
    limit_threads(server_args)
    try:
        scheduler, receive = build_scheduler(server_args, port_args, tp_rank, dist_init_method, dp_rank)
    except Exception as e:  # report start-up failures to the parent, then exit
        ready_pipe.send(("error", f"{type(e).__name__}: {e}"))
        logger.error("scheduler failed to start:\n%s", traceback.format_exc())
        os._exit(1)
    ready_pipe.send(("ready", scheduler.ready_info()))
    scheduler.jit_watch.start()
    try:
        # No autograd in serving: the sampler and the scheduler's own tensor
        # work skip its bookkeeping, and the CPU's fused kernels (which run
        # only outside autograd) take the sampling too.
        with torch.inference_mode():
            scheduler.event_loop(receive)
    except Exception:  # its state is unknown: the front end fails what is pending
        # (with tp > 1 the other ranks then fail in their next collective, and
        # the parent's watchdog kills whatever is left)
        logger.error("scheduler crashed:\n%s", traceback.format_exc())
        os._exit(1)
