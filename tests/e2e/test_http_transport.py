"""The HTTP transport's bounds (entrypoints/http_guard.py) through real sockets:
API keys, the body limit on the bytes actually read (chunked uploads too),
header-read and keep-alive timeouts, disconnect detection for non-streamed
requests, and our error format for refusals."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator, List

import httpx
import pytest
import uvicorn

from radixserve.entrypoints.http_guard import header_timeout_protocol
from tests.server_utils import free_port, running_server

API_KEY, ADMIN_KEY = "user-key", "admin-key"
USER = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
BODY_LIMIT = 1 << 20
HANG_GUARD_S = 60  # bounds every wait below; only there to stop a hang


def raw_socket(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(HANG_GUARD_S)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sent until it closed. A server that closes with
    our upload unread resets the connection (RST) after its answer, so a reset
    ends the reading too; what it sent before is still delivered first."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def json_of(reply: bytes) -> dict:
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])


def send_request(base: str, path: str, body: dict) -> socket.socket:
    """A whole JSON request on a raw socket, left open."""
    sock = raw_socket(base)
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.fixture(scope="module")
def server(tiny_model_factory):
    args = ["--api-key", API_KEY, "--admin-api-key", ADMIN_KEY, "--enable-metrics", "--context-length", "4096",
            "--max-request-body-bytes", str(BODY_LIMIT)]
    with running_server(tiny_model_factory("llama"), *args) as (_, base):
        # Connections that never finish their request head, opened now and
        # checked by the last test, so the real server's header timeout elapses
        # while the other tests run.
        slow = [raw_socket(base) for _ in range(20)]
        for i, sock in enumerate(slow):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " if i % 2 else b"GET /hea")
        yield base, slow
        for sock in slow:
            sock.close()


def server_info(base: str) -> dict:
    return httpx.get(f"{base}/get_server_info", headers=USER).json()


def aborted_total(base: str) -> float:
    for line in httpx.get(f"{base}/metrics", headers=USER).text.splitlines():
        if line.startswith("radixserve:aborted_requests_total"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no radixserve:aborted_requests_total in /metrics")


def test_api_keys(server):
    base, _ = server
    refused = httpx.get(f"{base}/v1/models")
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    for header in (f"Bearer {API_KEY}", f"bearer {API_KEY}", f"BEARER  {API_KEY}"):
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": header}).status_code == 200, header
    for header in (f"Bearer {API_KEY}x", f"Bearer {API_KEY[:-1]}", f"Basic {API_KEY}", API_KEY, "Bearer", ""):
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": header}).status_code == 401, header
    assert httpx.get(f"{base}/health").status_code == 200
    # Refused before its body is read, and the connection closed: an endless
    # upload without a key costs the server nothing.
    sock = raw_socket(base)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n")
    reply = read_until_closed(sock)
    assert status_of(reply) == 401 and json_of(reply)["error"]["type"] == "authentication_error"
    # The admin key, not the user's, opens the admin routes.
    assert httpx.post(f"{base}/flush_cache", headers=USER).status_code == 401
    assert httpx.post(f"{base}/flush_cache", headers=ADMIN).json()["success"] is True


def test_declared_body_too_large_is_refused_before_reading(server):
    base, _ = server
    sock = raw_socket(base)
    sock.sendall(f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                 f"Content-Length: {BODY_LIMIT + 1}\r\n\r\n".encode())  # and no body at all
    reply = read_until_closed(sock)
    assert status_of(reply) == 413 and "max-request-body-bytes" in json_of(reply)["error"]["message"]


def test_chunked_body_is_refused_after_the_limit(server):
    base, _ = server
    sock = raw_socket(base)
    sock.sendall(f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode())
    piece = b"x" * 65536
    for _ in range(BODY_LIMIT // len(piece) + 2):  # just past the limit, and the body never ends
        sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
    reply = read_until_closed(sock)  # answered while the upload is still open
    assert status_of(reply) == 413 and json_of(reply)["error"]["code"] == 413

    sent = 0

    def fifty_megabytes() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(50):
            sent += 1 << 20
            yield b"x" * (1 << 20)

    r = httpx.post(f"{base}/v1/completions", content=fifty_megabytes(), headers=USER, timeout=HANG_GUARD_S)
    assert r.status_code == 413, r.text
    assert sent < 50 << 20  # the server stopped reading: the client could not push it all


def test_abandoned_non_streamed_requests_are_aborted(server):
    base, _ = server
    aborted_before = aborted_total(base)
    long = {"max_new_tokens": 3000, "ignore_eos": True}
    clients = [send_request(base, "/generate", {"text": "Tell a long story", "sampling_params": long}),
               send_request(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Go on"}],
                                                           "max_tokens": 3000, "ignore_eos": True})]
    for _ in range(HANG_GUARD_S * 20):
        if server_info(base)["num_running_reqs"] == 2:
            break
        time.sleep(0.05)
    # Paused, the requests keep their KV and cannot finish on their own: only
    # the disconnect can end them.
    assert httpx.post(f"{base}/pause_generation", json={"mode": "in_place"}, headers=ADMIN).status_code == 200
    try:
        info = server_info(base)
        assert info["num_running_reqs"] == 2 and info["kv_cache"]["in_use_tokens"] > 0, info
        refused = httpx.post(f"{base}/flush_cache", headers=ADMIN)
        assert refused.status_code == 400 and "not flushed" in refused.json()["error"]["message"]
        for sock in clients:
            sock.close()
        for _ in range(HANG_GUARD_S * 20):
            info = server_info(base)
            if info["num_running_reqs"] == 0 and info["kv_cache"]["in_use_tokens"] == 0:
                break
            time.sleep(0.05)
        assert info["num_running_reqs"] == 0 and info["kv_cache"]["in_use_tokens"] == 0, info
    finally:
        httpx.post(f"{base}/continue_generation", headers=ADMIN)
    assert aborted_total(base) == aborted_before + 2
    ok = httpx.post(f"{base}/generate", headers=USER, json={"input_ids": [5, 6, 7], "sampling_params": {
        "max_new_tokens": 2, "temperature": 0, "ignore_eos": True}})
    assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 2


def test_real_server_closes_slow_headers(server):
    """Last in the module: the slow connections opened with the server."""
    base, slow = server
    assert httpx.get(f"{base}/health").status_code == 200  # served meanwhile
    for sock in slow:
        assert read_until_closed(sock) == b""  # closed by the server, no answer


# ---- uvicorn's own bounds, on an in-process server with short timeouts ----
async def tiny_app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


@contextmanager
def short_timeout_server() -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(tiny_app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                            http=header_timeout_protocol(1.0), timeout_keep_alive=0.5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(HANG_GUARD_S * 20):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=HANG_GUARD_S)


def test_header_read_and_keep_alive_timeouts():
    with short_timeout_server() as base:
        silent = raw_socket(base)  # sends nothing at all
        slow: List[socket.socket] = []
        for i in range(300):
            sock = raw_socket(base)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Half: " if i % 2 else b"GET / HT")
            slow.append(sock)
        assert httpx.get(base).text == "ok"  # others are served meanwhile
        for sock in [silent, *slow]:
            assert read_until_closed(sock) == b""
            sock.close()
        # A complete request is answered, and the idle connection then closed.
        sock = raw_socket(base)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = read_until_closed(sock)
        assert status_of(reply) == 200 and reply.endswith(b"ok")
        # After an answer, a new request head that stops halfway is cut off too.
        sock = raw_socket(base)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b"ok"):
            answer += sock.recv(65536)
        assert status_of(answer) == 200
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        assert read_until_closed(sock) == b""
