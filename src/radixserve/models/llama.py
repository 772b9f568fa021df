"""Llama family (Llama 2/3, SmolLM2, Mistral without sliding window).

The building blocks are parameterised (qkv bias, per-head q/k norm) so Qwen2
and Qwen3 reuse them. Model math only: caching and batching live elsewhere.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Tuple

import torch
from torch import nn

from radixserve.layers.activation import SiluAndMul
from radixserve.layers.attention.radix_attention import RadixAttention
from radixserve.layers.embedding import LMHead, VocabEmbedding
from radixserve.layers.layernorm import RMSNorm
from radixserve.layers.linear import Linear, MergedLinear
from radixserve.layers.rotary import RotaryEmbedding, rope_parameters


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, layer_id: int, qkv_bias: bool = False, qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(config.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, qkv_bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary_emb = RotaryEmbedding(
            self.head_dim, config.max_position_embeddings, rope_parameters(config)
        )
        self.attn = RadixAttention(
            self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_kv_heads, layer_id
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, forward_batch) -> torch.Tensor:
        q, k, v = self.qkv_proj.split_output(self.qkv_proj(hidden))
        if self.q_norm is not None:
            # Qwen3: RMSNorm over each head's vector before rotary.
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, forward_batch))


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, {"gate": intermediate_size, "up": intermediate_size})
        self.down_proj = Linear(intermediate_size, hidden_size)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int, **attn_kwargs: bool) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_id, **attn_kwargs)
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: Optional[torch.Tensor], forward_batch
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, forward_batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, **attn_kwargs: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, **attn_kwargs) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, forward_batch)
        hidden, _ = self.norm(hidden, residual)
        return hidden


# Checkpoint name piece -> (merged parameter piece, shard)
STACKED_PARAMS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}


class LlamaForCausalLM(nn.Module):
    attn_kwargs: dict = {}

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, **self.attn_kwargs)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = LMHead(config.vocab_size, config.hidden_size)
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch) -> torch.Tensor:
        return self.model(input_ids, positions, forward_batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters(remove_duplicate=False))
        modules = dict(self.named_modules())
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.tied:
                continue  # the embedding is the head
            stacked = self._stacked_target(name)
            if stacked is not None:
                module_name, shard, kind = stacked
                modules[module_name].load_shard(shard, kind, tensor)
                continue
            if name not in params:
                raise ValueError(f"unexpected weight {name!r} for {type(self).__name__}")
            param = params[name]
            if param.shape != tensor.shape:
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
            param.data.copy_(tensor.to(param.dtype))

    @staticmethod
    def _stacked_target(name: str) -> Optional[Tuple[str, str, str]]:
        parts = name.split(".")
        if len(parts) < 2 or parts[-2] not in STACKED_PARAMS:
            return None
        merged, shard = STACKED_PARAMS[parts[-2]]
        return ".".join(parts[:-2] + [merged]), shard, parts[-1]


class MistralForCausalLM(LlamaForCausalLM):
    pass
