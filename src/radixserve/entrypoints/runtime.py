"""The runtime behind both the Engine and the HTTP server: the scheduler and
detokenizer processes, the TokenizerManager that talks to them, a watchdog on
the children, and shutdown. Both front ends start and stop it the same way;
they differ only in what they do when a child dies (the Engine fails the
pending calls, the server also exits non-zero so a supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import threading
from pathlib import Path
from typing import Any, Callable, List, Optional

from radixserve.managers import io_struct as io
from radixserve.managers.detokenizer_manager import run_detokenizer_process
from radixserve.managers.ipc import PortArgs
from radixserve.managers.scheduler import run_scheduler_process
from radixserve.managers.tokenizer_manager import TokenizerManager
from radixserve.model_loader.source import ModelSource, resolve_model_source
from radixserve.server_args import ServerArgs
from radixserve.utils.hf_utils import load_tokenizer

logger = logging.getLogger(__name__)

# How often the watchdog looks at the children: a dead child is noticed
# within this, and the pending requests fail at once after that.
WATCH_INTERVAL_S = 0.2


class StartupError(RuntimeError):
    """The runtime could not start (the scheduler failed to load the model, or a
    child exited during start-up). The message says why in one line."""


def load_frontend_tokenizer(args: ServerArgs, source: Optional[ModelSource] = None) -> Any:
    """The tokenizer, with --chat-template's Jinja file in place of the model's own."""
    tokenizer = load_tokenizer(source or resolve_model_source(args.model_path), args.tokenizer_path)
    if args.chat_template:
        tokenizer.chat_template = Path(args.chat_template).expanduser().read_text()
    return tokenizer


def start_children(server_args: ServerArgs, port_args: PortArgs) -> tuple:
    """Start the scheduler and the detokenizer (spawned: CUDA cannot be forked).
    Returns (processes, the pipe on which the scheduler says it is ready)."""
    ctx = mp.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    parent = os.getpid()
    scheduler = ctx.Process(target=run_scheduler_process, args=(server_args, port_args, writer, parent),
                            name="radixserve-scheduler", daemon=True)
    detokenizer = ctx.Process(target=run_detokenizer_process, args=(server_args, port_args, parent),
                              name="radixserve-detokenizer", daemon=True)
    scheduler.start()
    detokenizer.start()
    return [scheduler, detokenizer], reader


def wait_until_ready(procs: List[mp.Process], reader: Any) -> io.SchedulerReady:
    """Block until the scheduler has loaded the model; StartupError if it or the
    detokenizer exits first, or the scheduler reports a failure."""
    while not reader.poll(0.5):
        for p in procs:
            if not p.is_alive():
                raise StartupError(f"{p.name} exited with code {p.exitcode} during start-up")
    status, payload = reader.recv()
    if status != "ready":
        raise StartupError(f"the model could not be loaded: {payload}")
    return payload


def kill_processes(procs: List[mp.Process]) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=5)


class Runtime:
    """Started by `Runtime.start(server_args)`; stopped by `shutdown()`, once."""

    def __init__(self, server_args: ServerArgs, source: ModelSource, port_args: PortArgs,
                 procs: List[mp.Process], tokenizer_manager: TokenizerManager) -> None:
        self.server_args = server_args
        self.source = source
        self.port_args = port_args
        self.procs = procs
        self.tokenizer_manager = tokenizer_manager
        self.tokenizer = tokenizer_manager.tokenizer
        # The event loop the TokenizerManager runs on; set by the front end
        # (the Engine's thread, the server's uvicorn loop) before traffic.
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.child_death: Optional[str] = None
        self._stopped = threading.Event()

    @classmethod
    def start(cls, server_args: ServerArgs) -> "Runtime":
        """Check the model path (a ValueError before any process starts), start
        the children, load the tokenizer while they load the model, and wait
        for the scheduler. Nothing is left running or on disk if this raises."""
        source = resolve_model_source(server_args.model_path)
        port_args = PortArgs.new()
        procs: List[mp.Process] = []
        try:
            procs, reader = start_children(server_args, port_args)
            tokenizer = load_frontend_tokenizer(server_args, source)
            ready = wait_until_ready(procs, reader)
            tokenizer_manager = TokenizerManager(server_args, port_args, tokenizer, ready)
        except BaseException:
            kill_processes(procs)
            port_args.remove()
            raise
        return cls(server_args, source, port_args, procs, tokenizer_manager)

    # ---- the watchdog ----
    def watch_children(self, on_death: Optional[Callable[[str], None]] = None) -> None:
        """In a daemon thread: when a child dies, fail every pending request on
        the TokenizerManager's loop, then call on_death(message)."""
        threading.Thread(target=self._watch, args=(on_death,), daemon=True, name="radixserve-watchdog").start()

    def _watch(self, on_death: Optional[Callable[[str], None]]) -> None:
        while not self._stopped.wait(WATCH_INTERVAL_S):
            dead = [p for p in self.procs if not p.is_alive()]
            if not dead or self._stopped.is_set():
                continue
            self.child_death = f"{dead[0].name} exited with code {dead[0].exitcode}"
            logger.error("%s; failing every pending request", self.child_death)
            if self.loop is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.tokenizer_manager.fail_all, self.child_death)
            if on_death is not None:
                on_death(self.child_death)
            return

    # ---- shutdown ----
    def shutdown(self) -> None:
        """Stop the watchdog and the children, and remove the IPC socket files.
        The front end closes the TokenizerManager on its own loop first."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        kill_processes(self.procs)
        self.port_args.remove()
