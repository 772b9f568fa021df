"""Qwen2 / Qwen2.5: Llama blocks with a bias on the q/k/v projections (not on o_proj).

Qwen2's optional sliding window (`use_sliding_window`, off in released
checkpoints) is not implemented.
"""

from __future__ import annotations

from typing import Any

from radixserve.models.llama import BlockOptions, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def block_options(cls, config: Any) -> BlockOptions:
        return BlockOptions(qkv_bias=True)
