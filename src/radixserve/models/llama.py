"""Llama family (Llama 2/3, SmolLM2, Mistral with its sliding window).

The building blocks take a `BlockOptions` (projection biases, per-head q/k
norm, sliding window, attention sinks) so Qwen2, Qwen3 and GPT-OSS reuse them. Model math only: the KV cache, batching
and sampling live elsewhere; attention goes through RadixAttention.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import nn

from radixserve.layers.activation import SiluAndMul
from radixserve.layers.attention.radix_attention import RadixAttention
from radixserve.layers.embedding import LMHead, VocabEmbedding
from radixserve.layers.layernorm import DeferredNorm, RMSNorm
from radixserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from radixserve.layers.rotary import RotaryEmbedding, rope_parameters
from radixserve.layers.sharding import head_sharded_parameter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockOptions:
    """Where the families differ inside a decoder layer."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each q/k head before rotary
    # Mistral, GPT-OSS: a query sees only this many latest positions (itself included),
    # on the layers layer_sliding_window names.
    sliding_window: Optional[int] = None
    attn_sinks: bool = False  # GPT-OSS: a learned per-head logit in the softmax denominator


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_sliding_window(config: Any, layer_id: int, opts: BlockOptions) -> Optional[int]:
    """The window of layer `layer_id`: on the layers `config.layer_types` calls
    "sliding_attention" (GPT-OSS alternates them with full ones), on every layer
    when the config has no layer_types (Mistral), as transformers does."""
    layer_types = getattr(config, "layer_types", None)
    if opts.sliding_window is None or (layer_types and layer_types[layer_id] != "sliding_attention"):
        return None
    return opts.sliding_window


class LlamaAttention(nn.Module):
    folds_input_norm = True  # its input reaches only qkv_proj (DecoderLayer, norm_then)

    def __init__(self, config: Any, layer_id: int, rotary_emb: RotaryEmbedding, opts: BlockOptions) -> None:
        super().__init__()
        self.head_dim = head_dim_of(config)
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, total_heads, total_kv_heads,
                                          bias=opts.qkv_bias)
        heads = self.qkv_proj.heads  # this tensor-parallel rank's share
        self.num_heads, self.num_kv_heads = heads.num_heads, heads.num_kv_heads
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, config.hidden_size, bias=opts.o_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if opts.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if opts.qk_norm else None
        self.rotary_emb = rotary_emb  # one table shared by all layers
        self.attn = RadixAttention(
            self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_kv_heads, layer_id,
            sliding_window=layer_sliding_window(config, layer_id, opts),
            sinks=head_sharded_parameter(heads) if opts.attn_sinks else None,
        )

    def qkv(self, positions: torch.Tensor, hidden: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """q, k (normed where the family norms them, rotated) and v, with no
        cache: EAGLE's training (llama_eagle3.unrolled_step_attention) reads them."""
        q, k, v = self.qkv_proj.split_output(self.qkv_proj(hidden))
        return (*self.rotary_emb(positions, q, k, self.q_norm, self.k_norm), v)

    def forward(self, positions: torch.Tensor, hidden: Union[torch.Tensor, DeferredNorm],
                forward_batch: Any) -> torch.Tensor:
        q, k, v = self.qkv_proj.split_output(self.qkv_proj(hidden))
        out = self.attn.rotate_and_attend(self.rotary_emb, positions, q, k, v, forward_batch, self.q_norm, self.k_norm)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    """gate|up split by columns over the tensor-parallel ranks, down by rows."""

    folds_input_norm = True  # its input reaches only gate_up_proj (DecoderLayer, norm_then)

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, {"gate": intermediate_size, "up": intermediate_size}, bias=bias
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)
        self.act = SiluAndMul()

    def forward(self, x: Union[torch.Tensor, DeferredNorm], addend: Optional[torch.Tensor] = None) -> torch.Tensor:
        """addend: added to the output (in the down projection's kernel where it can)."""
        return self.down_proj(self.gate_up_proj(x), activation=self.act, addend=addend)


class DecoderLayer(nn.Module):
    """A pre-norm block: RMSNorm, attention, RMSNorm, MLP. The families differ
    only in the attention and MLP modules they hand in (DeepSeek: MLA, experts)."""

    def __init__(self, config: Any, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: Optional[torch.Tensor],
        forward_batch: Any,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, residual stream before it): the add is
        deferred into the next norm so it fuses with it."""
        attend = lambda normed: self.self_attn(positions, normed, forward_batch)  # noqa: E731
        if residual is None:
            residual, hidden = hidden, attend(self.input_layernorm(hidden))
        else:
            hidden, residual = norm_then(self.input_layernorm, hidden, residual, self.self_attn, attend)
        return norm_then(self.post_attention_layernorm, hidden, residual, self.mlp, self.mlp)


def norm_then(norm: RMSNorm, hidden: torch.Tensor, residual: torch.Tensor, module: nn.Module,
              call: Callable[[Any], torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(call(norm(hidden + residual)), hidden + residual). At one row on CUDA a
    module whose first product takes the norm into its kernel
    (`folds_input_norm`) gets it unapplied, as a DeferredNorm: one kernel fewer."""
    if isinstance(norm, RMSNorm) and getattr(module, "folds_input_norm", False) and hidden.is_cuda \
            and hidden.shape[0] == 1:
        pending = DeferredNorm(hidden, residual, norm)
        out = call(pending)
        pending.value()  # (computed already, unless the module never read its input)
        return out, pending.summed
    normed, residual = norm(hidden, residual)
    return call(normed), residual


