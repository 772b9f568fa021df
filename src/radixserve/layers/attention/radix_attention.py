"""The attention layer models hold: shapes and scale only; the backend does the work."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from radixserve.mem_cache.allocator import KVPool

if TYPE_CHECKING:
    from radixserve.layers.fused_kernels import KVCacheRows
    from radixserve.layers.rotary import RotaryEmbedding
    from radixserve.model_executor.forward_batch import ForwardBatch


class RadixAttention(nn.Module):
    def __init__(
        self, num_heads: int, head_dim: int, scaling: float, num_kv_heads: int, layer_id: int,
        sliding_window: Optional[int] = None, sinks: Optional[torch.Tensor] = None,
    ) -> None:
        """sliding_window: a query at position p sees keys p - sliding_window + 1 .. p
        (transformers' meaning: the window counts the query itself).
        sinks: [num_heads] logits (already scaled) that join each head's softmax
        denominator with no value (GPT-OSS); a Parameter given here is this
        module's, so the model loads it as `...attn.sinks`."""
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scaling = scaling
        self.num_kv_heads = num_kv_heads
        self.layer_id = layer_id
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1, got {sliding_window}")
        self.sliding_window = sliding_window
        self.sinks = sinks

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, forward_batch: "ForwardBatch",
        cached: bool = False,
    ) -> torch.Tensor:
        """q: [T, num_heads*head_dim], k/v: [T, num_kv_heads*head_dim] -> [T, num_heads*head_dim].
        cached: k and v are in this layer's cache rows already (`cache_rows`)."""
        return forward_batch.attn_backend.forward(q, k, v, self, forward_batch, cached)

    def rotate_and_attend(
        self, rotary: "RotaryEmbedding", positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
        v: torch.Tensor, forward_batch: "ForwardBatch", q_norm: Optional[nn.Module] = None,
        k_norm: Optional[nn.Module] = None,
    ) -> torch.Tensor:
        """forward of q and k rotated by `rotary` (each head normed first by
        q_norm/k_norm where given). On CUDA the rotary kernel also writes k and
        v to this layer's cache rows, and the backend stores nothing."""
        rows = self.cache_rows(forward_batch)
        rotated = rows and rotary.rotate_into_cache(positions, q, k, q_norm, k_norm, v, rows)
        q, k = rotated or rotary(positions, q, k, q_norm, k_norm)
        return self.forward(q, k, v, forward_batch, cached=rotated is not None)

    def cache_rows(self, forward_batch: "ForwardBatch") -> Optional["KVCacheRows"]:
        """Where this layer's new keys and values go, for a kernel before
        attention that writes them itself (rotary's on CUDA); None where the
        backend must store them (off CUDA, or a pool other than KVPool's)."""
        pool = getattr(forward_batch, "kv_pool", None)
        if not isinstance(pool, KVPool) or not pool.k_buffers[self.layer_id].is_cuda:
            return None
        from radixserve.layers.fused_kernels import KVCacheRows  # Triton: imported where it runs

        return KVCacheRows(forward_batch.out_cache_loc, pool.k_buffers[self.layer_id], pool.v_buffers[self.layer_id])
