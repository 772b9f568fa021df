"""Which part of a full checkpoint tensor each rank holds, and how it is copied in.

Under tensor parallelism a parameter holds a slice of the checkpoint's tensor
along one axis (rows of a column-parallel weight, columns of a row-parallel
one, a vocab slice of the embedding, its heads' sinks). The slice travels with
the parameter as its `shard_slice` attribute, so the loader needs no table of
rules: it narrows whatever full tensor it is given (a torch tensor from a
trainer, or a lazy safetensors slice that reads only those bytes from disk).
At tp=1 every slice is the whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from radixserve.distributed import get_tp_group


@dataclass(frozen=True)
class ShardSlice:
    """This rank's part of a checkpoint tensor: `size` entries from `start` on
    axis `dim` of a tensor `full` long there. `size` may be less than the
    parameter's length (the last vocab slice; the rest is padding)."""

    dim: int
    start: int
    size: int
    full: int

    def take(self, tensor: Any) -> Any:
        """The slice of a full checkpoint tensor (torch or lazy) this rank keeps."""
        if self.start == 0 and self.size == self.full:
            return tensor
        return tensor.narrow(self.dim, self.start, self.size)


def even_slice(full: int, dim: int = 0) -> ShardSlice:
    """This tensor-parallel rank's equal share of `full` entries."""
    tp = get_tp_group()
    if full % tp.world_size:
        raise ValueError(f"{full} entries cannot be split evenly over {tp.world_size} ranks")
    size = full // tp.world_size
    return ShardSlice(dim, tp.rank_in_group * size, size, full)


def block_scale_slice(shard: ShardSlice, block: int, what: str) -> ShardSlice:
    """The slice of a block-scale tensor (one scale per `block` entries along
    shard.dim) that goes with a weight slice: the weight slice must start on a
    block and end on one or at the tensor's end, else no slice of scales
    describes it (ValueError naming `what`)."""
    end = shard.start + shard.size
    if shard.start % block or (shard.size % block and end != shard.full):
        raise ValueError(
            f"{what}: entries [{shard.start}, {end}) of {shard.full} along dim {shard.dim} do not fall on "
            f"{block}-blocks of the FP8 block scales; choose a tp_size whose shards are whole blocks")
    return ShardSlice(shard.dim, shard.start // block, -(-shard.size // block), -(-shard.full // block))


def mark_sharded(param: Optional[nn.Parameter], shard: ShardSlice) -> Optional[nn.Parameter]:
    """Record which slice of the checkpoint tensor `param` holds."""
    if param is not None:
        param.shard_slice = shard
    return param


def materialize(tensor: Any) -> torch.Tensor:
    """A torch tensor from a checkpoint entry (a lazy slice is read in full)."""
    return tensor.materialize() if hasattr(tensor, "materialize") else tensor


def copy_checkpoint_tensor(target: torch.Tensor, tensor: Any, shard: Optional[ShardSlice], name: str) -> None:
    """Copy this rank's slice of a full checkpoint tensor into `target` (a
    parameter's data or a view of it). The full tensor's shape is checked
    first, since copy_ would silently broadcast a wrongly shaped tensor."""
    expected = list(target.shape)
    if shard is not None:
        expected[shard.dim] = shard.full
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(expected)}")
    if shard is not None:
        tensor = shard.take(tensor)
        if shard.size < target.shape[shard.dim]:  # the last vocab slice: padding rows stay zero
            target.zero_()
            target = target.narrow(shard.dim, 0, shard.size)
    target.copy_(materialize(tensor).to(target.dtype))


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one rank computes. KV heads are split like the q
    heads when there are at least as many as ranks; otherwise each rank keeps
    a copy of the one KV head its q heads share."""

    num_heads: int  # this rank's q heads
    num_kv_heads: int  # this rank's KV heads
    first_head: int  # global index of its first q head
    first_kv_head: int
    total_heads: int
    total_kv_heads: int


def split_heads(total_heads: int, total_kv_heads: int, tp_size: Optional[int] = None,
                tp_rank: Optional[int] = None) -> HeadShard:
    """The heads of rank `tp_rank` of `tp_size` (default: this process's rank)."""
    if tp_size is None:
        tp = get_tp_group()
        tp_size, tp_rank = tp.world_size, tp.rank_in_group
    size, rank = tp_size, tp_rank
    if total_heads % size:
        raise ValueError(f"{total_heads} attention heads cannot be split over tp_size {size}")
    heads = total_heads // size
    if total_kv_heads >= size:
        if total_kv_heads % size:
            raise ValueError(f"{total_kv_heads} KV heads cannot be split over tp_size {size}")
        kv_heads = total_kv_heads // size
        first_kv = rank * kv_heads
    else:
        if size % total_kv_heads:
            raise ValueError(f"tp_size {size} is not a multiple of the {total_kv_heads} KV heads")
        # tp/kv consecutive ranks share a KV head; their q heads all belong to it.
        kv_heads, first_kv = 1, rank * total_kv_heads // size
    return HeadShard(heads, kv_heads, rank * heads, first_kv, total_heads, total_kv_heads)


def head_sharded_parameter(heads: HeadShard) -> nn.Parameter:
    """A [num_heads] parameter per head (GPT-OSS's sinks), holding this rank's heads."""
    param = nn.Parameter(torch.empty(heads.num_heads))
    return mark_sharded(param, ShardSlice(0, heads.first_head, heads.num_heads, heads.total_heads))
