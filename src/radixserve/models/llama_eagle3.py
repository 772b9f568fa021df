"""EAGLE-3 draft head for Llama-family targets (SpecForge's checkpoint layout:
`fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`, `t2d`).

One decoder layer whose attention reads [embedding of a token ; hidden
state] (2 x hidden wide). The hidden state of the first draft step is `fc`
over three of the target's layers' outputs concatenated; later steps feed the
layer's own output back. Logits are over a reduced draft vocabulary: draft
id d is target id d + d2t[d]. The token embedding is the target's (shared,
not stored in the head).

`forward` is the serving path (RadixAttention over the draft's KV pool);
`train_forward` is the same math unrolled over several draft steps in plain
torch for training (train_eagle3.py)."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import nn

from radixserve.layers.attention.radix_attention import RadixAttention
from radixserve.layers.embedding import LMHead
from radixserve.layers.layernorm import RMSNorm
from radixserve.layers.linear import Linear, QKVParallelLinear, RowParallelLinear
from radixserve.layers.rotary import RotaryEmbedding, rope_parameters
from radixserve.models.llama import LlamaForCausalLM, LlamaMLP, head_dim_of


def aux_layer_ids(num_target_layers: int) -> List[int]:
    """The target layers whose outputs EAGLE-3 fuses: an early, a middle and a late one."""
    last = num_target_layers - 1
    return sorted([min(1, last), max(num_target_layers // 2 - 1, 0), max(num_target_layers - 4, 0)])


class Eagle3Attention(nn.Module):
    def __init__(self, config: Any, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.head_dim = head_dim_of(config)
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.num_heads, self.num_kv_heads = heads, kv_heads
        self.qkv_proj = QKVParallelLinear(2 * config.hidden_size, self.head_dim, heads, kv_heads)
        self.o_proj = RowParallelLinear(heads * self.head_dim, config.hidden_size)
        self.rotary_emb = rotary_emb
        self.attn = RadixAttention(heads, self.head_dim, self.head_dim**-0.5, kv_heads, 0)

    def qkv(self, positions: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        q, k, v = self.qkv_proj.split_output(self.qkv_proj(x))
        q, k = self.rotary_emb(positions, q, k)
        return q, k, v

    def forward(self, positions: torch.Tensor, x: torch.Tensor, forward_batch: Any) -> torch.Tensor:
        q, k, v = self.qkv_proj.split_output(self.qkv_proj(x))
        return self.o_proj(self.attn.rotate_and_attend(self.rotary_emb, positions, q, k, v, forward_batch))


class Eagle3Layer(nn.Module):
    def __init__(self, config: Any, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = Eagle3Attention(config, rotary_emb)
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def attn_input(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)

    def finish(self, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual adds and the MLP after attention; the layer's output (pre final norm)."""
        hidden = hidden + attn_out
        return hidden + self.mlp(self.post_attention_layernorm(hidden))

    def forward(self, positions, embeds, hidden, forward_batch) -> torch.Tensor:
        return self.finish(hidden, self.self_attn(positions, self.attn_input(embeds, hidden), forward_batch))


