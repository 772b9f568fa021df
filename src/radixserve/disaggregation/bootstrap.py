"""The bootstrap server: a small HTTP server on the prefill server
(--disaggregation-bootstrap-port) where each prefill rank registers how to
reach it, and where decode ranks look up the prefill rank of their own tp rank.

  PUT /route  {"rank": r, "tp_size": n, "session": "host:port", "endpoint": "tcp://host:port"}
  GET /route?rank=r  -> that record (404 until rank r registered)
  GET /health

It runs in a thread of the prefill server's tp-rank-0 scheduler process.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict
from urllib.parse import parse_qs, urlparse

logger = logging.getLogger(__name__)


@dataclass
class RankRoute:
    rank: int
    tp_size: int
    session: str  # the rank's transfer engine, host:rpc_port
    endpoint: str  # the rank's ZMQ socket for KV destinations


class RouteError(RuntimeError):
    pass


class BootstrapServer:
    def __init__(self, host: str, port: int) -> None:
        self.routes: Dict[int, RankRoute] = {}
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="pd-bootstrap", daemon=True)
        self.thread.start()

    def register(self, route: RankRoute) -> None:
        with self.lock:
            self.routes[route.rank] = route

    def lookup(self, rank: int):
        with self.lock:
            return self.routes.get(rank)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                if url.path == "/health":
                    return self._reply(200, {})
                if url.path != "/route":
                    return self._reply(404, {"error": f"no such path {url.path}"})
                try:
                    rank = int(parse_qs(url.query)["rank"][0])
                except (KeyError, ValueError):
                    return self._reply(400, {"error": "GET /route needs ?rank=<int>"})
                route = server.lookup(rank)
                if route is None:
                    return self._reply(404, {"error": f"prefill rank {rank} has not registered"})
                return self._reply(200, asdict(route))

            def do_PUT(self) -> None:
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                    server.register(RankRoute(**body))
                except (ValueError, TypeError) as e:
                    return self._reply(400, {"error": f"bad route: {e}"})
                return self._reply(200, {})

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # requests are not worth a log line each
                pass

        return Handler


def register_route(host: str, port: int, route: RankRoute, wait_s: float = 60.0) -> None:
    """A prefill rank other than 0 registers with rank 0's server (which may still be starting)."""
    deadline = time.monotonic() + wait_s
    data = json.dumps(asdict(route)).encode()
    while True:
        request = urllib.request.Request(f"http://{host}:{port}/route", data=data, method="PUT",
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=5).read()
            return
        except (urllib.error.URLError, OSError) as e:
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot register with the bootstrap server at {host}:{port}: {e}") from e
            time.sleep(0.2)


def lookup_route(host: str, port: int, rank: int, wait_s: float) -> RankRoute:
    """The prefill rank `rank` behind the bootstrap server at host:port; waits up
    to wait_s for it to register, fails at once if nothing listens there."""
    deadline = time.monotonic() + wait_s
    url = f"http://{host}:{port}/route?rank={rank}"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=max(min(5.0, wait_s), 0.1)) as r:
                return RankRoute(**json.loads(r.read()))
        except urllib.error.HTTPError as e:
            if e.code != 404 or time.monotonic() > deadline:
                raise RouteError(f"the bootstrap server at {host}:{port} has no prefill rank {rank}: "
                                 f"HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            raise RouteError(f"cannot reach the prefill server's bootstrap server at {host}:{port}: "
                             f"{getattr(e, 'reason', e)}") from None
        time.sleep(0.1)