MlpFactory = Callable[[Any, int], nn.Module]  # (config, layer id) -> the layer's MLP


def dense_mlp(config: Any, layer_id: int, bias: bool = False) -> nn.Module:
    return LlamaMLP(config.hidden_size, config.intermediate_size, bias=bias)


class LlamaModel(nn.Module):
    def __init__(self, config: Any, opts: BlockOptions, make_mlp: Optional[MlpFactory] = None,
                 rotary_cls: type = RotaryEmbedding) -> None:
        """rotary_cls: the rotary table's class (MRotaryEmbedding for Qwen2.5-VL)."""
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = rotary_cls(
            head_dim_of(config), config.max_position_embeddings, rope_parameters(config)
        )
        self.layers = nn.ModuleList(
            DecoderLayer(
                config, LlamaAttention(config, i, self.rotary_emb, opts),
                make_mlp(config, i) if make_mlp else dense_mlp(config, i, opts.mlp_bias),
            )
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: Any) -> torch.Tensor:
        return run_decoder(self, input_ids, positions, forward_batch)


def run_decoder(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: Any,
                input_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Embed (unless input_embeds are given), run `model.layers`, the final
    norm: the body every decoder family shares."""
    hidden = model.embed_tokens(input_ids) if input_embeds is None else input_embeds
    residual = None
    # An EAGLE draft head's inputs: layer i's output, or (i == the layer count)
    # the final-normed output an EAGLE-1/2 head reads.
    capture = getattr(forward_batch, "capture_aux_layers", None)
    aux = {}
    for i, layer in enumerate(model.layers):
        hidden, residual = layer(positions, hidden, residual, forward_batch)
        if capture and i in capture:
            aux[i] = hidden if residual is None else hidden + residual
    if residual is None:  # no layers at all
        hidden = model.norm(hidden)
    else:
        hidden, _ = model.norm(hidden, residual)
    if capture:
        aux[len(model.layers)] = hidden
        forward_batch.aux_hidden = torch.cat([aux[i] for i in capture], dim=-1)
    return hidden


class LlamaForCausalLM(nn.Module):
    """Llama 2/3 and SmolLM2; `attention_bias` and `mlp_bias` as the HF config says."""

    # How the checkpoint's names map onto our parameters, as data: the loader
    # (model_loader/weight_loader.py) applies it.
    # Checkpoint projection -> (merged module, shard).
    STACKED_PARAMS: Dict[str, Tuple[str, str]] = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
    }
    # Per-expert checkpoint projection -> shard of FusedMoE (Mixtral's w1/w3/w2 too).
    EXPERT_PARAMS: Dict[str, str] = {
        "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down",
    }
    # (checkpoint name part, our module path part) where a family names a module differently
    CHECKPOINT_RENAMES: Tuple[Tuple[str, str], ...] = ()
    CHECKPOINT_FUSED_EXPERTS = False  # experts stored as one tensor per projection (GPT-OSS)
    CHECKPOINT_EXTRA_LAYERS = False  # layers past num_hidden_layers to skip (DeepSeek-V3's MTP)
    # Every layer has a batch-invariant mode (see layers/batch_invariant.py).
    supports_deterministic_inference = True

    @classmethod
    def block_options(cls, config: Any) -> BlockOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return BlockOptions(qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(config, "mlp_bias", False)))

    def make_mlp(self, config: Any, layer_id: int) -> nn.Module:
        """The MLP of layer `layer_id`: dense here, experts in MoE families."""
        return dense_mlp(config, layer_id, self.block_options(config).mlp_bias)

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.block_options(config), self.make_mlp)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = LMHead(config.vocab_size, config.hidden_size)
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: Any) -> torch.Tensor:
        """Final-normed hidden states [T, hidden] of every input token."""
        return self.model(input_ids, positions, forward_batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab]."""
        return self.lm_head(hidden)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral (and Mixtral) is Llama's math with a sliding window on every layer
    when the config sets one. The full KV stays in the pool: the window saves
    compute, not memory."""

    @classmethod
    def block_options(cls, config: Any) -> BlockOptions:
        return replace(super().block_options(config), sliding_window=getattr(config, "sliding_window", None))
