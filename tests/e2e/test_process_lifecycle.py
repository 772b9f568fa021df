"""The launcher shared by the Engine and the server: children die with the
parent (no orphans after SIGTERM, SIGKILL or an exception), a dead child fails
pending calls instead of hanging them, and shutdown leaves no IPC socket files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

from radixserve import Engine
from tests.server_utils import is_alive, processes_left, start_server

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from radixserve import Engine
    engine = Engine(model_path=sys.argv[1])
    engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2})  # every socket bound
    print(" ".join(str(p.pid) for p in engine._procs), flush=True)
    if sys.argv[2] == "raise":
        raise RuntimeError("boom")
    time.sleep(600)
    """
)


def socket_folders(tmp: Path) -> list:
    """The launcher's IPC folders (radixserve-*) under a temp directory."""
    return sorted(p.name for p in tmp.glob("radixserve-*"))


def wait_until(condition, timeout: float = 30.0) -> bool:
    """Poll condition() until true; the timeout only keeps a broken run from hanging."""
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.1)
    return condition()


@pytest.mark.parametrize("how", ["sigterm", "sigkill", "raise"])
def test_children_die_with_parent(tiny_model_factory, tmp_path, how):
    path = tiny_model_factory("qwen2")
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the socket files go here, and only this run's
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(path), how],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    children = [int(p) for p in proc.stdout.readline().split()]
    assert len(children) == 2
    if how != "raise":  # (with "raise" the parent is already on its way out)
        assert all(is_alive(p) for p in children)
        assert len(socket_folders(tmp_path)) == 1
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    elif how == "sigkill":
        proc.kill()
    proc.wait(timeout=30)
    assert processes_left(children, deadline_s=30) == []
    if how == "raise":  # the Engine shut down (atexit): its socket files are gone
        assert socket_folders(tmp_path) == []


def test_server_sigterm_removes_socket_files(tiny_model_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # inherited by the server process
    proc, base = start_server(tiny_model_factory("qwen2"))
    try:
        r = httpx.post(f"{base}/generate", json={"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2}},
                       timeout=60)
        assert r.status_code == 200
        assert len(socket_folders(tmp_path)) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0
    assert socket_folders(tmp_path) == []


def test_engine_child_death_fails_calls_and_shutdown_removes_socket_files(tiny_model_factory):
    engine = Engine(model_path=str(tiny_model_factory("qwen2")))
    try:
        engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2})
        folder = Path(engine.runtime.port_args.ipc_dir)
        assert sorted(p.name for p in folder.iterdir()) == ["detok", "sched", "tok"]
        outcome = {}

        def long_call() -> None:
            try:
                outcome["result"] = engine.generate(input_ids=[5, 6, 7],
                                                    sampling_params={"max_new_tokens": 400, "ignore_eos": True})
            except Exception as e:  # the engine may also refuse it outright
                outcome["error"] = e

        caller = threading.Thread(target=long_call)
        caller.start()
        scheduler = next(p for p in engine._procs if p.name == "radixserve-scheduler")
        os.kill(scheduler.pid, signal.SIGKILL)
        caller.join(timeout=60)
        assert not caller.is_alive(), "the pending call hung after the scheduler died"
        if "result" in outcome:
            assert outcome["result"]["meta_info"]["finish_reason"]["type"] == "abort"
        assert wait_until(lambda: engine.runtime.child_death is not None)
        assert "radixserve-scheduler exited" in engine.runtime.child_death
        with pytest.raises(RuntimeError, match="radixserve-scheduler exited"):
            engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2})
    finally:
        engine.shutdown()
    assert not folder.exists()
