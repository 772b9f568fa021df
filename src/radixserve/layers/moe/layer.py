"""FusedMoE: all experts of one layer as two stacked weights, run in one call.

w13 [E, 2I, H] holds each expert's gate rows then up rows; w2 [E, H, I] its
down projection. On CUDA the Triton kernel runs every expert in one launch
per projection; elsewhere the torch loop does (both: fused_experts below).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from radixserve.layers.moe.activation import ExpertActivation
from radixserve.layers.moe.torch_experts import fused_experts_torch

def fused_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: ExpertActivation,
    w13_bias: Optional[torch.Tensor] = None,
    w2_bias: Optional[torch.Tensor] = None,
    batch_invariant: bool = False,
) -> torch.Tensor:
    """The weighted sum of each token's chosen experts: Triton on CUDA, torch elsewhere.
    batch_invariant: a token's result does not depend on the other tokens."""
    if hidden.is_cuda:
        from radixserve.layers.moe.fused_moe_triton import fused_experts_triton

        return fused_experts_triton(
            hidden, w13, w2, topk_weights, topk_ids, activation, w13_bias, w2_bias, batch_invariant
        )
    return fused_experts_torch(
        hidden, w13, w2, topk_weights, topk_ids, activation, w13_bias, w2_bias, batch_invariant
    )


class FusedMoE(nn.Module):
    batch_invariant = False  # set by the model runner under --enable-deterministic-inference

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        activation: ExpertActivation = ExpertActivation(),
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.activation = activation
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.register_parameter("w13_bias", nn.Parameter(torch.empty(num_experts, 2 * intermediate_size)) if bias else None)
        self.register_parameter("w2_bias", nn.Parameter(torch.empty(num_experts, hidden_size)) if bias else None)

    def forward(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return fused_experts(
            hidden, self.w13, self.w2, topk_weights, topk_ids, self.activation, self.w13_bias, self.w2_bias,
            self.batch_invariant,
        )

    def shard_view(self, expert: int, shard: str, kind: str = "weight") -> torch.Tensor:
        """The slice of w13/w2 (or their biases) that one checkpoint tensor fills:
        shard "gate", "up" or "down"; kind "weight" or "bias"."""
        inter = self.intermediate_size
        if shard == "down":
            param = self.w2 if kind == "weight" else self.w2_bias
            rows = slice(None)
        else:
            param = self.w13 if kind == "weight" else self.w13_bias
            rows = slice(0, inter) if shard == "gate" else slice(inter, 2 * inter)
        if param is None:
            raise ValueError(f"experts have no {kind}")
        return param.data[expert, rows]

    def load_expert(self, expert: int, shard: str, kind: str, tensor: torch.Tensor) -> None:
        """Copy one per-expert checkpoint tensor (e.g. experts.3.up_proj.weight) into place."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range (this layer has {self.num_experts})")
        target = self.shard_view(expert, shard, kind)
        if tensor.shape != target.shape:
            raise ValueError(
                f"expert {expert} {shard} {kind} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
            )
        target.copy_(tensor.to(target.dtype))
