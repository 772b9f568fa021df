"""Bounded work per HTTP request, at the transport level.

- `TransportGuard`, a pure ASGI middleware (not Starlette's BaseHTTPMiddleware,
  which buffers and hides the client's disconnect from the routes): the API-key
  check, then the request body read by the guard itself, at most
  `--max-request-body-bytes` of it whatever the framing (chunked uploads
  included) and within a deadline, before any route runs.
- `until_disconnected`: a non-streamed route's work is cancelled (its requests
  aborted in the scheduler, their KV freed) as soon as its client goes away.
- `uvicorn_settings`: keep-alive and header-read timeouts for uvicorn; uvicorn's
  h11 protocol has no header-read timeout, so `HeaderTimeoutH11Protocol` adds one.

Limits without an SGLang flag are the constants below (docs/limits.md).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any, Awaitable, Collection, Dict, Optional, TypeVar

import h11
from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

T = TypeVar("T")

# uvicorn closes a connection idle this long after a response (SGLang hard-codes 5 s too).
KEEP_ALIVE_TIMEOUT_S = 5
# A connection must deliver a whole request head (request line and headers) this
# long after it opens, or after its first byte following an idle keep-alive.
HEADER_READ_TIMEOUT_S = 10.0
# The whole body must arrive within this long after the head (16 MiB at ~300 kB/s).
BODY_READ_TIMEOUT_S = 60.0
# The largest request head h11 buffers (h11's own default, stated here on purpose).
MAX_HEAD_BYTES = 16 * 1024

# Paths open without a key: a load balancer probes them.
OPEN_PATHS = frozenset({"/health"})


def error_response(status: int, message: str, err_type: str = "invalid_request_error",
                   param: Optional[str] = None, code: Optional[Any] = None,
                   headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    """The OpenAI error body every refusal of this server uses."""
    body = {"error": {"message": message, "type": err_type, "param": param, "code": code or status}}
    return JSONResponse(body, status_code=status, headers=headers)


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; nobody is left to answer."""


class BodyTooLarge(Exception):
    pass


def bearer_token(scope: Scope) -> Optional[bytes]:
    """The credentials of an `Authorization: Bearer <token>` header (the scheme
    is case-insensitive, RFC 7235), or None."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


def key_matches(scope: Scope, key: str) -> bool:
    token = bearer_token(scope)
    # compare_digest: the time taken does not tell how many leading bytes matched.
    return token is not None and hmac.compare_digest(token, key.encode("utf-8"))


def declared_length(scope: Scope) -> Optional[int]:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.strip().isdigit() else None
    return None


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body, refused as soon as it passes limit bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge()
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class Exchange:
    """One request/response as the app sees it: the body already read, then the
    client's own channel (which reports a disconnect); notes whether the client
    left before the response was complete."""

    def __init__(self, receive: Receive, send: Send, body: bytes) -> None:
        self._receive, self._send, self._body = receive, send, body
        self._body_given = False
        self.response_complete = False
        self.client_left = False

    async def receive(self) -> Message:
        if not self._body_given:
            self._body_given = True
            return {"type": "http.request", "body": self._body, "more_body": False}
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self.response_complete:
            self.client_left = True
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.response_complete = True
        await self._send(message)


class TransportGuard:
    """Pure ASGI middleware: authentication and a bounded body read for every
    HTTP request, before the app sees it."""

    def __init__(self, app: ASGIApp, *, api_key: Optional[str], admin_api_key: Optional[str],
                 admin_paths: Collection[str], max_body_bytes: int,
                 body_read_timeout_s: float = BODY_READ_TIMEOUT_S, metrics: Any = None) -> None:
        self.app = app
        self.api_key, self.admin_api_key, self.admin_paths = api_key, admin_api_key, admin_paths
        self.max_body_bytes, self.body_read_timeout_s = max_body_bytes, body_read_timeout_s
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is None:
            try:
                body = await asyncio.wait_for(read_body(receive, self.max_body_bytes), self.body_read_timeout_s)
            except ClientDisconnected:
                return
            except BodyTooLarge:
                refusal = self.too_large()
            except TimeoutError:
                refusal = self.failed(408, f"the request body did not arrive within {self.body_read_timeout_s:g} s",
                                      headers={"connection": "close"})
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        exchange = Exchange(receive, send, body)
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except ClientDisconnected:
            pass  # the route has cancelled its work already
        if exchange.client_left and not exchange.response_complete and self.metrics is not None:
            self.metrics.on_client_disconnect()

    def refusal(self, scope: Scope) -> Optional[JSONResponse]:
        """The error answer owed before reading the body, or None."""
        path = scope["path"]
        key = self.admin_api_key if (self.admin_api_key and path in self.admin_paths) else self.api_key
        if key and path not in OPEN_PATHS and not key_matches(scope, key):
            # Closed after the answer: uvicorn would otherwise read (and drop)
            # whatever body an unauthenticated client keeps sending.
            return self.failed(401, "invalid or missing API key", err_type="authentication_error",
                               headers={"connection": "close"})
        length = declared_length(scope)
        if length is not None and length > self.max_body_bytes:
            return self.too_large()
        return None

    def too_large(self) -> JSONResponse:
        # Connection: close, since the rest of the body is left unread on the socket.
        return self.failed(413, f"request body larger than {self.max_body_bytes} bytes (--max-request-body-bytes)",
                           headers={"connection": "close"})

    def failed(self, status: int, message: str, **kwargs: Any) -> JSONResponse:
        if self.metrics is not None:
            self.metrics.on_error(status)
        return error_response(status, message, **kwargs)


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns once the client has gone away (the body has been read already,
    so the next message on the channel is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run work; if the client goes away first, cancel it (which aborts its
    requests in the scheduler and frees their KV) and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this route is cancelled itself (server shutdown)
        watcher.cancel()
        if not task.done():
            task.cancel()
            # Let the work's own cleanup (the abort message) run before we leave.
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header-read timeout: a connection that has
    not delivered a complete request head within header_read_timeout_s of
    opening (or of its first byte after an idle keep-alive) is closed. uvicorn
    itself only times out idle keep-alive connections, so a client sending half
    a header line would hold its connection forever."""

    header_read_timeout_s: float = HEADER_READ_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: Optional[asyncio.TimerHandle] = None
        self._head_started = False
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_head() and not self._head_started:
            # The first bytes of a new head: its deadline starts now, not at
            # the end of the previous response (uvicorn's keep-alive covers that).
            self._head_started = True
            self._arm_head_timer()
        self._watch_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._head_started = False
        self._watch_head()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _waiting_for_head(self) -> bool:
        return self.conn.their_state is h11.IDLE and not self.transport.is_closing()

    def _watch_head(self) -> None:
        if not self._waiting_for_head():
            self._cancel_head_timer()
            self._head_started = False
        elif self._head_timer is None:
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_read_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._waiting_for_head():
            logger.debug("closing a connection that sent no complete request head in %.1f s",
                         self.header_read_timeout_s)
            self.transport.close()


def header_timeout_protocol(seconds: float) -> type:
    """HeaderTimeoutH11Protocol with another timeout (tests use a short one)."""
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_read_timeout_s": seconds})


def uvicorn_settings() -> Dict[str, Any]:
    """The uvicorn.Config arguments that bound a connection's life."""
    return {"http": HeaderTimeoutH11Protocol, "timeout_keep_alive": KEEP_ALIVE_TIMEOUT_S,
            "h11_max_incomplete_event_size": MAX_HEAD_BYTES}
