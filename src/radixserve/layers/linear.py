"""Linear layers. A merged projection (q|k|v, gate|up) is one matmul on the hot
path; `load_shard` copies one checkpoint tensor into its slice."""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input stacked on the output axis."""

    def __init__(self, in_features: int, shard_sizes: Dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias)
        self.shard_offsets: Dict[str, tuple] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size

    def load_shard(self, shard: str, param_name: str, tensor: torch.Tensor) -> None:
        offset, size = self.shard_offsets[shard]
        param = self.weight if param_name == "weight" else self.bias
        if tensor.shape[0] != size:
            raise ValueError(f"shard {shard!r} has {tensor.shape[0]} rows, expected {size}")
        param.data[offset:offset + size].copy_(tensor.to(param.dtype))

    def split_output(self, out: torch.Tensor) -> List[torch.Tensor]:
        return list(out.split([size for _, size in self.shard_offsets.values()], dim=-1))
