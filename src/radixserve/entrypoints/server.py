"""Start the subprocesses, then serve HTTP until SIGINT/SIGTERM (or a child dies)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import uvicorn

from radixserve.entrypoints.engine import kill_processes, launch_subprocesses
from radixserve.entrypoints.http_guard import uvicorn_settings
from radixserve.entrypoints.http_server import ServerState, create_app
from radixserve.managers.generate_input import GenerateReqInput
from radixserve.managers.tokenizer_manager import TokenizerManager
from radixserve.model_loader.source import resolve_model_source
from radixserve.server_args import ServerArgs
from radixserve.utils.hf_utils import load_tokenizer

logger = logging.getLogger(__name__)


def load_frontend_tokenizer(args: ServerArgs):
    """The tokenizer, with --chat-template's Jinja file in place of the model's own."""
    tokenizer = load_tokenizer(resolve_model_source(args.model_path), args.tokenizer_path)
    if args.chat_template:
        tokenizer.chat_template = Path(args.chat_template).read_text()
    return tokenizer


def run_server(args: ServerArgs) -> int:
    source = resolve_model_source(args.model_path)
    start = time.monotonic()
    port_args, ready, procs = launch_subprocesses(args)
    try:
        tm = TokenizerManager(args, port_args, load_frontend_tokenizer(args), ready)
        state = ServerState(tm, args, args.served_model_name or source.name, api_key=args.api_key)

        async def warmup() -> None:
            gen = GenerateReqInput(input_ids=[0, 1, 2], sampling_params={"max_new_tokens": 2, "temperature": 0})
            async for _ in tm.generate_request(gen):
                pass
            logger.info("model %s loaded and warmed up in %.1f s; serving on http://%s:%d",
                        state.served_model_name, time.monotonic() - start, args.host, args.port)

        app = create_app(state, warmup)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                               timeout_graceful_shutdown=5, **uvicorn_settings()))
        exit_code = {"value": 0}
        threading.Thread(target=watch_children, args=(procs, server, state, exit_code), daemon=True).start()
        server.run()
        return exit_code["value"]
    finally:
        kill_processes(procs)


def watch_children(procs, server: uvicorn.Server, state: ServerState, exit_code: dict) -> None:
    """A dead scheduler or detokenizer fails every pending request at once,
    turns /health to 503, and makes the server exit non-zero so a supervisor
    restarts it."""
    while not server.should_exit:
        dead = [p for p in procs if not p.is_alive()]
        if dead:
            message = f"{dead[0].name} exited with code {dead[0].exitcode}"
            logger.error("%s; failing pending requests and shutting down", message)
            if state.loop is not None:
                state.loop.call_soon_threadsafe(state.tm.fail_all, message)
            exit_code["value"] = 1
            time.sleep(1.0)  # let the failed requests' responses go out
            server.should_exit = True
            return
        time.sleep(0.2)
