"""python -m radixserve.launch_server [--model-path P] [--host H] [--port N] [ServerArgs flags]"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from radixserve.server_args import ServerArgs

logger = logging.getLogger("radixserve")


def parse_args(argv: Optional[List[str]] = None) -> ServerArgs:
    parser = argparse.ArgumentParser(prog="python -m radixserve.launch_server")
    ServerArgs.add_cli_args(parser)
    return ServerArgs.from_cli_args(parser.parse_args(argv))


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] %(levelname)s %(message)s")
    from radixserve.entrypoints.server import run_server

    sys.exit(run_server(args))


if __name__ == "__main__":
    main()
