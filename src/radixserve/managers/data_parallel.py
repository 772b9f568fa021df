"""Data parallelism inside one server (--dp-size N): the TokenizerManager's side.

N scheduler replicas, each with its own model copy and KV cache, sit behind
one TokenizerManager. Each generate request goes to one replica, chosen here
(SGLang's --load-balance-method values) unless the caller names one with
routed_dp_rank; control requests go to every replica, and their N replies
are folded into one answer.

The loads used by total_requests and total_tokens are the TokenizerManager's
own exact counts of what it sent and has not yet seen finish (prompt tokens
plus tokens generated so far), so two requests sent in the same instant
already see each other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from radixserve.managers import io_struct as io


@dataclass
class ReplicaLoad:
    requests: int = 0  # sent and not finished
    tokens: int = 0  # their prompt tokens plus the tokens generated so far


class ReplicaDispatcher:
    """Picks the replica of each request and counts each replica's load until
    the request finishes."""

    def __init__(self, dp_size: int, method: str = "round_robin") -> None:
        if method not in ("auto", "round_robin", "total_requests", "total_tokens"):
            raise ValueError(f"unknown load_balance_method {method!r}")
        self.method = "round_robin" if method == "auto" else method
        self.loads = [ReplicaLoad() for _ in range(dp_size)]
        self._next = 0  # round robin's next replica
        self._owner: Dict[str, Tuple[int, int]] = {}  # rid -> (replica, tokens it counts)

    @property
    def dp_size(self) -> int:
        return len(self.loads)

    def assign(self, rid: str, num_prompt_tokens: int, routed_dp_rank: Optional[int] = None) -> int:
        """The replica that serves this request, counted as its load from now on.
        A routed request does not advance round robin (as in SGLang)."""
        if routed_dp_rank is not None:
            if not 0 <= routed_dp_rank < self.dp_size:
                raise ValueError(f"routed_dp_rank must be in [0, {self.dp_size}), got {routed_dp_rank}")
            replica = routed_dp_rank
        else:
            replica = self._pick()
        load = self.loads[replica]
        load.requests += 1
        load.tokens += num_prompt_tokens
        self._owner[rid] = (replica, num_prompt_tokens)
        return replica

    def _pick(self) -> int:
        if self.method == "round_robin":
            replica, self._next = self._next, (self._next + 1) % self.dp_size
            return replica
        if self.method == "total_requests":
            return min(range(self.dp_size), key=lambda i: (self.loads[i].requests, i))
        # total_tokens, with the request count breaking ties (as SGLang does)
        return min(range(self.dp_size), key=lambda i: (self.loads[i].tokens, self.loads[i].requests, i))

    def replica_of(self, rid: str) -> Optional[int]:
        owner = self._owner.get(rid)
        return None if owner is None else owner[0]

    def on_generated(self, rid: str, num_new_tokens: int) -> None:
        owner = self._owner.get(rid)
        if owner is not None and num_new_tokens:
            replica, counted = owner
            self.loads[replica].tokens += num_new_tokens
            self._owner[rid] = (replica, counted + num_new_tokens)

    def on_finished(self, rid: str) -> None:
        owner = self._owner.pop(rid, None)
        if owner is not None:
            replica, counted = owner
            self.loads[replica].requests -= 1
            self.loads[replica].tokens -= counted

    def clear(self) -> None:
        """Every replica is gone (a child died): nothing is in flight any more."""
        self._owner.clear()
        self.loads = [ReplicaLoad() for _ in range(self.dp_size)]


# ---- folding the replicas' replies to one control request ----
# Scheduler counters that add up over replicas in the server's own view.
SUMMED_COUNTERS = ("num_running_reqs", "num_waiting_reqs", "num_retractions", "num_overlapped_batches",
                   "num_failed_batches", "num_prefill_tokens", "num_evictions", "pending_weight_updates")


def merge_server_info(infos: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The server's state: replica 0's settings, the counters and the KV cache
    summed over the replicas, and each replica's own state under
    internal_states (SGLang's name), in dp-rank order."""
    merged = dict(infos[0])
    for name in SUMMED_COUNTERS:
        if name in merged:
            merged[name] = sum(info[name] for info in infos)
    if "kv_cache" in merged:
        merged["kv_cache"] = _sum_numbers([info["kv_cache"] for info in infos])
    merged["paused"] = any(info.get("paused", False) for info in infos)
    merged["internal_states"] = list(infos)
    return merged


def _sum_numbers(dicts: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The numbers of dicts with the same keys, added up key by key."""
    out = dict(dicts[0])
    for key, value in out.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = sum(d[key] for d in dicts)
    return out


def merge_replies(replies: List[io.ControlOut]) -> io.ControlOut:
    """One answer from every replica's reply (in dp-rank order): the first
    refusal or failure if any (its message names the replica), else replica
    0's reply, with the byte counts of a memory release summed."""
    first = replies[0]
    if isinstance(first, io.GetServerInfoOut):
        return dataclasses.replace(first, info=merge_server_info([r.info for r in replies]))
    if len(replies) == 1:
        return first
    for dp_rank, reply in enumerate(replies):
        failed = getattr(reply, "success", True) is False or bool(getattr(reply, "error", ""))
        if failed:
            if hasattr(reply, "message"):
                return dataclasses.replace(reply, message=f"dp rank {dp_rank}: {reply.message}")
            return dataclasses.replace(reply, error=f"dp rank {dp_rank}: {reply.error}")
    if isinstance(first, io.MemoryOccupationOut):
        return dataclasses.replace(first, num_bytes=sum(r.num_bytes for r in replies))
    return first
