"""ZMQ endpoints between the three processes, and making children die with the parent."""

from __future__ import annotations

import ctypes
import os
import signal
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass

import zmq


@dataclass
class PortArgs:
    tokenizer_to_scheduler: str
    scheduler_to_detokenizer: str
    detokenizer_to_tokenizer: str

    @staticmethod
    def new() -> "PortArgs":
        base = os.path.join(tempfile.gettempdir(), f"radixserve-{uuid.uuid4().hex[:12]}")
        return PortArgs(
            tokenizer_to_scheduler=f"ipc://{base}-sched",
            scheduler_to_detokenizer=f"ipc://{base}-detok",
            detokenizer_to_tokenizer=f"ipc://{base}-tok",
        )


def make_socket(ctx: zmq.Context, kind: int, endpoint: str, bind: bool) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if kind == zmq.PULL:
        sock.setsockopt(zmq.RCVHWM, 0)
    else:
        sock.setsockopt(zmq.SNDHWM, 0)
    (sock.bind if bind else sock.connect)(endpoint)
    return sock


def die_with_parent(parent: int) -> None:
    """Children get SIGKILL when the parent dies (Ctrl-C, SIGTERM, crash), and a
    watchdog thread covers a parent that died before prctl took effect."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()
