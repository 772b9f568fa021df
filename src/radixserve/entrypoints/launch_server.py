"""python -m radixserve.launch_server [--model-path P] [--host H] [--port N] [ServerArgs flags]

A mistake in the command line (an unknown flag, a bad value, a model path that
is not a model) ends in one line on stderr that says what to do, and exit
code 2; a model that fails to load ends in one line and exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, NoReturn, Optional

from radixserve.entrypoints.child_processes import start_fork_server_early
from radixserve.model_loader.source import resolve_model_source
from radixserve.server_args import ServerArgs, configure_logging

logger = logging.getLogger("radixserve")

PROG = "python -m radixserve.launch_server"
BAD_ARGUMENTS = 2  # argparse's exit code for a bad command line
STARTUP_FAILED = 1


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse's own errors print the whole usage (40 flags) first; print only the error."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see --help)", BAD_ARGUMENTS)


def fail(message: str, code: int) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog=PROG, usage="%(prog)s [options]",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Serve a model over HTTP with OpenAI-compatible and "
                                            "SGLang-native endpoints.")
    ServerArgs.add_cli_args(parser)
    return parser


def parse_args(argv: Optional[List[str]] = None) -> ServerArgs:
    """ServerArgs from the command line; ValueError naming the flag if a value is bad."""
    return ServerArgs.from_cli_args(build_parser().parse_args(argv))


def main(argv: Optional[List[str]] = None) -> None:
    try:
        args = parse_args(argv)
        # Checked again when the runtime starts; here it fails in a second,
        # before the server's imports (torch, transformers) take their time.
        resolve_model_source(args.model_path)
    except ValueError as e:
        fail(str(e), BAD_ARGUMENTS)
    configure_logging(args.log_level)
    start_fork_server_early(args)  # its imports then overlap the ones below
    from radixserve.entrypoints.runtime import StartupError, run_rank_node
    from radixserve.entrypoints.server import run_server

    try:
        # A node other than 0 only runs its ranks (no HTTP), until they exit.
        code = run_rank_node(args) if args.node_rank > 0 else run_server(args)
    except ValueError as e:  # raised before anything is served: the model path
        logger.debug("start-up refused", exc_info=True)
        fail(str(e), BAD_ARGUMENTS)
    except StartupError as e:  # the scheduler's own log above has the traceback
        fail(str(e), STARTUP_FAILED)
    sys.exit(code)


if __name__ == "__main__":
    main()
