"""Starting a real server process for end-to-end tests, and looking at its children."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator, Tuple

import httpx

MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_on_port(model_path, port: int, *extra: str, log=subprocess.DEVNULL,
                   timeout_s: float = 180) -> subprocess.Popen:
    """`python -m radixserve.launch_server` on this port; returns the process once
    /health answers 200 (the tests' servers and the bench scripts' alike)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "radixserve.launch_server", "--model-path", str(model_path),
         "--port", str(port), *extra],
        stdout=log, stderr=subprocess.STDOUT if log is not subprocess.DEVNULL else subprocess.DEVNULL,
    )
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, "server exited during start-up"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise TimeoutError("server did not become healthy")


def start_server(model_path, *extra: str, log=subprocess.DEVNULL):
    """launch_on_port on a free port; returns (process, base URL)."""
    port = free_port()
    proc = launch_on_port(model_path, port, "--served-model-name", MODEL, *extra, log=log)
    return proc, f"http://127.0.0.1:{port}"


def stop_server(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM, then SIGKILL if it has not exited within timeout_s."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def running_server(model_path, *extra: str, log=subprocess.DEVNULL) -> Iterator[Tuple[subprocess.Popen, str]]:
    """start_server as a context: the server is stopped (and waited for) on exit."""
    proc, base = start_server(model_path, *extra, log=log)
    try:
        yield proc, base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def whole_pages(base_url: str, tokens: int) -> int:
    """tokens rounded down to the server's KV pages: the longest prefix its radix cache can match."""
    page = httpx.get(f"{base_url}/get_server_info").json()["page_size"]
    return tokens // page * page


def children_of(pid: int) -> list:
    """Live (non-zombie) child processes of pid."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(entry))
    return kids


def descendants_of(pid: int) -> list:
    """Live processes below pid, at any depth (on the CPU the scheduler and the
    detokenizer are children of the server's fork server)."""
    found, frontier = [], [pid]
    while frontier:
        kids = children_of(frontier.pop())
        found += kids
        frontier += kids
    return found


def is_alive(pid: int) -> bool:
    """pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def processes_left(pids: list, deadline_s: float) -> list:
    """The pids still alive once all have exited or deadline_s has passed."""
    deadline = time.time() + deadline_s
    while (alive := [p for p in pids if is_alive(p)]) and time.time() < deadline:
        time.sleep(0.1)
    return alive
