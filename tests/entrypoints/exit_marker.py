"""Preloaded by test_fork_server: prints a line from an exit handler."""

import atexit

atexit.register(print, "exit handler ran", flush=True)
