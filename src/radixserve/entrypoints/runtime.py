"""The runtime behind both the Engine and the HTTP server: the scheduler
processes (one per tensor-parallel rank of this node, for each data-parallel
replica) and the detokenizer,
the TokenizerManager that talks to them, a watchdog on the children, and
shutdown. Both front ends start and stop it the same way;
they differ only in what they do when a child dies (the Engine fails the
pending calls, the server also exits non-zero so a supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

from radixserve.entrypoints.child_processes import detokenizer_process, process_context, scheduler_process
from radixserve.managers import io_struct as io
from radixserve.managers.ipc import PortArgs
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


def scheduler_name(tp_rank: int, dp_rank: int = 0) -> str:
    """Replica 0's rank 0 keeps the one-rank name, so a dead scheduler reads the
    same at any tp and dp."""
    name = "radixserve-scheduler" if dp_rank == 0 else f"radixserve-scheduler-dp{dp_rank}"
    return name if tp_rank == 0 else f"{name}-tp{tp_rank}"


def ranks_of_this_node(server_args: ServerArgs) -> List[int]:
    per_node = server_args.tp_size // server_args.nnodes
    return [server_args.node_rank * per_node + i for i in range(per_node)]


def dist_init_method(server_args: ServerArgs) -> Optional[str]:
    """Where one replica's ranks meet: --dist-init-addr, or a free port on
    loopback (one node; each replica gets its own)."""
    if server_args.tp_size == 1:
        return None
    if server_args.dist_init_addr:
        return f"tcp://{server_args.dist_init_addr}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def start_schedulers(server_args: ServerArgs, port_args: PortArgs) -> Tuple[List[mp.Process], List[Any]]:
    """One scheduler process per tensor-parallel rank of this node, for each
    data-parallel replica. Returns (processes, the pipes on which each says it
    is ready), replica-major in rank order."""
    ctx = process_context(server_args)
    parent = os.getpid()
    if server_args.ranks_per_node > 1 and server_args.random_seed is None:
        # One seed for every rank of the node: replicated values (dummy weights,
        # the seeds drawn for unseeded requests) then match across ranks, and
        # every replica answers a seeded request as replica 0 would.
        server_args = dataclasses.replace(server_args, random_seed=random.getrandbits(31))
    procs, readers = [], []
    for dp_rank in range(server_args.dp_size):
        meeting_point = dist_init_method(server_args)
        for tp_rank in ranks_of_this_node(server_args):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=scheduler_process, name=scheduler_name(tp_rank, dp_rank), daemon=True,
                               args=(server_args, port_args, writer, parent, tp_rank, meeting_point, dp_rank))
            proc.start()
            procs.append(proc)
            readers.append(reader)
    return procs, readers


def start_children(server_args: ServerArgs, port_args: PortArgs) -> tuple:
    """The scheduler ranks and the detokenizer. Returns (processes, the
    schedulers' ready pipes)."""
    procs, readers = start_schedulers(server_args, port_args)
    ctx = process_context(server_args)
    detokenizer = ctx.Process(target=detokenizer_process, args=(server_args, port_args, os.getpid()),
                              name="radixserve-detokenizer", daemon=True)
    detokenizer.start()
    return procs + [detokenizer], readers


def wait_until_ready(procs: List[mp.Process], readers: List[Any]) -> io.SchedulerReady:
    """Block until every scheduler rank has loaded the model; StartupError if
    a rank reports a failure or any child exits first. Returns replica 0's
    rank 0's report (the ranks agreed on the sizes in it; the replicas are alike)."""
    reports: dict = {}

    def read_ready_pipes() -> None:
        for i, reader in enumerate(readers):
            if i not in reports and reader.poll():
                status, payload = reader.recv()
                if status != "ready":
                    raise StartupError(f"the model could not be loaded: {payload}")
                reports[i] = payload

    while len(reports) < len(readers):
        mp_connection.wait([r for i, r in enumerate(readers) if i not in reports], timeout=0.5)
        read_ready_pipes()
        dead = [p for p in procs if not p.is_alive()]
        if dead and len(reports) < len(readers):
            read_ready_pipes()  # a rank that failed said why before it exited: prefer its words
            raise StartupError(f"{dead[0].name} exited with code {dead[0].exitcode} during start-up")
    return reports[0]


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
        if server_args.node_rank > 0:
            raise ValueError("node_rank > 0 runs only scheduler ranks, with no front end: start that node "
                             "with python -m radixserve.launch_server")
        source = resolve_model_source(server_args.model_path)
        port_args = PortArgs.new()
        procs: List[mp.Process] = []
        try:
            # Starting the children waits for the CPU fork server's imports
            # (seconds): the front end's tokenizer loads meanwhile, on a worker
            # thread. The children start from this thread: a spawned child dies
            # with the thread that started it (die_with_parent's PDEATHSIG).
            with ThreadPoolExecutor(1) as pool:
                tokenizer_loaded = pool.submit(load_frontend_tokenizer, server_args, source)
                procs, readers = start_children(server_args, port_args)
                tokenizer = tokenizer_loaded.result()
            ready = wait_until_ready(procs, readers)
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
            # (all of them: with tp > 1 a dead rank takes the others down soon
            # after, and the watchdog may see both at once)
            self.child_death = "; ".join(f"{p.name} exited with code {p.exitcode}" for p in dead)
            logger.error("%s; failing every pending request", self.child_death)
            # The other scheduler ranks would wait in their next collective
            # (up to --dist-timeout): stop them now.
            kill_processes([p for p in self.procs if p.name.startswith("radixserve-scheduler")])
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


def run_rank_node(server_args: ServerArgs) -> int:
    """A node with node_rank > 0: only its scheduler ranks (rank 0's node
    serves the front end and broadcasts the requests to them). Blocks until
    one of them exits, then stops the others; returns the exit code to use."""
    port_args = PortArgs.new()  # (unused: these ranks bind no socket)
    procs: List[mp.Process] = []
    try:
        procs, readers = start_schedulers(server_args, port_args)
        wait_until_ready(procs, readers)
        logger.info("node %d: ranks %s ready", server_args.node_rank, ranks_of_this_node(server_args))
        while all(p.is_alive() for p in procs):
            time.sleep(WATCH_INTERVAL_S)
        dead = next(p for p in procs if not p.is_alive())
        logger.error("%s exited with code %s; stopping this node's ranks", dead.name, dead.exitcode)
        return 1 if dead.exitcode else 0
    finally:
        kill_processes(procs)
        port_args.remove()
