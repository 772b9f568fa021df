"""Qwen2-MoE and Qwen3-MoE: Qwen2/Qwen3 attention; the MLP of a layer is a
sparse MoE unless the layer is in `mlp_only_layers` or off the
`decoder_sparse_step` stride. Qwen2-MoE adds a shared expert scaled by a
sigmoid gate; `norm_topk_prob` says whether kept weights are renormalised."""

from __future__ import annotations

from typing import Any

from torch import nn

from radixserve.layers.moe.topk import RoutingConfig
from radixserve.models.llama import BlockOptions, LlamaMLP, dense_mlp
from radixserve.models.qwen2 import Qwen2ForCausalLM
from radixserve.models.qwen3 import Qwen3ForCausalLM
from radixserve.models.sparse_moe import SparseMoeBlock


def is_sparse_layer(config: Any, layer_id: int) -> bool:
    step = getattr(config, "decoder_sparse_step", 1) or 1
    only_dense = getattr(config, "mlp_only_layers", None) or []
    return layer_id not in only_dense and config.num_experts > 0 and (layer_id + 1) % step == 0


def qwen_moe_mlp(config: Any, layer_id: int) -> nn.Module:
    if not is_sparse_layer(config, layer_id):
        return dense_mlp(config, layer_id)
    routing = RoutingConfig(top_k=config.num_experts_per_tok, renormalize=bool(config.norm_topk_prob))
    shared_size = getattr(config, "shared_expert_intermediate_size", 0) or 0
    shared = LlamaMLP(config.hidden_size, shared_size) if shared_size else None
    return SparseMoeBlock(
        config.hidden_size, config.num_experts, config.moe_intermediate_size, routing,
        shared_expert=shared, shared_expert_gate=shared is not None,
    )


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    @classmethod
    def block_options(cls, config: Any) -> BlockOptions:
        return BlockOptions(qkv_bias=bool(getattr(config, "qkv_bias", True)))

    def make_mlp(self, config: Any, layer_id: int) -> nn.Module:
        return qwen_moe_mlp(config, layer_id)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def make_mlp(self, config: Any, layer_id: int) -> nn.Module:
        return qwen_moe_mlp(config, layer_id)
