"""A radixserve cluster behind SGLang's gateway (radixserve.launch_cluster) for
the gateway tests and the gateway benchmark script: start it, read which
workers it started from its output, stop it."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import httpx

from tests.server_utils import free_port

READY = re.compile(r"\[launch_cluster\] ((?:worker|prefill|decode) \d+) ready at (\S+) \(pid (\d+)\)")


@dataclass
class ClusterHandle:
    proc: subprocess.Popen
    url: str  # the gateway
    log: Path  # the launcher's own output
    workers: Dict[str, str] = field(default_factory=dict)  # name -> URL
    pids: Dict[str, int] = field(default_factory=dict)  # name -> pid

    @property
    def worker_urls(self) -> List[str]:
        return [self.workers[name] for name in sorted(self.workers)]

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def start_cluster(model_path, log_dir: Path, *worker_flags: str, workers: int = 2, policy: str = "cache_aware",
                  timeout_s: float = 240, pd: Tuple[int, int] = (0, 0)) -> ClusterHandle:
    """launch_cluster on a free port; returns once it says the gateway is ready.
    pd: (prefill servers, decode servers) for a disaggregated cluster. A port
    picked free can be taken before the gateway binds it (two clusters starting
    at once took the same Prometheus port): that start is retried, twice at most."""
    for attempt in range(3):
        try:
            return _start_cluster_once(model_path, log_dir, worker_flags, workers, policy, timeout_s, pd)
        except PortTaken:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class PortTaken(RuntimeError):
    pass


def _start_cluster_once(model_path, log_dir: Path, worker_flags: Tuple[str, ...], workers: int, policy: str,
                        timeout_s: float, pd: Tuple[int, int]) -> ClusterHandle:
    port = free_port()
    log = log_dir / "launch_cluster.out"
    # (the gateway's own Prometheus port on a free port too: its default may be taken)
    router_args = f"--router-args=--log-level warn --prometheus-port {free_port()}"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "radixserve.launch_cluster", "--workers", str(workers), "--router-policy", policy,
             "--prefill-workers", str(pd[0]), "--decode-workers", str(pd[1]),
             "--port", str(port), "--log-dir", str(log_dir), router_args,
             "--model-path", str(model_path), *worker_flags],
            stdout=out, stderr=subprocess.STDOUT)
    handle = ClusterHandle(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.time() + timeout_s
    while "gateway" not in handle.output() or "ready" not in handle.output().split("gateway", 1)[1]:
        if proc.poll() is not None or time.time() > deadline:
            handle.stop()
            logs = handle.output() + "".join(f.read_text(errors="replace") for f in log_dir.glob("*.log"))
            error = PortTaken if "Address already in use" in logs else RuntimeError
            raise error(f"the cluster did not start:\n{handle.output()}")
        time.sleep(0.5)
    for name, url, pid in READY.findall(handle.output()):
        handle.workers[name], handle.pids[name] = url, int(pid)
    return handle


def post(url: str, path: str, body: dict) -> dict:
    """A JSON POST that must answer 200."""
    r = httpx.post(f"{url}{path}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def streamed(url: str, path: str, body: dict) -> list:
    """The JSON chunks of a streamed POST, which must end with [DONE]."""
    with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        lines = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]
