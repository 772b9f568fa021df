"""The short version of bench/soak.py: a few hundred requests from misbehaving streaming clients."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from tests.server_utils import free_port

SOAK_REQUESTS = 200  # 5% hostile, 20% hang up: every kind is all but certain to occur


def load_soak():
    path = Path(__file__).resolve().parents[2] / "bench" / "soak.py"
    spec = importlib.util.spec_from_file_location("soak", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_short_soak(tiny_model_factory):
    soak = load_soak()
    # A fixed number of requests (the seconds only bound a stuck run), so the
    # counts below do not depend on the machine's speed.
    result = soak.run_soak(str(tiny_model_factory("llama")), seconds=300, clients=8, port=free_port(),
                           extra=["--max-total-tokens", "2048"], max_requests=SOAK_REQUESTS, hostile_pool=300)
    assert result["server_errors"] == 0 and result["wrong_length"] == 0 and not result["other_errors"], result
    assert result["requests"] >= SOAK_REQUESTS, result
    assert result["completed"] > 20 and result["dropped"] > 0 and result["hostile_sent"] > 0, result
    assert result["kv_at_end"]["in_use_tokens"] == 0, result
    assert result["kv_after_flush"]["free_tokens"] == result["kv_after_flush"]["total_tokens"], result
    assert all(g <= 1.10 for g in result["rss_growth"].values()), result["rss_growth"]
