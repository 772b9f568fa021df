"""The sparse MoE block of the Mixtral and Qwen-MoE families: a router picks
top-k experts per token, FusedMoE runs them, and an optional shared expert
(Qwen2-MoE: scaled by a sigmoid gate) sees every token."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from radixserve.layers.layernorm import DeferredNorm, normed_value
from radixserve.layers.linear import Linear
from radixserve.layers.moe.layer import FusedMoE
from radixserve.layers.moe.topk import RoutingConfig, select_experts


class SparseMoeBlock(nn.Module):
    folds_input_norm = True  # the router's product norms its input (DecoderLayer, norm_then)

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        intermediate_size: int,
        routing: RoutingConfig,
        shared_expert: Optional[nn.Module] = None,
        shared_expert_gate: bool = False,
    ) -> None:
        super().__init__()
        self.routing = routing
        self.gate = Linear(hidden_size, num_experts)
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size)
        self.shared_expert = shared_expert
        self.shared_expert_gate = Linear(hidden_size, 1) if shared_expert_gate else None

    def forward(self, hidden: Union[torch.Tensor, DeferredNorm]) -> torch.Tensor:
        weights, ids = select_experts(self.gate(hidden), self.routing)
        hidden = normed_value(hidden)
        out = self.experts(hidden, weights, ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(hidden)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(hidden)) * shared
            out = out + shared
        return out
