"""Qwen3: Llama blocks with per-head RMSNorm on q and k before rotary, no bias."""

from __future__ import annotations

from radixserve.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    attn_kwargs = {"qk_norm": True}
