"""Readable tables on stdout and one JSON line per run in a results file."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

WIDTH = 60

# (label, key) rows of the serving table; latency blocks follow them.
SERVING_ROWS: List[Tuple[str, str]] = [
    ("Backend", "backend"),
    ("Dataset", "dataset_name"),
    ("Traffic request rate", "request_rate"),
    ("Max request concurrency", "max_concurrency"),
    ("Successful requests", "completed"),
    ("Failed requests", "failed"),
    ("Benchmark duration (s)", "duration_s"),
    ("Total input tokens", "total_input_tokens"),
    ("Total generated tokens", "total_output_tokens"),
    ("Request throughput (req/s)", "request_throughput"),
    ("Input token throughput (tok/s)", "input_throughput"),
    ("Output token throughput (tok/s)", "output_throughput"),
    ("Total token throughput (tok/s)", "total_throughput"),
    ("Max concurrency reached", "max_concurrency_reached"),
    ("Prefix cache hit rate", "cache_hit_rate"),
]

# metric key: (section title, short label)
LATENCY_TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "itl": ("Inter-Token Latency", "ITL"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "e2e_latency": ("End-to-End Latency", "E2E latency"),
}
SECTION = object()  # a row value that prints its label as a section rule


def fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.2f}"
    return str(value)


def print_table(title: str, rows: Sequence[Tuple[str, Any]]) -> None:
    print(f" {title} ".center(WIDTH, "="))
    for label, value in rows:
        if value is SECTION:
            print(f" {label} ".center(WIDTH, "-"))
        else:
            print(f"{label + ':':<42}{fmt(value):>{WIDTH - 42}}")
    print("=" * WIDTH)


def serving_rows(record: Dict[str, Any]) -> List[Tuple[str, Any]]:
    rows = [(label, record.get(key)) for label, key in SERVING_ROWS
            if not (key == "cache_hit_rate" and record.get(key) is None)]
    for name, (title, short) in LATENCY_TITLES.items():
        rows.append((title, SECTION))
        for stat in ("mean", "median", "p90", "p99"):
            rows.append((f"{stat.capitalize()} {short} (ms)", record.get(f"{stat}_{name}_ms")))
    return rows


def print_grid(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain column-aligned table (one row per run)."""
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


def json_safe(value: Any) -> Any:
    """JSON has no infinity: an unlimited request rate is written as the string 'inf'."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value


def append_json_line(path: Optional[str], record: Dict[str, Any]) -> None:
    """Append one JSON object per run, so a results file collects a history."""
    if not path:
        return
    line = json.dumps({k: json_safe(v) for k, v in record.items()})
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(line + "\n")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
