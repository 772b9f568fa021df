"""Which rank this process is, and the groups it talks to.

One scheduler process per tensor-parallel rank. Each holds two groups over the
same ranks: a device group (NCCL on CUDA, gloo on the CPU) for the model's
collectives, and a gloo group on the CPU for Python objects (the requests rank
0 broadcasts). A process that never called `init_distributed` is a single rank:
`get_tp_group()` then answers with a group of one whose collectives return
their input, so the tp=1 path runs no torch.distributed code at all.

Expert parallelism shards the experts over `ep_size` ranks inside the tensor-
parallel group (ep_size divides tp_size, as in SGLang): with tp=4, ep=2, ranks
{0,1} hold the first half of the experts and {2,3} the second, and inside each
expert-parallel shard the experts are split tp/ep ways by columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelConfig:
    tp_size: int = 1
    tp_rank: int = 0
    ep_size: int = 1

    def __post_init__(self) -> None:
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} is not a rank of tp_size {self.tp_size}")
        if self.ep_size < 1 or self.tp_size % self.ep_size:
            raise ValueError(f"ep_size ({self.ep_size}) must divide tp_size ({self.tp_size})")

    @property
    def moe_tp_size(self) -> int:
        """How many ways each expert's weights are split inside its expert-parallel shard."""
        return self.tp_size // self.ep_size

    @property
    def ep_rank(self) -> int:
        """Which slice of the experts this rank holds."""
        return self.tp_rank // self.moe_tp_size

    @property
    def moe_tp_rank(self) -> int:
        return self.tp_rank % self.moe_tp_size


class GroupCoordinator:
    """A group of ranks and its collectives. With one rank every collective
    returns its input unchanged (no process group exists then)."""

    def __init__(self, ranks: List[int], rank: int, device_group: Any = None, cpu_group: Any = None) -> None:
        self.ranks = ranks
        self.rank_in_group = ranks.index(rank)
        self.world_size = len(ranks)
        self.device_group = device_group
        self.cpu_group = cpu_group

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the group, in place; returns the tensor."""
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self.device_group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's tensor concatenated along dim, in rank order."""
        if self.world_size == 1:
            return tensor
        tensor = tensor.contiguous()
        if tensor.is_cuda:
            # One flat NCCL all-gather into one buffer: what a captured CUDA graph replays.
            flat = torch.empty((self.world_size,) + tuple(tensor.shape), dtype=tensor.dtype, device=tensor.device)
            dist.all_gather_into_tensor(flat, tensor, group=self.device_group)
            return torch.cat(flat.unbind(0), dim=dim)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor, group=self.device_group)
        return torch.cat(parts, dim=dim)

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's `value` (over the CPU group), so the
        ranks agree on sizes that shape their collectives (pool size, captured
        batch sizes) even when their devices had different free memory."""
        if self.world_size == 1:
            return value
        box = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(box, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(box.item())

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """A picklable object from the group's rank `src` to every rank (over the CPU group)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.ranks[src], group=self.cpu_group)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.cpu_group)


_config = ParallelConfig()
_tp_group: Optional[GroupCoordinator] = None
_ep_group: Optional[GroupCoordinator] = None


def init_distributed(config: ParallelConfig, device: torch.device, init_method: str,
                     timeout_s: Optional[float] = None) -> None:
    """Join the default process group (rank = tp_rank; NCCL on CUDA, gloo on
    the CPU) and build the tensor- and expert-parallel groups. Every rank calls
    it with the same init_method ("tcp://host:port") and sizes."""
    global _config, _tp_group, _ep_group
    _config = config
    if config.tp_size == 1:
        _tp_group = _ep_group = None
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s) if timeout_s else None
    kwargs = {"timeout": timeout} if timeout else {}
    dist.init_process_group(backend, init_method=init_method, rank=config.tp_rank,
                            world_size=config.tp_size, **kwargs)
    ranks = list(range(config.tp_size))
    cpu_group = dist.new_group(ranks, backend="gloo", **kwargs) if backend != "gloo" else dist.group.WORLD
    _tp_group = GroupCoordinator(ranks, config.tp_rank, dist.group.WORLD, cpu_group)
    _ep_group = _expert_parallel_group(config, backend, cpu_group, kwargs)


def _expert_parallel_group(config: ParallelConfig, backend: str, cpu_group: Any, kwargs: dict) -> GroupCoordinator:
    """The ranks that hold the same column slice of different expert shards
    (they sum their partial MoE outputs). Every rank must create every group."""
    mine = None
    for moe_tp_rank in range(config.moe_tp_size):
        ranks = [ep * config.moe_tp_size + moe_tp_rank for ep in range(config.ep_size)]
        group = dist.new_group(ranks, backend=backend, **kwargs) if len(ranks) > 1 else None
        if config.tp_rank in ranks:
            mine = GroupCoordinator(ranks, config.tp_rank, group, None)
    return mine


def get_parallel_config() -> ParallelConfig:
    return _config


def get_tp_group() -> GroupCoordinator:
    return _tp_group or GroupCoordinator([0], 0)


def get_ep_group() -> GroupCoordinator:
    return _ep_group or GroupCoordinator([0], 0)


def destroy_distributed() -> None:
    global _config, _tp_group, _ep_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _config, _tp_group, _ep_group = ParallelConfig(), None, None
