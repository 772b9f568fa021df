"""DeepSeek-V2 and DeepSeek-V3 (also V2-Lite, V2.5, R1): multi-head latent
attention (MLA) and a MoE with shared experts.

Model math only. Attention goes through MLAAttention, which caches one latent
and one rope key per token (see layers/attention/mla.py); the class says so
with `kv_layout`. Where the two families differ (as transformers 5.17 has them):

- routing: V2 scores experts with a softmax and, with topk_method
  "group_limited_greedy", keeps the topk_group groups with the best single
  expert; V3 scores with a sigmoid, chooses with e_score_correction_bias added
  and ranks groups by the sum of their two best biased scores.
- rotary: V2 rotates interleaved pairs (x0, x1), (x2, x3), ... of q_pe/k_pe;
  V3 does too when rope_interleave (its default), else the rotate-half layout.
"""

from __future__ import annotations

import math
from typing import Any, Union

import torch
from torch import nn

from radixserve.layers.attention.mla import MLAAttention
from radixserve.layers.embedding import LMHead, VocabEmbedding
from radixserve.layers.layernorm import DeferredNorm, RMSNorm, normed_value
from radixserve.layers.linear import ColumnParallelLinear, Linear, MergedLinear, RowParallelLinear
from radixserve.layers.moe.layer import FusedMoE
from radixserve.layers.moe.topk import RoutingConfig, float32_router_logits, select_experts
from radixserve.layers.rotary import RotaryEmbedding, rope_parameters
from radixserve.layers.sharding import ShardSlice, even_slice, split_heads
from radixserve.mem_cache.kv_layout import MLAKVLayout
from radixserve.models.llama import DecoderLayer, LlamaForCausalLM, LlamaMLP, MlpFactory, run_decoder


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def mla_softmax_scale(config: Any) -> float:
    """1/sqrt(qk head dim), times mscale(factor, mscale_all_dim)^2 under a scaled
    rope: YaRN's temperature on the whole head, not only on the rotary part."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = rope_parameters(config)
    if params["rope_type"] != "default" and params.get("mscale_all_dim"):
        m = yarn_mscale(float(params["factor"]), float(params["mscale_all_dim"]))
        scale *= m * m
    return scale


class DeepseekMLA(nn.Module):
    folds_input_norm = True  # its input reaches only the q and kv_a projections (DecoderLayer, norm_then)

    def __init__(self, config: Any, layer_id: int, rotary_emb: RotaryEmbedding, rope_interleaved: bool) -> None:
        super().__init__()
        hidden, total_heads = config.hidden_size, config.num_attention_heads
        # q_b/kv_b split by heads over the tensor-parallel ranks, o by rows;
        # the latent projections are replicated, so every rank caches the full latent.
        self.num_heads = heads = split_heads(total_heads, total_heads).num_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.kv_lora_rank, self.v_head_dim = config.kv_lora_rank, config.v_head_dim
        q_out = total_heads * (self.nope_dim + self.rope_dim)
        bias = bool(getattr(config, "attention_bias", False))
        # V2-Lite: q straight from the hidden state (its heads split over the
        # ranks); V2/V3: through the low-rank q_a (replicated) and q_b.
        self.q_is_low_rank = config.q_lora_rank is not None
        q_part, q_rows = ("q_a", ShardSlice(0, 0, config.q_lora_rank, config.q_lora_rank)) if self.q_is_low_rank \
            else ("q", even_slice(q_out))
        kv_a_rows = self.kv_lora_rank + self.rope_dim
        # q (or q_a) and kv_a project the same hidden state: one merged matmul,
        # one GEMV at batch 1. Transformers' full-rank q_proj has no bias: with
        # attention_bias set it stays apart from kv_a, which has one.
        self.merged_q_kv_a = self.q_is_low_rank or not bias
        if self.merged_q_kv_a:
            self.q_kv_a_proj = MergedLinear(hidden, {q_part: q_rows.size, "kv_a": kv_a_rows}, bias,
                                            sources={q_part: q_rows})
        else:
            self.q_proj = ColumnParallelLinear(hidden, q_out)
            self.kv_a_proj_with_mqa = Linear(hidden, kv_a_rows, bias=bias)
        if self.q_is_low_rank:
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = ColumnParallelLinear(config.q_lora_rank, q_out)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank, total_heads * (self.nope_dim + self.v_head_dim))
        self.o_proj = RowParallelLinear(total_heads * self.v_head_dim, hidden, bias=bias)
        self.rotary_emb = rotary_emb  # one table shared by all layers
        self.rope_interleaved = rope_interleaved
        self.attn = MLAAttention(heads, self.nope_dim, self.rope_dim, self.v_head_dim, self.kv_lora_rank,
                                 mla_softmax_scale(config), layer_id)

    def forward(self, positions: torch.Tensor, hidden: Union[torch.Tensor, DeferredNorm],
                forward_batch: Any) -> torch.Tensor:
        tokens = positions.shape[0]
        if self.merged_q_kv_a:
            q, kv_a = self.q_kv_a_proj.split_output(self.q_kv_a_proj(hidden))
        else:
            q, kv_a = self.q_proj(hidden), self.kv_a_proj_with_mqa(hidden)
        if self.q_is_low_rank:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q_nope, q_pe = q.view(tokens, self.num_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        fused = self.attn.fused_latent_kv(positions, q_pe, kv_a, self.kv_a_layernorm, self.rotary_emb,
                                          self.rope_interleaved, forward_batch)
        if fused is not None:  # normed, rotated and cached in one kernel
            q_pe, latent, k_pe = fused
        else:
            latent, k_pe = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
            latent = self.kv_a_layernorm(latent)
            q_pe, k_pe = self._rotate(positions, q_pe, k_pe)
            q_pe = q_pe.view(tokens, self.num_heads, self.rope_dim)
        out = self.attn(q_nope, q_pe, latent, k_pe, self.kv_b_proj.weight, forward_batch, cached=fused is not None)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.v_head_dim))

    def _rotate(self, positions: torch.Tensor, q_pe: torch.Tensor, k_pe: torch.Tensor):
        """Rotated q_pe [T, H*rope] and k_pe [T, rope]."""
        if self.rope_interleaved:
            return self.rotary_emb.forward_interleaved(positions, q_pe, k_pe)
        return self.rotary_emb(positions, q_pe.reshape(q_pe.shape[0], -1), k_pe.contiguous())


class DeepseekRouter(nn.Module):
    """Router logits in float32 (expert choice is sensitive to rounding), and
    V3's correction bias, which only steers the choice of experts."""

    def __init__(self, hidden_size: int, num_experts: int, with_correction_bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32)) if with_correction_bias else None
        self.register_parameter("e_score_correction_bias", bias)

    def forward(self, hidden: Union[torch.Tensor, DeferredNorm]) -> torch.Tensor:
        return float32_router_logits(hidden, self.weight)


