"""Tiny random MoE checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE) and reading a
tensor back from a checkpoint: shared by the model and determinism tests."""

from __future__ import annotations

import shutil

import torch

TINY = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.1,
    tie_word_embeddings=False,
)


def moe_config(family: str, vocab_size: int):
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    if family == "mixtral":
        return MixtralConfig(**TINY, vocab_size=vocab_size, num_local_experts=6, num_experts_per_tok=2)
    if family == "qwen2_moe":
        # A shared expert with its gate; layer 1 dense (off the sparse step of 2... and
        # layer 0 listed as dense) so both MLP kinds and the layer rules are exercised.
        return Qwen2MoeConfig(**TINY, vocab_size=vocab_size, num_experts=8, num_experts_per_tok=3,
                              moe_intermediate_size=48, shared_expert_intermediate_size=80,
                              decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**TINY, vocab_size=vocab_size, head_dim=32, num_experts=8,
                              num_experts_per_tok=2, moe_intermediate_size=40, norm_topk_prob=True,
                              decoder_sparse_step=2)
    raise ValueError(family)


def build_moe_model(family: str, tokenizer_dir, out):
    """A tiny random float32 checkpoint of `family` with the default model's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = moe_config(family, len(AutoTokenizer.from_pretrained(tokenizer_dir)))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out, max_shard_size="2MB")
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def checkpoint_tensor(folder, name: str) -> torch.Tensor:
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    raise KeyError(name)
