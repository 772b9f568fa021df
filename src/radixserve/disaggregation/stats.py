"""Counters of KV transfers, reported with the scheduler's stats (server info, /metrics)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List


@dataclass
class TransferStats:
    transfer_bytes: int = 0
    num_transfers: int = 0
    num_failed: int = 0
    # latencies (seconds) not yet reported to the front end's histogram
    new_latencies: List[float] = field(default_factory=list)

    def on_transfer(self, nbytes: int, seconds: float) -> None:
        self.transfer_bytes += nbytes
        self.num_transfers += 1
        self.new_latencies.append(seconds)

    def on_failure(self) -> None:
        self.num_failed += 1

    def report(self, mode: str, waiting: int, drain: bool) -> Dict[str, Any]:
        """The counters; drain: hand the new latencies over (they are sent once)."""
        latencies = self.new_latencies
        if drain:
            self.new_latencies = []
        return {"mode": mode, "transfer_bytes": self.transfer_bytes, "num_transfers": self.num_transfers,
                "num_failed_transfers": self.num_failed, "num_waiting_for_kv": waiting,
                "new_transfer_latencies": list(latencies) if drain else []}
