"""The scheduler process: builds the model runner, the tokenizer and the ZMQ
sockets, hands them to a Scheduler and runs its loop."""

from __future__ import annotations

import logging
import os
import traceback
from typing import Any, List, Tuple

import torch
import zmq

from radixserve.managers.ipc import PortArgs, die_with_parent, make_socket
from radixserve.managers.scheduler.core import Scheduler
from radixserve.server_args import ServerArgs

logger = logging.getLogger(__name__)


class ZmqChannel:
    """Requests in from the TokenizerManager, everything out to the detokenizer
    (which passes control replies on to the TokenizerManager)."""

    def __init__(self, port_args: PortArgs) -> None:
        ctx = zmq.Context(2)
        self.recv_sock = make_socket(ctx, zmq.PULL, port_args.tokenizer_to_scheduler, bind=True)
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


def build_scheduler(server_args: ServerArgs, port_args: PortArgs) -> Tuple[Scheduler, ZmqChannel]:
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.utils.hf_utils import get_eos_token_ids, load_tokenizer

    if server_args.random_seed is not None:
        torch.manual_seed(server_args.random_seed)  # before the model: dummy weights are random
    runner = ModelRunner(server_args)
    tokenizer = load_tokenizer(runner.source, server_args.tokenizer_path)
    eos_token_ids = get_eos_token_ids(runner.source, runner.config, tokenizer)
    channel = ZmqChannel(port_args)
    return Scheduler(server_args, runner, tokenizer, eos_token_ids, channel.send), channel


def run_scheduler_process(server_args: ServerArgs, port_args: PortArgs, ready_pipe, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    logging.basicConfig(
        level=server_args.log_level.upper(),
        format="[%(asctime)s scheduler] %(levelname)s %(message)s",
    )
    try:
        scheduler, channel = build_scheduler(server_args, port_args)
    except Exception as e:  # report start-up failures to the parent, then exit
        ready_pipe.send(("error", f"{type(e).__name__}: {e}"))
        logger.error("scheduler failed to start:\n%s", traceback.format_exc())
        os._exit(1)
    ready_pipe.send(("ready", scheduler.ready_info()))
    try:
        scheduler.event_loop(channel.receive)
    except Exception:  # its state is unknown: the front end fails what is pending
        logger.error("scheduler crashed:\n%s", traceback.format_exc())
        os._exit(1)
