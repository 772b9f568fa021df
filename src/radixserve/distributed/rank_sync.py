"""What the scheduler ranks agree on, besides the model's own collectives.

Scheduling is replicated: every rank runs the same loop on the same messages
and must reach the same decisions. These helpers keep the few values that
could differ in lockstep, each with rank 0's (or the smallest) value. With one
rank every helper returns its input and runs no torch.distributed code.
"""

from __future__ import annotations

import pickle
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from radixserve.distributed.parallel_state import get_tp_group


def broadcast_from_first(obj: Any) -> Any:
    """Rank 0's picklable object on every rank (over the CPU group)."""
    return get_tp_group().broadcast_object(obj, src=0)


def broadcast_messages(msgs: Optional[List[Any]]) -> List[Any]:
    """Rank 0's list of messages on every rank (others pass None). This runs
    every loop turn, mostly with nothing to say: an empty list costs one
    broadcast of its size (0), not broadcast_object's two plus a pickle."""
    group = get_tp_group()
    if group.world_size == 1:
        return msgs or []
    src, first = group.ranks[0], group.is_first_rank
    payload = pickle.dumps(msgs) if first and msgs else b""
    size = torch.tensor([len(payload)], dtype=torch.int64)
    dist.broadcast(size, src=src, group=group.cpu_group)
    if size.item() == 0:
        return []
    buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if first else torch.empty(
        int(size.item()), dtype=torch.uint8)
    dist.broadcast(buf, src=src, group=group.cpu_group)
    return msgs if first else pickle.loads(buf.numpy().tobytes())


def broadcast_tensor_from_first(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's values, in place, over the device group (no host sync on CUDA)."""
    group = get_tp_group()
    if group.world_size > 1:
        dist.broadcast(tensor, src=group.ranks[0], group=group.device_group)
    return tensor


def min_over_ranks(value: int) -> int:
    """The smallest of every rank's value (over the CPU group)."""
    return get_tp_group().min_over_ranks(value)


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's object, in rank order, on every rank (over the CPU group)."""
    group = get_tp_group()
    if group.world_size == 1:
        return [obj]
    out: List[Any] = [None] * group.world_size
    dist.all_gather_object(out, obj, group=group.cpu_group)
    return out
