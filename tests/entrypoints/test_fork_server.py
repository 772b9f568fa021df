"""The fork server skips its interpreter teardown, and only the fork server does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_importing_elsewhere_keeps_the_exit_code():
    # Registered outside the fork server, the handler would turn every exit
    # code (a failing pytest run's included) into 0.
    code = "import radixserve.entrypoints.fork_server; raise SystemExit(3)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 3


def fork_server_output(preload: list) -> str:
    """What a fork server preloading these modules prints once its launcher,
    which started one child through it, has exited."""
    code = (
        "import multiprocessing as mp\n"
        "ctx = mp.get_context('forkserver')\n"
        f"ctx.set_forkserver_preload({preload!r})\n"
        "p = ctx.Process(target=print, args=('child ran',)); p.start(); p.join()\n"
    )
    # run() returns when stdout closes: after the fork server, which holds it, exits.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_exit_handlers_registered_later_still_run():
    # atexit runs last in, first out: the marker loaded after fork_server runs
    # before the fast exit.
    out = fork_server_output(["radixserve.entrypoints.fork_server", "tests.entrypoints.exit_marker"])
    assert "child ran" in out and "exit handler ran" in out


def test_exit_handlers_registered_earlier_are_skipped():
    # The marker loaded first would run after the fast exit: it does run
    # without fork_server, and does not with it.
    assert "exit handler ran" in fork_server_output(["tests.entrypoints.exit_marker"])
    out = fork_server_output(["tests.entrypoints.exit_marker", "radixserve.entrypoints.fork_server"])
    assert "child ran" in out and "exit handler ran" not in out
