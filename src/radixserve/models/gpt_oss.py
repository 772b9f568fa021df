"""GPT-OSS: Llama-shaped blocks with biased q/k/v/o projections, a learned
attention sink per head, sliding-window layers alternating with full ones
(`config.layer_types`), YaRN rope, and a sparse MoE on every layer: a biased
router whose top-k logits are softmaxed, experts with biases and a clamped
SwiGLU.

The checkpoint stores each layer's experts fused (one tensor per projection);
the loader splits them into FusedMoE's per-expert shards
(model_loader/fused_experts.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from radixserve.layers.linear import Linear
from radixserve.layers.moe.activation import ExpertActivation
from radixserve.layers.moe.layer import FusedMoE
from radixserve.layers.moe.topk import RoutingConfig, select_experts
from radixserve.models.llama import BlockOptions, LlamaForCausalLM

# transformers hard-codes both; OpenAI's own config calls the limit swiglu_limit.
SWIGLU_ALPHA = 1.702
DEFAULT_SWIGLU_LIMIT = 7.0


class GptOssMoE(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.routing = RoutingConfig(top_k=config.num_experts_per_tok, softmax_after_topk=True)
        self.router = Linear(config.hidden_size, config.num_local_experts, bias=True)
        limit = getattr(config, "swiglu_limit", None) or DEFAULT_SWIGLU_LIMIT
        self.experts = FusedMoE(
            config.num_local_experts, config.hidden_size, config.intermediate_size,
            ExpertActivation(kind="swiglu_oai", alpha=SWIGLU_ALPHA, limit=limit), bias=True,
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(self.router(hidden), self.routing)
        return self.experts(hidden, weights, ids)


class GptOssForCausalLM(LlamaForCausalLM):
    # The sinks live on the attention layer that uses them.
    CHECKPOINT_RENAMES = ((".self_attn.sinks", ".self_attn.attn.sinks"),)
    CHECKPOINT_FUSED_EXPERTS = True

    @classmethod
    def block_options(cls, config: Any) -> BlockOptions:
        bias = bool(getattr(config, "attention_bias", True))
        return BlockOptions(qkv_bias=bias, o_bias=bias, sliding_window=getattr(config, "sliding_window", None),
                            attn_sinks=True)

    def make_mlp(self, config: Any, layer_id: int) -> nn.Module:
        return GptOssMoE(config)
