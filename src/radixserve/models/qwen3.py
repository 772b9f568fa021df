"""Qwen3: Llama blocks with a per-head RMSNorm on q and k before rotary, an
explicit head_dim (not hidden/heads), and biases only if `attention_bias`."""

from __future__ import annotations

from typing import Any

from radixserve.models.llama import BlockOptions, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def block_options(cls, config: Any) -> BlockOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return BlockOptions(qkv_bias=bias, o_bias=bias, qk_norm=True)
