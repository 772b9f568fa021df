"""The short version of bench/soak.py: 20 seconds of misbehaving streaming clients."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from tests.server_utils import free_port


def load_soak():
    path = Path(__file__).resolve().parents[2] / "bench" / "soak.py"
    spec = importlib.util.spec_from_file_location("soak", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_short_soak(tiny_model_factory):
    soak = load_soak()
    result = soak.run_soak(str(tiny_model_factory("llama")), seconds=20, clients=8, port=free_port(),
                           extra=["--max-total-tokens", "2048"])
    assert result["server_errors"] == 0 and result["wrong_length"] == 0 and not result["other_errors"], result
    assert result["completed"] > 20 and result["dropped"] > 0 and result["hostile_sent"] > 0, result
    assert result["kv_at_end"]["in_use_tokens"] == 0, result
    assert result["kv_after_flush"]["free_tokens"] == result["kv_after_flush"]["total_tokens"], result
    assert all(g <= 1.10 for g in result["rss_growth"].values()), result["rss_growth"]
