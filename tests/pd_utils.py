"""Looking at prefill/decode disaggregated servers from the tests."""

from __future__ import annotations

import struct
import time
from typing import Any, Dict

import httpx

TIMEOUT_S = 4  # --disaggregation-transfer-timeout of the tests' servers


def pd_info(url: str) -> Dict[str, Any]:
    """The server's transfer counters (get_server_info's "disaggregation")."""
    return httpx.get(f"{url}/get_server_info", timeout=30).json()["disaggregation"]


def kv_settled(url: str, wait_s: float = 30.0) -> Dict[str, int]:
    """The server's KV counts once no request holds KV any more (or after wait_s:
    the caller's assertions then show what is left)."""
    deadline = time.time() + wait_s
    while True:
        info = httpx.get(f"{url}/get_server_info", timeout=30).json()
        if (info["kv_cache"]["in_use_tokens"] == 0 and info["num_running_reqs"] == 0) or time.time() > deadline:
            return info["kv_cache"]
        time.sleep(0.2)


def as_float32(value):
    """Logprobs are float32 values; the gateway prints some of them in float32's
    shortest form, which reads back as a different float64: compare as float32."""
    if isinstance(value, float):
        return struct.unpack("f", struct.pack("f", value))[0]
    if isinstance(value, list):
        return [as_float32(v) for v in value]
    if isinstance(value, dict):
        return {k: as_float32(v) for k, v in value.items()}
    return value