class LlamaForCausalLMEagle3(nn.Module):
    STACKED_PARAMS = LlamaForCausalLM.STACKED_PARAMS
    EXPERT_PARAMS: dict = {}
    tied = False

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        target_hidden = getattr(config, "target_hidden_size", None) or hidden
        self.draft_vocab_size = getattr(config, "draft_vocab_size", None) or config.vocab_size
        self.rotary_emb = RotaryEmbedding(head_dim_of(config), config.max_position_embeddings,
                                          rope_parameters(config))
        self.fc = Linear(3 * target_hidden, hidden)
        self.midlayer = Eagle3Layer(config, self.rotary_emb)
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.lm_head = LMHead(self.draft_vocab_size, hidden)
        self.d2t = nn.Parameter(torch.zeros(self.draft_vocab_size, dtype=torch.int64), requires_grad=False)
        self.t2d = nn.Parameter(torch.zeros(config.vocab_size, dtype=torch.bool), requires_grad=False)
        # The target's token embedding, set by whoever runs the head (not a parameter of it).
        self.embed: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    # ---- the interface EagleDrafter reads (shared with LlamaForCausalLMEagle) ----
    def target_feature_layers(self, num_target_layers: int) -> Tuple[int, ...]:
        eagle = getattr(self.config, "eagle_config", None) or {}
        return tuple(eagle.get("eagle_aux_hidden_state_layer_ids") or aux_layer_ids(num_target_layers))

    @property
    def feature_dim(self) -> int:
        return self.fc.in_features

    def attach_target(self, target_model: nn.Module) -> None:
        self.embed = target_model.model.embed_tokens  # the token embedding is the target's

    def draft_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The target's fused features (3 x its hidden size) through fc; a
        previous draft step's output passes unchanged."""
        hidden = hidden.to(self.norm.weight.dtype)  # the activations' dtype (fc.weight may be int8)
        return self.fc(hidden) if hidden.shape[-1] != self.config.hidden_size else hidden

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: Any) -> torch.Tensor:
        """Each token's output hidden state (before the final norm; the next
        draft step's input). forward_batch.spec_hidden: [T, 3H or H]."""
        hidden = self.draft_hidden(forward_batch.spec_hidden)
        embeds = self.embed(input_ids).to(hidden.dtype)
        return self.midlayer(positions, embeds, hidden, forward_batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits over the draft vocabulary."""
        return self.lm_head(self.norm(hidden))

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    # ---- training (plain torch, several draft steps unrolled) ----
    def train_forward(self, features: torch.Tensor, step_inputs: torch.Tensor) -> List[torch.Tensor]:
        """features: [B, T, 3H] target features at positions 0..T-1;
        step_inputs: [S, B, T] the token each draft step reads at each origin
        (step 0: the token after the origin; step s: the target's own
        choice s tokens later). Returns each step's draft-vocabulary logits
        [B, T, V'] (what each step sees: unrolled_step_attention)."""
        hidden, keys, values, logits = self.draft_hidden(features), [], [], []
        for step in range(step_inputs.shape[0]):
            embeds = self.embed(step_inputs[step]).to(hidden.dtype)
            x = self.midlayer.attn_input(embeds, hidden)
            out = unrolled_step_attention(self.midlayer.self_attn, x, step, keys, values)
            hidden = self.midlayer.finish(hidden, out)
            logits.append(self.compute_logits(hidden))
        return logits


def unrolled_step_attention(attn: nn.Module, x: torch.Tensor, step: int, keys: List[torch.Tensor],
                            values: List[torch.Tensor]) -> torch.Tensor:
    """Draft step `step` of training, for every origin p of x [B, T, D] at
    once (attn: a module with qkv(positions, x), o_proj and the head counts).
    Step s at origin p stands at position p + s and sees, as at serving time,
    the first step's keys of positions <= p and its own chain's keys of steps
    1..s at p; keys/values collect each step's (per head). Returns o_proj's output [B, T, H]."""
    batch, length, _ = x.shape
    positions = torch.arange(length, device=x.device) + step
    q, k, v = attn.qkv(positions.repeat(batch), x.reshape(batch * length, -1))
    q, k, v = (t.reshape(batch, length, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))
    group = attn.num_heads // attn.num_kv_heads
    keys.append(k.repeat_interleave(group, 1))
    values.append(v.repeat_interleave(group, 1))
    scale = attn.head_dim**-0.5
    causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
    first = (q @ keys[0].transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))
    chain = [(q * key).sum(-1, keepdim=True) * scale for key in keys[1:]]
    probs = torch.softmax(torch.cat([first] + chain, dim=-1), dim=-1)
    out = probs[..., :length] @ values[0]
    for i, value in enumerate(values[1:]):
        out = out + probs[..., length + i:length + i + 1] * value
    return attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))

