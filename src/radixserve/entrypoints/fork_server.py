"""Imported first by the CPU fork server (FORK_SERVER_PRELOAD in child_processes.py).

When the launcher exits, the fork server's interpreter would spend about a
second tearing down torch's modules, outliving the server it belongs to. It has
nothing to save at that point, so its last exit handler ends the process at
once. Imported anywhere else (a test, the launcher) this module does nothing.
"""

from __future__ import annotations

import atexit
import os
import sys


def imported_by_fork_server() -> bool:
    """Whether multiprocessing's fork server is the caller up the stack."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "main" and frame.f_globals.get("__name__") == "multiprocessing.forkserver":
            return True
        frame = frame.f_back
    return False


def exit_without_teardown() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if imported_by_fork_server():
    # Registered before the other preloaded modules' handlers, so those still
    # run (atexit is last in, first out); only the module teardown is skipped.
    atexit.register(exit_without_teardown)
