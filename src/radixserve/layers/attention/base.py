"""The attention-backend interface. Models never know which backend runs.

Backends that also serve multi-head latent attention implement MLABackend
(mla_backend.py) besides this."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from radixserve.layers.attention.radix_attention import RadixAttention
    from radixserve.model_executor.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    @abstractmethod
    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        """Once per batch (and per CUDA-graph replay): precompute index tensors."""

    @abstractmethod
    def forward_extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        layer: "RadixAttention", forward_batch: "ForwardBatch", cached: bool = False,
    ) -> torch.Tensor:
        """New tokens attend causally to themselves and to their cached prefix."""

    @abstractmethod
    def forward_decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        layer: "RadixAttention", forward_batch: "ForwardBatch", cached: bool = False,
    ) -> torch.Tensor:
        """One query token per request attends to all of that request's KV."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        layer: "RadixAttention", forward_batch: "ForwardBatch", cached: bool = False,
    ) -> torch.Tensor:
        """q: [T, heads*head_dim]; k, v: [T, kv_heads*head_dim]. Writes k, v
        into the KV pool at out_cache_loc (unless `cached`: written there
        already), returns [T, heads*head_dim].
        Both paths honour layer.sliding_window (a query sees only its latest
        positions) and layer.sinks (extra per-head softmax logits)."""
        if forward_batch.forward_mode.is_decode():
            return self.forward_decode(q, k, v, layer, forward_batch, cached)
        if forward_batch.forward_mode.is_mixed():
            return self.forward_mixed(q, k, v, layer, forward_batch, cached)
        return self.forward_extend(q, k, v, layer, forward_batch, cached)

    def forward_mixed(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        layer: "RadixAttention", forward_batch: "ForwardBatch", cached: bool = False,
    ) -> torch.Tensor:
        """A mixed batch: forward_batch.num_decode_rows one-token decode rows,
        then an extend batch. A decode step is an extend of one token, so the
        extend path is exact for all of it; a backend whose extend kernel wastes
        work on one-token rows attends to them with its decode kernel instead."""
        return self.forward_extend(q, k, v, layer, forward_batch, cached)
