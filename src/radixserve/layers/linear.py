"""Linear layers. A merged projection (q|k|v, gate|up) is one matmul on the hot
path; `load_shard` copies one checkpoint tensor into its slice."""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from radixserve.layers.batch_invariant import invariant_linear


class Linear(nn.Module):
    # Set by the model runner under --enable-deterministic-inference.
    batch_invariant = False

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features)) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant:
            return invariant_linear(x, self.weight, self.bias)
        return torch.nn.functional.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input stacked on the output axis."""

    def __init__(self, in_features: int, shard_sizes: Dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias)
        self.shard_offsets: Dict[str, Tuple[int, int]] = {}  # name -> (first row, rows)
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size

    def load_shard(self, shard: str, param_name: str, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor (e.g. k_proj.weight) into its rows of the merged parameter."""
        offset, size = self.shard_offsets[shard]
        param = {"weight": self.weight, "bias": self.bias}.get(param_name)
        if param is None:
            raise ValueError(f"merged projection has no {param_name!r} for shard {shard!r}")
        target = param.data[offset:offset + size]
        # Checked in full: copy_ would silently broadcast a wrongly shaped tensor.
        if tensor.shape != target.shape:
            raise ValueError(
                f"shard {shard!r} {param_name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
            )
        target.copy_(tensor.to(param.dtype))

    def split_output(self, out: torch.Tensor) -> List[torch.Tensor]:
        """The merged output cut back into its projections (views, no copy)."""
        return list(out.split([size for _, size in self.shard_offsets.values()], dim=-1))
