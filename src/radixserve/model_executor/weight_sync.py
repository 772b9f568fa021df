"""Weights pushed by a trainer over a torch.distributed process group (RL).

The trainer and the engine's scheduler each call `init_custom_process_group`
with the same address, world size and group name: the trainer as rank 0, the
scheduler as rank `rank_offset`. The group is an extra group, not the default
one, so neither side's own default group (the trainer's data parallel group,
later our tensor parallel group) is disturbed. The trainer then broadcasts
each weight from rank 0 in the order it announced them to
`update_weights_from_distributed`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

# Long enough for a trainer that finishes a step before joining; a group that
# never forms then fails with a timeout instead of hanging the scheduler forever.
DEFAULT_GROUP_TIMEOUT = timedelta(minutes=10)


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_custom_process_group(
    backend: str, init_method: str, world_size: int, rank: int, group_name: str,
    timeout: timedelta = DEFAULT_GROUP_TIMEOUT,
) -> dist.ProcessGroup:
    """A new process group of world_size ranks meeting at init_method
    ("tcp://host:port"), usable with torch.distributed collectives
    (`dist.broadcast(t, src=0, group=group)`) whether or not a default group exists.

    torch has no public call for a group outside the default one, so this
    rendezvous's its own store and builds the group the way init_process_group
    builds the default group, then registers its rank map so collectives
    translate ranks."""
    store, rank, world_size = next(c10d.rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    # The options argument was renamed in torch 2.6; we pass none, but the
    # name still has to be right if a caller's torch is older.
    params = inspect.signature(c10d._new_process_group_helper).parameters
    options_arg = "backend_options" if "backend_options" in params else "pg_options"
    group, _ = c10d._new_process_group_helper(
        world_size, rank, [], backend, store, group_name=group_name, timeout=timeout, **{options_arg: None},
    )
    c10d._world.pg_group_ranks[group] = {r: r for r in range(world_size)}
    return group


def parse_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """torch.float32, "float32" or "torch.float32" -> torch.float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


@dataclass
class WeightsUpdateGroup:
    group: dist.ProcessGroup
    backend: str
    rank: int
    world_size: int


class WeightUpdateGroups:
    """The groups this scheduler has joined, by name."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.groups: Dict[str, WeightsUpdateGroup] = {}

    def init_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                   group_name: str, backend: Optional[str] = None) -> None:
        if group_name in self.groups:
            raise ValueError(f"weights update group {group_name!r} already exists")
        if not 0 < rank_offset < world_size:
            raise ValueError(f"rank_offset must be in [1, world_size), got {rank_offset} with world_size {world_size}")
        backend = backend or default_backend(self.device)
        group = init_custom_process_group(backend, f"tcp://{master_address}:{master_port}", world_size,
                                          rank_offset, group_name)
        self.groups[group_name] = WeightsUpdateGroup(group, backend, rank_offset, world_size)

    def destroy_group(self, group_name: str) -> None:
        entry = self.groups.pop(group_name, None)
        if entry is None:
            raise ValueError(f"no weights update group named {group_name!r}")
        dist.destroy_process_group(entry.group)

    def check_update(self, names: Sequence[str], dtypes: Sequence, shapes: Sequence, group_name: str) -> None:
        """Bad arguments are refused before anything is received (the trainer,
        blocked in its broadcasts, then fails by timeout rather than a torn update)."""
        if group_name not in self.groups:
            raise ValueError(f"no weights update group named {group_name!r}; call init_weights_update_group first")
        if not len(names) == len(dtypes) == len(shapes):
            raise ValueError(f"names, dtypes and shapes differ in length: {len(names)}, {len(dtypes)}, {len(shapes)}")
        for dtype in dtypes:
            parse_dtype(dtype)

    def receive(self, names: Sequence[str], dtypes: Sequence, shapes: Sequence[Sequence[int]],
                group_name: str) -> Iterator[Tuple[str, torch.Tensor]]:
        """(name, tensor) as each broadcast from rank 0 arrives, in the announced order."""
        entry = self.groups[group_name]
        # nccl moves device tensors; gloo here receives into host memory and
        # the weight loader copies to the device.
        device = self.device if entry.backend == "nccl" else torch.device("cpu")
        for name, dtype, shape in zip(names, dtypes, shapes):
            tensor = torch.empty(tuple(shape), dtype=parse_dtype(dtype), device=device)
            dist.broadcast(tensor, src=0, group=entry.group)
            yield name, tensor


def drain(received: Iterator) -> None:
    """Receive whatever the trainer still broadcasts, so it never blocks on us."""
    for _ in received:
        pass
