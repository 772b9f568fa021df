"""ZMQ endpoints between the three processes, and making children die with the parent."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass

import zmq


@dataclass
class PortArgs:
    tokenizer_to_scheduler: str
    scheduler_to_detokenizer: str
    detokenizer_to_tokenizer: str
    # The private folder (mode 0700: no other user can connect) holding the
    # three socket files. A process killed with SIGKILL leaves its bound file
    # behind, so the launcher removes the whole folder at shutdown.
    ipc_dir: str = ""

    @staticmethod
    def new() -> "PortArgs":
        folder = tempfile.mkdtemp(prefix="radixserve-")
        return PortArgs(
            tokenizer_to_scheduler=f"ipc://{folder}/sched",
            scheduler_to_detokenizer=f"ipc://{folder}/detok",
            detokenizer_to_tokenizer=f"ipc://{folder}/tok",
            ipc_dir=folder,
        )

    def scheduler_input(self, dp_rank: int = 0) -> str:
        """Where data-parallel replica dp_rank's first rank receives requests."""
        return self.tokenizer_to_scheduler if dp_rank == 0 else f"{self.tokenizer_to_scheduler}-dp{dp_rank}"

    def remove(self) -> None:
        """Delete the socket files and their folder (the processes using them are gone)."""
        if self.ipc_dir:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)


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
    """A child dies with the launcher, pid `parent` (Ctrl-C, SIGTERM, crash): it
    gets SIGKILL when its own parent exits (the launcher, or on the CPU the fork
    server that forked it, which exits with the launcher), and a watchdog thread
    covers a parent that died before prctl took effect."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    own_parent = os.getppid()

    def orphaned() -> bool:
        return os.getppid() != own_parent or not _is_running(parent)

    if orphaned():
        os._exit(1)

    def watch() -> None:
        while True:
            if orphaned():
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
