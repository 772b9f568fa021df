"""python -m radixserve.launch_cluster --workers N [--router-policy P] [--port N] [worker flags]
   python -m radixserve.launch_cluster --prefill-workers P --decode-workers D [...] [worker flags]

N radixserve workers on free loopback ports with SGLang's Model Gateway
(`sglang-router`, the `radixserve[router]` extra) in front of them on --port.
Every flag this launcher does not know is passed to each worker's
`radixserve.launch_server`. It waits until the workers and the gateway answer
/health, then watches them: Ctrl-C or SIGTERM stops everything together; a
dead worker is reported (which one, its exit code) and the gateway keeps
serving from the others, unless --exit-on-worker-death asks to stop all; a
dead gateway, or the last worker gone, stops all.

With --prefill-workers and --decode-workers it starts a disaggregated cluster
instead: prefill servers (each with its own bootstrap port) and decode
servers, and the gateway in its --pd-disaggregation mode pairing them.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, List, Optional

import httpx

PROG = "python -m radixserve.launch_cluster"
POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")
HEALTH_POLL_S = 0.5
WATCH_POLL_S = 0.5
STOP_GRACE_S = 20.0


@dataclass
class Member:
    """One process of the cluster: a worker or the gateway."""

    name: str
    url: str
    proc: subprocess.Popen
    reported: bool = False  # its death was already reported
    bootstrap_port: Optional[int] = None  # a prefill server's --disaggregation-bootstrap-port


@dataclass
class Cluster:
    workers: List[Member]
    router: Optional[Member] = None
    exit_on_worker_death: bool = False
    out: IO[str] = field(default=sys.stdout)

    @property
    def members(self) -> List[Member]:
        return self.workers + ([self.router] if self.router else [])

    def say(self, message: str) -> None:
        print(f"[launch_cluster] {message}", file=self.out, flush=True)

    def check(self) -> Optional[int]:
        """Report members that died since the last check. Returns the exit code
        when the whole cluster must stop, else None."""
        for member in self.members:
            code = member.proc.poll()
            if code is None or member.reported:
                continue
            member.reported = True
            self.say(f"{member.name} ({member.url}, pid {member.proc.pid}) exited with code {code}")
            if member is self.router:
                return 1
            if self.exit_on_worker_death:
                return 1
        if all(w.reported for w in self.workers):
            self.say("no worker left")
            return 1
        return None

    def watch(self) -> int:
        """Until a signal or a fatal death: the exit code (0 after a signal)."""
        stop = {"signal": None}

        def on_signal(signum, _frame) -> None:
            stop["signal"] = signum

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while stop["signal"] is None:
                code = self.check()
                if code is not None:
                    return code
                time.sleep(WATCH_POLL_S)
            self.say(f"received {signal.Signals(stop['signal']).name}")
            return 0
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def stop(self) -> None:
        """SIGTERM to all (the gateway first, so it stops sending), then SIGKILL
        to whatever has not exited within the grace period."""
        for member in reversed(self.members):
            if member.proc.poll() is None:
                member.proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for member in self.members:
            try:
                member.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                member.proc.kill()
                member.proc.wait()
        self.say("all stopped")


def free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(member: Member, timeout_s: float) -> None:
    """Poll /health until it answers 200; a process that exits first, or a
    timeout, is a RuntimeError naming the member."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if member.proc.poll() is not None:
            raise RuntimeError(f"{member.name} exited with code {member.proc.returncode} during start-up")
        try:
            if httpx.get(f"{member.url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(HEALTH_POLL_S)
    raise RuntimeError(f"{member.name} did not become healthy within {timeout_s:.0f} s")


def log_file(log_dir: Optional[str], name: str):
    if log_dir is None:
        return None  # inherit this terminal
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    return open(Path(log_dir) / f"{name.replace(' ', '_')}.log", "w")


def worker_roles(args: argparse.Namespace) -> List[str]:
    """Each worker's role: "worker" (an ordinary server), "prefill" or "decode"."""
    if args.prefill_workers or args.decode_workers:
        return ["prefill"] * args.prefill_workers + ["decode"] * args.decode_workers
    return ["worker"] * args.workers


def start_workers(args: argparse.Namespace, worker_flags: List[str]) -> List[Member]:
    workers, counts = [], {}
    for role in worker_roles(args):
        i = counts[role] = counts.get(role, -1) + 1
        port = free_port(args.worker_host)
        flags, bootstrap = [], None
        if role == "prefill":
            bootstrap = free_port(args.worker_host)
            flags = ["--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(bootstrap)]
        elif role == "decode":
            flags = ["--disaggregation-mode", "decode"]
        log = log_file(args.log_dir, f"{role} {i}")
        proc = subprocess.Popen(
            [sys.executable, "-m", "radixserve.launch_server", *worker_flags, *flags,
             "--host", args.worker_host, "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT if log else None)
        workers.append(Member(f"{role} {i}", f"http://{args.worker_host}:{port}", proc, bootstrap_port=bootstrap))
    return workers


def router_worker_flags(workers: List[Member]) -> List[str]:
    """The gateway's worker list: plain URLs, or its PD mode's --prefill URL PORT / --decode URL."""
    if not any(w.name.startswith(("prefill", "decode")) for w in workers):
        return ["--worker-urls", *[w.url for w in workers]]
    flags = ["--pd-disaggregation"]
    for w in workers:
        if w.name.startswith("prefill"):
            flags += ["--prefill", w.url, str(w.bootstrap_port)]
        else:
            flags += ["--decode", w.url]
    return flags


def start_router(args: argparse.Namespace, workers: List[Member]) -> Member:
    log = log_file(args.log_dir, "router")
    command = [sys.executable, "-m", "sglang_router.launch_router", "--host", args.host, "--port", str(args.port),
               "--policy", args.router_policy, *router_worker_flags(workers), *shlex.split(args.router_args)]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT if log else None)
    return Member("router", f"http://{args.host}:{args.port}", proc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="how many radixserve workers")
    parser.add_argument("--prefill-workers", type=int, default=0,
                        help="prefill/decode disaggregation: this many prefill servers (with --decode-workers)")
    parser.add_argument("--decode-workers", type=int, default=0,
                        help="prefill/decode disaggregation: this many decode servers (with --prefill-workers)")
    parser.add_argument("--router-policy", choices=POLICIES, default="cache_aware",
                        help="the gateway's routing policy")
    parser.add_argument("--host", default="127.0.0.1", help="the gateway's address")
    parser.add_argument("--port", type=int, default=30000, help="the gateway's port")
    parser.add_argument("--worker-host", default="127.0.0.1", help="the workers' address")
    parser.add_argument("--router-args", default="", help="more flags for sglang_router.launch_router, "
                                                          "as one quoted string")
    parser.add_argument("--log-dir", default=None, help="one log file per process here (default: this terminal)")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for health")
    parser.add_argument("--exit-on-worker-death", action="store_true",
                        help="stop the whole cluster when any worker dies (default: report it and keep "
                             "serving from the others)")
    return parser


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    args, worker_flags = build_parser().parse_known_args(argv)
    if args.workers < 1:
        print(f"{PROG}: error: --workers must be >= 1", file=sys.stderr)
        return 2
    if (args.prefill_workers > 0) != (args.decode_workers > 0) or min(args.prefill_workers, args.decode_workers) < 0:
        print(f"{PROG}: error: --prefill-workers and --decode-workers go together, both >= 1", file=sys.stderr)
        return 2
    if importlib.util.find_spec("sglang_router") is None:
        print(f"{PROG}: error: sglang-router is not installed: pip install 'radixserve[router]'", file=sys.stderr)
        return 2
    # SIGTERM during start-up stops what was started, as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    cluster = Cluster(start_workers(args, worker_flags), exit_on_worker_death=args.exit_on_worker_death)
    try:
        for worker in cluster.workers:
            wait_healthy(worker, args.startup_timeout)
            cluster.say(f"{worker.name} ready at {worker.url} (pid {worker.proc.pid})")
        cluster.router = start_router(args, cluster.workers)
        wait_healthy(cluster.router, args.startup_timeout)
        cluster.say(f"gateway ({args.router_policy}) ready at {cluster.router.url} (pid {cluster.router.proc.pid})")
        return cluster.watch()
    except RuntimeError as e:
        cluster.say(f"error: {e}")
        return 1
    except KeyboardInterrupt:  # Ctrl-C during start-up
        return 0
    finally:
        cluster.stop()
