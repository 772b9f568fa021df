"""What a model keeps in the KV cache per token, and the pool that holds it.

A model class may say what its cache looks like with a classmethod
`kv_layout(config)`; without one it gets the usual per-head K and V. The
ModelRunner sizes the cache from `bytes_per_token` and builds the pool with
`make_pool`, so memory accounting follows each model's real KV size.
Under tensor parallelism the layout is one rank's: its KV heads (MHA), or the
full latent (MLA: every rank caches the latent its heads expand), so a rank's
`max_total_num_tokens` counts its own pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import torch

from radixserve.layers.sharding import split_heads
from radixserve.mem_cache.allocator import KVPool
from radixserve.mem_cache.mla_pool import MLAKVPool


@dataclass(frozen=True)
class MHAKVLayout:
    """Per layer K and V of num_kv_heads heads of head_dim values (MHA, GQA, MQA)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return KVPool.bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, dtype)

    def make_pool(self, num_slots: int, dtype: torch.dtype, device: torch.device) -> KVPool:
        return KVPool(num_slots, self.num_layers, self.num_kv_heads, self.head_dim, dtype, device)

    def describe(self) -> str:
        return f"{self.num_layers} layers, {self.num_kv_heads} kv heads, head_dim {self.head_dim}"


@dataclass(frozen=True)
class MLAKVLayout:
    """Per layer one compressed latent and one shared rotary key (DeepSeek MLA)."""

    num_layers: int
    kv_lora_rank: int
    rope_head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return MLAKVPool.bytes_per_token(self.num_layers, self.kv_lora_rank, self.rope_head_dim, dtype)

    def make_pool(self, num_slots: int, dtype: torch.dtype, device: torch.device) -> MLAKVPool:
        return MLAKVPool(num_slots, self.num_layers, self.kv_lora_rank, self.rope_head_dim, dtype, device)

    def describe(self) -> str:
        return (f"{self.num_layers} layers, MLA latent {self.kv_lora_rank} + rope {self.rope_head_dim} "
                f"values per token")


KVLayout = Union[MHAKVLayout, MLAKVLayout]


def default_kv_layout(config: Any) -> MHAKVLayout:
    """Per-head K and V of the KV heads this tensor-parallel rank holds (all of
    them at tp=1; one replicated head per rank when there are fewer than ranks)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    local = split_heads(config.num_attention_heads, num_kv_heads)
    return MHAKVLayout(config.num_hidden_layers, local.num_kv_heads, head_dim)


def kv_layout_of(model: Any, config: Any) -> KVLayout:
    """The layout `model`'s class asks for, else per-head K and V from the config."""
    ask = getattr(type(model), "kv_layout", None)
    return ask(config) if ask is not None else default_kv_layout(config)
