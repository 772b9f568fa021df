"""Mixtral: Llama attention; every layer's MLP is a sparse MoE with softmax
top-k routing whose kept weights are renormalised."""

from __future__ import annotations

from typing import Any

from torch import nn

from radixserve.layers.moe.topk import RoutingConfig
from radixserve.models.llama import MistralForCausalLM
from radixserve.models.sparse_moe import SparseMoeBlock


class MixtralForCausalLM(MistralForCausalLM):
    CHECKPOINT_RENAMES = ((".block_sparse_moe.", ".mlp."),)

    def make_mlp(self, config: Any, layer_id: int) -> nn.Module:
        routing = RoutingConfig(top_k=config.num_experts_per_tok, renormalize=True)
        return SparseMoeBlock(config.hidden_size, config.num_local_experts, config.intermediate_size, routing)