class DeepseekMoE(nn.Module):
    """Routed experts plus shared experts that see every token, summed."""

    folds_input_norm = True  # the router's product norms its input (DecoderLayer, norm_then)

    def __init__(self, config: Any, routing: RoutingConfig, with_correction_bias: bool) -> None:
        super().__init__()
        self.routing = routing
        self.gate = DeepseekRouter(config.hidden_size, config.n_routed_experts, with_correction_bias)
        self.experts = FusedMoE(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        shared = getattr(config, "n_shared_experts", None) or 0
        self.shared_experts = (
            LlamaMLP(config.hidden_size, config.moe_intermediate_size * shared) if shared else None
        )

    def forward(self, hidden: Union[torch.Tensor, DeferredNorm]) -> torch.Tensor:
        weights, ids = select_experts(self.gate(hidden), self.routing, self.gate.e_score_correction_bias)
        hidden = normed_value(hidden)
        shared = self.shared_experts
        slots = self.experts.shared_slots(hidden, shared.gate_up_proj, shared.down_proj) if shared is not None else None
        out = self.experts(hidden, weights, ids, shared=slots)
        if shared is not None and slots is None:  # the sum in the shared down projection's kernel where it can
            out = shared(hidden, addend=out)
        return out


def is_moe_layer(config: Any, layer_id: int) -> bool:
    freq = getattr(config, "moe_layer_freq", 1) or 1
    first_dense = getattr(config, "first_k_dense_replace", 0) or 0
    return bool(config.n_routed_experts) and layer_id >= first_dense and layer_id % freq == 0


class DeepseekModel(nn.Module):
    def __init__(self, config: Any, make_mlp: MlpFactory, rope_interleaved: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(
            config.qk_rope_head_dim, config.max_position_embeddings, rope_parameters(config)
        )
        self.layers = nn.ModuleList(
            DecoderLayer(config, DeepseekMLA(config, i, self.rotary_emb, rope_interleaved), make_mlp(config, i))
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: Any) -> torch.Tensor:
        return run_decoder(self, input_ids, positions, forward_batch)


class DeepseekV2ForCausalLM(LlamaForCausalLM):
    """Llama's checkpoint names (merged gate|up, experts by name), and q_proj
    (or q_a_proj) with kv_a_proj_with_mqa merged; the layers are DeepSeek's
    own. V3 checkpoints ship multi-token-prediction layers after
    the last decoder layer (model.layers.61 in V3): the loader skips them."""

    CHECKPOINT_EXTRA_LAYERS = True
    STACKED_PARAMS = {
        **LlamaForCausalLM.STACKED_PARAMS,
        "q_proj": ("q_kv_a_proj", "q"), "q_a_proj": ("q_kv_a_proj", "q_a"), "kv_a_proj_with_mqa": ("q_kv_a_proj", "kv_a"),
    }
    # Absorbed attention reads kv_b_proj's weight itself: --quantization fp8 keeps it.
    UNQUANTIZED_LINEARS = ("kv_b_proj",)

    # MLA's absorption matmuls and attention have no batch-invariant mode yet.
    supports_deterministic_inference = False

    @classmethod
    def kv_layout(cls, config: Any) -> MLAKVLayout:
        return MLAKVLayout(config.num_hidden_layers, config.kv_lora_rank, config.qk_rope_head_dim)

    @classmethod
    def rope_interleaved(cls, config: Any) -> bool:
        return True

    @classmethod
    def routing(cls, config: Any) -> RoutingConfig:
        grouped = getattr(config, "topk_method", "greedy") == "group_limited_greedy"
        # transformers' V2 never renormalises; DeepSeek's own code does when
        # norm_topk_prob, which every released V2 checkpoint leaves False.
        return RoutingConfig(
            top_k=config.num_experts_per_tok, scoring="softmax", renormalize=bool(config.norm_topk_prob),
            num_groups=(config.n_group or 1) if grouped else 1, topk_groups=(config.topk_group or 1) if grouped else 1,
            routed_scaling_factor=float(config.routed_scaling_factor),
        )

    @classmethod
    def has_correction_bias(cls) -> bool:
        return False

    def make_mlp(self, config: Any, layer_id: int) -> nn.Module:
        if is_moe_layer(config, layer_id):
            return DeepseekMoE(config, self.routing(config), self.has_correction_bias())
        return LlamaMLP(config.hidden_size, config.intermediate_size, bias=bool(getattr(config, "mlp_bias", False)))

    def __init__(self, config: Any) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.model = DeepseekModel(config, self.make_mlp, self.rope_interleaved(config))
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = LMHead(config.vocab_size, config.hidden_size)
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    @classmethod
    def rope_interleaved(cls, config: Any) -> bool:
        return bool(getattr(config, "rope_interleave", True))

    @classmethod
    def routing(cls, config: Any) -> RoutingConfig:
        return RoutingConfig(
            top_k=config.num_experts_per_tok, scoring="sigmoid", renormalize=bool(config.norm_topk_prob),
            num_groups=config.n_group or 1, topk_groups=config.topk_group or 1,
            routed_scaling_factor=float(config.routed_scaling_factor),
        )

    @classmethod
    def has_correction_bias(cls) -> bool:
        return True
