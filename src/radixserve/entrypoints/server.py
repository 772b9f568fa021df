"""Start the runtime, then serve HTTP until SIGINT/SIGTERM (or a child dies)."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import uvicorn

from radixserve.entrypoints.http_guard import uvicorn_settings
from radixserve.entrypoints.http_server import ServerState, create_app
from radixserve.entrypoints.runtime import Runtime
from radixserve.managers.embedding_input import EmbeddingReqInput, encode_request
from radixserve.managers.generate_input import GenerateReqInput
from radixserve.server_args import ServerArgs

logger = logging.getLogger(__name__)

# After a child dies: how long the failed requests' responses get to go out
# before the server stops.
DRAIN_AFTER_DEATH_S = 1.0


def run_server(args: ServerArgs) -> int:
    """Serve until stopped. Returns the exit code: 0 after SIGINT/SIGTERM, 1
    when a child process died or the warm-up failed. Raises ValueError (bad arguments) or
    StartupError (the model did not load) before serving."""
    start = time.monotonic()
    runtime = Runtime.start(args)
    try:
        tm = runtime.tokenizer_manager
        state = ServerState(tm, args, args.served_model_name or runtime.source.name, api_key=args.api_key)

        async def warmup() -> None:
            runtime.loop = asyncio.get_running_loop()
            if args.is_embedding:
                await encode_request(tm, EmbeddingReqInput(input_ids=[0, 1, 2]))
            else:
                gen = GenerateReqInput(input_ids=[0, 1, 2], sampling_params={"max_new_tokens": 2, "temperature": 0})
                async for _ in tm.generate_request(gen):
                    pass
            logger.info("model %s loaded and warmed up in %.1f s; serving on http://%s:%d",
                        state.served_model_name, time.monotonic() - start, args.host, args.port)

        app = create_app(state, warmup)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                               timeout_graceful_shutdown=5, **uvicorn_settings()))

        def stop_after_child_death(message: str) -> None:
            # The watchdog already failed every pending request (and /health
            # answers 503): let those answers go out, then stop.
            time.sleep(DRAIN_AFTER_DEATH_S)
            server.should_exit = True

        runtime.watch_children(stop_after_child_death)
        with stop_signals_return():
            server.run()
        # Not started: the warm-up (in the app's lifespan) failed, and uvicorn
        # has logged why.
        return 1 if runtime.child_death or not server.started else 0
    finally:
        runtime.shutdown()


@contextmanager
def stop_signals_return() -> Iterator[None]:
    """uvicorn stops gracefully on SIGINT/SIGTERM, then raises the signal again
    for the handler that was there before it; with Python's default one the
    process would die there, before the runtime's shutdown removes the IPC
    files. Here that handler just returns, so run_server ends normally."""
    if threading.current_thread() is not threading.main_thread():
        yield  # (signals reach only the main thread; uvicorn does not capture them either)
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
