"""The KV pool of multi-head latent attention (DeepSeek-V2/V3).

MLA caches no per-head keys or values: per token and layer only the
compressed latent (kv_lora_rank values, shared by every head and used as the
value in the absorbed form) and the rotary key (qk_rope_head_dim values, also
shared). They sit side by side in one row, latent first, so one slot is one
row of kv_lora_rank + qk_rope_head_dim values (576 for DeepSeek-V3). Slots are
the same as KVPool's: the same allocator and request-to-token table serve both.
"""

from __future__ import annotations

from typing import List

import torch

from radixserve.mem_cache.allocator import zeroed_buffer
from radixserve.mem_cache.kv_dtype import to_cache_dtype


class MLAKVPool:
    """Per layer one buffer `[num_slots, 1, kv_lora_rank + rope_dim]`: latent | rope key."""

    def __init__(
        self, num_slots: int, num_layers: int, kv_lora_rank: int, rope_dim: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        shape = (num_slots, 1, kv_lora_rank + rope_dim)
        self.latent_buffers = [zeroed_buffer(shape, dtype, device) for _ in range(num_layers)]

    @property
    def k_buffers(self) -> List[torch.Tensor]:
        """The rows seen as keys of one KV head (MQA): what code written for
        KVPool reads when it asks how many KV heads the pool has."""
        return self.latent_buffers

    @property
    def v_buffers(self) -> List[torch.Tensor]:
        """The values of the absorbed form: the latent part of each row (views)."""
        return [buf[..., : self.kv_lora_rank] for buf in self.latent_buffers]

    def set_mla_kv(self, layer_id: int, loc: torch.Tensor, latent: torch.Tensor, rope: torch.Tensor) -> None:
        """latent: [T, kv_lora_rank] (normed), rope: [T, rope_dim] (rotated), for the slots in loc.
        (On CUDA the kernel that norms and rotates them writes the rows itself:
        fused_kernels.mla_latent_kv.)"""
        buf = self.latent_buffers[layer_id]
        buf[loc] = to_cache_dtype(torch.cat([latent, rope], dim=-1), buf.dtype).unsqueeze(1)

    @staticmethod
    def bytes_per_token(num_layers: int, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype) -> int:
        return num_layers * (kv_lora_rank + rope_dim) * torch.tensor([], dtype=dtype).element_size()
