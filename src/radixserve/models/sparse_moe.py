"""The sparse MoE block of the Mixtral and Qwen-MoE families: a router picks
top-k experts per token, FusedMoE runs them, and an optional shared expert
(Qwen2-MoE: scaled by a sigmoid gate) sees every token."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from radixserve.layers.linear import Linear
from radixserve.layers.moe.layer import EXPERT_SHARDS, FusedMoE
from radixserve.layers.moe.topk import RoutingConfig, select_experts

_EXPERT_WEIGHT = re.compile(r"^(?P<owner>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.(?P<kind>weight|bias)$")


@dataclass(frozen=True)
class ExpertWeightName:
    """A per-expert checkpoint name, e.g. model.layers.3.mlp.experts.7.up_proj.weight."""

    module: str  # the FusedMoE module: model.layers.3.mlp.experts
    expert: int
    shard: str  # gate | up | down
    kind: str  # weight | bias


def parse_expert_weight_name(name: str) -> Optional[ExpertWeightName]:
    match = _EXPERT_WEIGHT.match(name)
    if match is None or match["proj"] not in EXPERT_SHARDS:
        return None
    return ExpertWeightName(match["owner"], int(match["expert"]), EXPERT_SHARDS[match["proj"]][1], match["kind"])


class SparseMoeBlock(nn.Module):
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

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(self.gate(hidden), self.routing)
        out = self.experts(hidden, weights, ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(hidden)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(hidden)) * shared
            out = out + shared
        return out
