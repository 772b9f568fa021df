"""How the child processes (scheduler ranks, detokenizer) start, importable
without torch: their multiprocessing context and the functions they run.

The launcher hands the fork server (or spawn) a reference to the function a
child runs, so it imports that function's module. Importing the scheduler's
module would cost the launcher torch's, transformers' and xgrammar's imports
for nothing (only the child runs it): the wrappers below import the real entry
points in the child. And on the CPU the fork server can start before the
launcher's own imports, so that the two import at the same time.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.forkserver
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from radixserve.server_args import ServerArgs

# What the CPU fork server imports once, before it forks any child: the
# scheduler's and detokenizer's modules with torch, and the transformers modules
# every model config pulls in (about 3 s of imports per process otherwise), and
# first the module that lets the fork server exit as soon as the launcher does.
FORK_SERVER_PRELOAD = [
    "radixserve.entrypoints.fork_server",
    "radixserve.managers.scheduler.process",
    "radixserve.model_executor.model_runner",
    "radixserve.managers.detokenizer_manager",
    "transformers.activations",
    "transformers.models.llama.configuration_llama",
]


def fork_server_context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(FORK_SERVER_PRELOAD)
    return ctx


def process_context(server_args: "ServerArgs") -> Any:
    """How the children start. On CUDA, spawned (a CUDA context does not
    survive a fork). On the CPU, forked from a fork server that imported
    FORK_SERVER_PRELOAD once: every rank and replica, and every later Engine of
    this process, then starts without importing torch and transformers again.
    The fork server keeps the environment it started with, so environment
    variables set later in this process do not reach the children."""
    if server_args.resolved_device() != "cpu":
        return mp.get_context("spawn")
    return fork_server_context()


def start_fork_server_early(server_args: "ServerArgs") -> None:
    """Start the CPU fork server now, so that its imports (seconds) run while
    the launcher does its own. Only where the device is surely the CPU (asked
    for, or a machine without NVIDIA's device files): knowing otherwise would
    take importing torch first."""
    if server_args.device not in (None, "cpu"):
        return
    if server_args.device is None and os.path.exists("/dev/nvidiactl"):
        return
    fork_server_context()
    multiprocessing.forkserver.ensure_running()


def scheduler_process(*args: Any, **kwargs: Any) -> None:
    from radixserve.managers.scheduler.process import run_scheduler_process

    run_scheduler_process(*args, **kwargs)


def detokenizer_process(*args: Any, **kwargs: Any) -> None:
    from radixserve.managers.detokenizer_manager import run_detokenizer_process

    run_detokenizer_process(*args, **kwargs)
