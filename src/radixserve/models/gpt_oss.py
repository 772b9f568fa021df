"""GPT-OSS: Llama-shaped blocks with biased q/k/v/o projections, a learned
attention sink per head, sliding-window layers alternating with full ones
(`config.layer_types`), YaRN rope, and a sparse MoE on every layer: a biased
router whose top-k logits are softmaxed, experts with biases and a clamped
SwiGLU.

The checkpoint stores each layer's experts fused: `experts.gate_up_proj`
[E, hidden, 2I] with gate and up interleaved on the last axis (gate at even
columns, up at odd ones), `gate_up_proj_bias` [E, 2I] interleaved alike,
`down_proj` [E, I, hidden] and `down_proj_bias` [E, hidden]; they are split
into FusedMoE's per-expert shards at load. MXFP4 checkpoints reach this file
already dequantized (model_loader/mxfp4.py).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator, Tuple

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

_FUSED_EXPERTS = re.compile(r"^(?P<owner>.+\.experts)\.(?P<proj>gate_up_proj|down_proj)(?P<bias>_bias)?$")


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


def split_fused_experts(weights: Iterable[Tuple[str, torch.Tensor]]) -> Iterator[Tuple[str, torch.Tensor]]:
    """The stream with each fused expert tensor replaced by per-expert ones under
    the names FusedMoE loads (`experts.3.gate_proj.weight` [I, hidden], ...):
    views, so nothing is copied before the model copies into its own layout."""
    for name, tensor in weights:
        match = _FUSED_EXPERTS.match(name)
        if match is None:
            yield name, tensor
            continue
        owner, kind = match["owner"], "bias" if match["bias"] else "weight"
        for e in range(tensor.shape[0]):
            expert = tensor[e]
            if match["proj"] == "down_proj":
                yield f"{owner}.{e}.down_proj.{kind}", expert if kind == "bias" else expert.t()
                continue
            gate, up = expert[..., ::2], expert[..., 1::2]
            if kind == "weight":  # [hidden, I] -> [I, hidden]
                gate, up = gate.t(), up.t()
            yield f"{owner}.{e}.gate_proj.{kind}", gate
            yield f"{owner}.{e}.up_proj.{kind}", up


class GptOssForCausalLM(LlamaForCausalLM):
    # The sinks live on the attention layer that uses them.
    CHECKPOINT_RENAMES = ((".self_attn.sinks", ".self_attn.attn.sinks"),)

    @classmethod
    def block_options(cls, config: Any) -> BlockOptions:
        bias = bool(getattr(config, "attention_bias", True))
        return BlockOptions(qkv_bias=bias, o_bias=bias, sliding_window=getattr(config, "sliding_window", None),
                            attn_sinks=True)

    def make_mlp(self, config: Any, layer_id: int) -> nn.Module:
        return GptOssMoE(config)

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]], *, strict: bool = True) -> None:
        super().load_weights(split_fused_experts(weights), strict=strict)

    def get_weight(self, name: str) -> torch.Tensor:
        """As LlamaForCausalLM's; a fused expert name (`...experts.gate_up_proj`)
        gives a copy rebuilt in the checkpoint's layout."""
        match = _FUSED_EXPERTS.match(name)
        if match is None:
            return super().get_weight(name)
        experts = dict(self.named_modules())[match["owner"]]
        inter = experts.intermediate_size
        if match["proj"] == "down_proj":
            return experts.w2_bias.data.clone() if match["bias"] else experts.w2.data.transpose(1, 2).clone()
        fused = experts.w13_bias.data if match["bias"] else experts.w13.data.transpose(1, 2)  # [..., 2I] gate|up
        out = torch.empty_like(fused)
        out[..., ::2], out[..., 1::2] = fused[..., :inter], fused[..., inter:]
        return out
