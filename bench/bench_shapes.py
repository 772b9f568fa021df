"""The model shapes the GPU benchmarks run (random weights of real shapes), and
what a roofline needs from each: weights per token, weights per step, KV bytes.

Dense: Llama-3.1-8B, Qwen3-0.6B. MoE: Qwen3-30B-A3B (`qwen30b-a3b`, optionally
with fewer layers: `qwen30b-a3b:12`), DeepSeek-V2-Lite (MLA + MoE).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

MODELS = ("llama8b", "qwen0.6b", "qwen30b-a3b", "deepseek-v2-lite")


def save_default_tokenizer(out: Path, tokenizer_dir: Optional[str] = None) -> Path:
    """The embedded model's tokenizer files in `out`: copied from tokenizer_dir
    when given (the GPU machine has no packaged model), else read from the GGUF."""
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy(f, out / f.name)
        return out
    from radixserve.model_loader.source import resolve_model_source
    from radixserve.utils.hf_utils import load_tokenizer

    load_tokenizer(resolve_model_source("SmolLM2-135M-Instruct")).save_pretrained(out)
    return out


def split_name(name: str) -> Tuple[str, int | None]:
    """'qwen30b-a3b:12' -> ('qwen30b-a3b', 12): a shape with fewer layers."""
    base, _, layers = name.partition(":")
    return base, int(layers) if layers else None


def model_config(name: str, smoke: bool):
    from transformers import DeepseekV2Config, LlamaConfig, Qwen3Config, Qwen3MoeConfig

    base, layers = split_name(name)
    if base not in MODELS:
        raise ValueError(f"unknown model {name!r}: {' | '.join(MODELS)}")
    if smoke:  # a few MB: the whole script runs on a CPU
        common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048)
        if base == "llama8b":
            return LlamaConfig(**common)
        if base == "qwen0.6b":
            return Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
        if base == "qwen30b-a3b":
            return Qwen3MoeConfig(**common, head_dim=16, num_experts=8, num_experts_per_tok=2,
                                  moe_intermediate_size=32, norm_topk_prob=True, tie_word_embeddings=False)
        return DeepseekV2Config(**{**common, "num_key_value_heads": 4}, q_lora_rank=None, kv_lora_rank=32,
                                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                                num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                                first_k_dense_replace=1, tie_word_embeddings=False)
    if base == "llama8b":
        config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                             rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                             tie_word_embeddings=False)
    elif base == "qwen0.6b":
        config = Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                             num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=8192,
                             tie_word_embeddings=True,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    elif base == "qwen30b-a3b":
        config = Qwen3MoeConfig(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                                num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                                num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                                vocab_size=151936, max_position_embeddings=8192, tie_word_embeddings=False,
                                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    else:  # DeepSeek-V2-Lite
        config = DeepseekV2Config(
            hidden_size=2048, intermediate_size=10944, num_hidden_layers=27, num_attention_heads=16,
            num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
            qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, num_experts_per_tok=6,
            n_shared_experts=2, moe_intermediate_size=1408, first_k_dense_replace=1, n_group=1, topk_group=1,
            topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0, vocab_size=102400,
            max_position_embeddings=163840, tie_word_embeddings=False,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 0.707,
                             "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                             "beta_fast": 32, "beta_slow": 1})
    if layers is not None:
        config.num_hidden_layers = layers
    return config


@dataclass
class Shape:
    layers: int
    hidden: int
    vocab: int
    tied: bool
    attn_params: int  # per layer: every projection of the attention block
    dense_mlp_params: int  # per dense layer
    expert_params: int  # per routed expert (gate, up, down)
    shared_params: int  # per MoE layer: shared experts (always run)
    num_experts: int
    top_k: int
    moe_layers: int
    kv_values_per_token: int  # cached values per token over all layers
    prefill_qk_v_dims: Tuple[int, int]  # per head, the q.k and value widths prefill attends with
    decode_qk_v_dims: Tuple[int, int]  # ...and decode (MLA's absorbed form is wider)
    heads: int

    @classmethod
    def of(cls, config) -> "Shape":
        h, heads = config.hidden_size, config.num_attention_heads
        layers = config.num_hidden_layers
        mla = getattr(config, "kv_lora_rank", None)
        if mla:
            qk = config.qk_nope_head_dim + config.qk_rope_head_dim
            q = h * heads * qk if not config.q_lora_rank else (
                h * config.q_lora_rank + config.q_lora_rank * heads * qk)
            attn = (q + h * (mla + config.qk_rope_head_dim)
                    + mla * heads * (config.qk_nope_head_dim + config.v_head_dim) + heads * config.v_head_dim * h)
            kv_values = layers * (mla + config.qk_rope_head_dim)
            prefill_dims, decode_dims = (qk, config.v_head_dim), (mla + config.qk_rope_head_dim, mla)
        else:
            d = getattr(config, "head_dim", None) or h // heads
            kv_heads = config.num_key_value_heads
            attn = h * (heads + 2 * kv_heads) * d + heads * d * h
            kv_values = 2 * layers * kv_heads * d
            prefill_dims = decode_dims = (d, d)
        experts = getattr(config, "num_experts", None) or getattr(config, "n_routed_experts", None) or 0
        moe_inter = getattr(config, "moe_intermediate_size", 0) or 0
        if experts and hasattr(config, "first_k_dense_replace"):
            moe_layers = layers - config.first_k_dense_replace
            shared = (config.n_shared_experts or 0) * 3 * h * moe_inter
        elif experts:
            moe_layers, shared = layers, 0
        else:
            moe_layers, shared = 0, 0
        return cls(layers, h, config.vocab_size, bool(config.tie_word_embeddings), attn,
                   3 * h * config.intermediate_size, 3 * h * moe_inter, shared, experts,
                   getattr(config, "num_experts_per_tok", 0) or 0, moe_layers, kv_values,
                   prefill_dims, decode_dims, heads)

    def _body(self, experts_per_layer: int) -> int:
        dense_layers = self.layers - self.moe_layers
        moe = self.moe_layers * (self.shared_params + experts_per_layer * self.expert_params)
        return self.layers * self.attn_params + dense_layers * self.dense_mlp_params + moe

    def active_params(self) -> int:
        """Weights one token multiplies by: attention, its top-k experts, the LM head."""
        return self._body(self.top_k) + self.vocab * self.hidden

    def weight_bytes(self, tokens: int) -> int:
        """bf16 weights a step over `tokens` tokens reads: each expert at most once
        (the expected number of distinct experts hit by tokens x top_k random picks)."""
        hit = self.num_experts * (1 - (1 - self.top_k / self.num_experts) ** tokens) if self.num_experts else 0
        experts = self.moe_layers * hit * self.expert_params
        return round(2 * (self._body(0) + experts + self.vocab * self.hidden))

    def kv_bytes_per_token(self) -> int:
        return 2 * self.kv_values_per_token  # bf16

    def attn_flops_per_key(self, decode: bool) -> int:
        qk, v = self.decode_qk_v_dims if decode else self.prefill_qk_v_dims
        return 2 * self.layers * self.heads * (qk + v)
