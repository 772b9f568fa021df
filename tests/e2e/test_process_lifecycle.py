"""Child processes die with the parent: no orphans after SIGTERM, SIGKILL or an exception."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from radixserve import Engine
    engine = Engine(model_path=sys.argv[1])
    print(" ".join(str(p.pid) for p in engine._procs), flush=True)
    if sys.argv[2] == "raise":
        raise RuntimeError("boom")
    time.sleep(600)
    """
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited already; it only waits for its parent to reap it.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


@pytest.mark.parametrize("how", ["sigterm", "sigkill", "raise"])
def test_children_die_with_parent(tiny_model_factory, how):
    path = tiny_model_factory("qwen2")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(path), how],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    children = [int(p) for p in proc.stdout.readline().split()]
    assert len(children) == 2
    if how != "raise":  # (with "raise" the parent is already on its way out)
        assert all(alive(p) for p in children)
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    elif how == "sigkill":
        proc.kill()
    proc.wait(timeout=30)
    deadline = time.time() + 15
    while any(alive(p) for p in children) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in children)
