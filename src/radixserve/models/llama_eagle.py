"""EAGLE-1/2 draft head for Llama-family targets (the EAGLE authors' checkpoint
layout, as SGLang's `LlamaForCausalLMEagle` loads it: `fc.weight`, `fc.bias`,
`layers.N.*`; an `embed_tokens` or `lm_head` in the file is not read).

fc maps [embedding of token t+1 ; the target's last hidden state at t (after
its final norm, what its LM head reads)] to the hidden size; then ordinary
decoder layers, the first without its input norm, and no final norm: the
output is both the next draft step's hidden input and, through the target's
own LM head, the draft logits. With a token map (`--speculative-token-map`)
the logits cover only its "hot" tokens: draft id d is target id hot[d]."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import nn

from radixserve.layers.linear import Linear
from radixserve.layers.rotary import RotaryEmbedding, rope_parameters
from radixserve.models.llama import DecoderLayer, LlamaAttention, LlamaForCausalLM, dense_mlp, head_dim_of
from radixserve.models.llama_eagle3 import unrolled_step_attention


class LlamaForCausalLMEagle(nn.Module):
    STACKED_PARAMS = LlamaForCausalLM.STACKED_PARAMS
    EXPERT_PARAMS: dict = {}
    # the target's embedding and LM head are used (SGLang does the same); a copy in the file is skipped
    CHECKPOINT_IGNORED_PREFIXES = ("embed_tokens.", "lm_head.", "model.embed_tokens.")
    CHECKPOINT_RENAMES = (("model.layers.", "layers."), ("model.fc.", "fc."))
    tied = False

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.rotary_emb = RotaryEmbedding(head_dim_of(config), config.max_position_embeddings,
                                          rope_parameters(config))
        self.fc = Linear(2 * hidden, hidden, bias=True)
        opts = LlamaForCausalLM.block_options(config)
        self.layers = nn.ModuleList(
            DecoderLayer(config, LlamaAttention(config, i, self.rotary_emb, opts), dense_mlp(config, i, opts.mlp_bias))
            for i in range(config.num_hidden_layers))
        self.layers[0].input_layernorm = nn.Identity()  # fc's output enters attention unnormalised
        # Set by attach_target or set_target (the target's, not parameters of the head).
        self.embed: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.target_logits: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.hot_ids: Optional[torch.Tensor] = None
        self.draft_vocab_size = config.vocab_size

    # ---- the interface EagleDrafter reads (shared with LlamaForCausalLMEagle3) ----
    def target_feature_layers(self, num_target_layers: int) -> Tuple[int, ...]:
        """Layer num_target_layers stands for the target's output after its final norm."""
        return (num_target_layers,)

    @property
    def feature_dim(self) -> int:
        return self.config.hidden_size

    def attach_target(self, target_model: nn.Module, hot_ids: Optional[torch.Tensor] = None) -> None:
        """Share the target's embedding and LM head; with hot_ids, the head's rows of those tokens only."""
        head = target_model.lm_head
        if hot_ids is None:
            dtype = head.weight.dtype  # the head may run in another dtype than the target
            logits = lambda hidden: head(hidden.to(dtype))  # noqa: E731
        else:
            hot_ids = hot_ids.to(head.weight.device)
            logits = rows_logits(head.weight.data[hot_ids])
        self.set_target(target_model.model.embed_tokens, logits, hot_ids)

    def set_target(self, embed: Callable[[torch.Tensor], torch.Tensor],
                   logits: Callable[[torch.Tensor], torch.Tensor], hot_ids: Optional[torch.Tensor] = None) -> None:
        """embed: token ids -> the target's embeddings; logits: hidden -> float32
        logits over the draft vocabulary (hot_ids' tokens, in that order, if given)."""
        # plain attributes: a module assigned here would become a submodule of the head
        self.__dict__["embed"], self.__dict__["target_logits"] = embed, logits
        if hot_ids is not None:
            self.hot_ids, self.draft_vocab_size = hot_ids, len(hot_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: Any) -> torch.Tensor:
        """Each token's output hidden state. forward_batch.spec_hidden: [T, H],
        the target's features (first step) or a previous step's output."""
        # the activations' dtype (a norm's weight: fc.weight may be int8)
        feature = forward_batch.spec_hidden.to(self.layers[0].post_attention_layernorm.weight.dtype)
        residual = None
        hidden = self._fc(input_ids, feature)
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, forward_batch)
        return hidden + residual

    def _fc(self, input_ids: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.embed(input_ids).to(feature.dtype), feature], dim=-1))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits over the draft vocabulary (all tokens, or the token map's)."""
        return self.target_logits(hidden)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids if self.hot_ids is None else self.hot_ids[draft_ids]

    # ---- training (plain torch, several draft steps unrolled; one-layer heads) ----
    def train_forward(self, features: torch.Tensor, step_inputs: torch.Tensor) -> List[torch.Tensor]:
        """features: [B, T, H] the target's final-normed hidden states at
        positions 0..T-1; step_inputs: [S, B, T] the token each draft step
        reads at each origin. Returns each step's draft-vocabulary logits
        [B, T, V'] (what each step sees: llama_eagle3.unrolled_step_attention)."""
        if len(self.layers) != 1:
            raise ValueError("train_forward trains one-layer EAGLE heads")
        layer = self.layers[0]
        hidden, keys, values, logits = features, [], [], []
        for step in range(step_inputs.shape[0]):
            x = self._fc(step_inputs[step], hidden)  # the first layer has no input norm
            hidden = x + unrolled_step_attention(layer.self_attn, x, step, keys, values)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            logits.append(self.compute_logits(hidden))
        return logits


def rows_logits(rows: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden -> float32 logits over `rows` (an LM head's rows of the draft vocabulary)."""
    return lambda hidden: torch.nn.functional.linear(hidden.to(rows.dtype), rows).float()
