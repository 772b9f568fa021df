"""Per-request measurements and the aggregate metrics of a serving run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

PERCENTILES = (("mean", None), ("median", 50), ("p90", 90), ("p99", 99))
LATENCY_METRICS = ("ttft", "itl", "tpot", "e2e_latency")


@dataclass
class RequestOutput:
    """What one streamed request measured. Token counts are the server's when it
    reports them (`counts_reported`), else counted locally."""

    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_len: int = 0
    cached_tokens: Optional[int] = None  # None: the server does not report it
    counts_reported: bool = False
    ttft: float = 0.0  # seconds from sending to the first token
    latency: float = 0.0  # seconds from sending to the end of the stream
    itl: List[float] = field(default_factory=list)  # gaps between streamed chunks
    text: str = ""

    @property
    def tpot(self) -> Optional[float]:
        """Time per output token after the first."""
        if self.output_len < 2:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)


def summarize(name: str, values_s: Sequence[float]) -> Dict[str, Optional[float]]:
    """mean/median/p90/p99 of a latency in milliseconds (None when nothing was measured)."""
    out: Dict[str, Optional[float]] = {}
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    for label, q in PERCENTILES:
        if arr.size == 0:
            out[f"{label}_{name}_ms"] = None
        else:
            out[f"{label}_{name}_ms"] = float(arr.mean() if q is None else np.percentile(arr, q))
    return out


def compute_metrics(outputs: Sequence[RequestOutput], duration: float,
                    max_concurrency_reached: int) -> Dict[str, Any]:
    ok = [o for o in outputs if o.success]
    total_in = sum(o.prompt_len for o in ok)
    total_out = sum(o.output_len for o in ok)
    metrics: Dict[str, Any] = {
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(outputs) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "input_throughput": total_in / duration,
        "output_throughput": total_out / duration,
        "total_throughput": (total_in + total_out) / duration,
        "max_concurrency_reached": max_concurrency_reached,
        "cache_hit_rate": cache_hit_rate(ok),
    }
    metrics.update(summarize("ttft", [o.ttft for o in ok]))
    metrics.update(summarize("itl", [gap for o in ok for gap in o.itl]))
    metrics.update(summarize("tpot", [o.tpot for o in ok if o.tpot is not None]))
    metrics.update(summarize("e2e_latency", [o.latency for o in ok]))
    return metrics


def cache_hit_rate(outputs: Sequence[RequestOutput]) -> Optional[float]:
    """Prompt tokens served from the server's prefix cache over all prompt tokens
    of the requests that reported it; None when none did."""
    reported = [o for o in outputs if o.cached_tokens is not None]
    prompt = sum(o.prompt_len for o in reported)
    if not reported or prompt == 0:
        return None
    return sum(o.cached_tokens for o in reported) / prompt


def throughput_metrics(num_requests: int, input_tokens: int, output_tokens: int,
                       duration: float) -> Dict[str, Any]:
    """The offline tool's numbers: requests and tokens per second."""
    return {
        "duration_s": duration,
        "completed": num_requests,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": num_requests / duration,
        "input_throughput": input_tokens / duration,
        "output_throughput": output_tokens / duration,
        "total_throughput": (input_tokens + output_tokens) / duration,
    }
