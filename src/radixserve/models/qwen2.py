"""Qwen2 / Qwen2.5: Llama blocks with a bias on the q/k/v projections."""

from __future__ import annotations

from radixserve.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    attn_kwargs = {"qkv_bias": True}
