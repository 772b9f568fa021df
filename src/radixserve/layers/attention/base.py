"""The attention-backend interface. Models never know which backend runs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from radixserve.layers.attention.mla import MLAAttention
    from radixserve.layers.attention.radix_attention import RadixAttention
    from radixserve.model_executor.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    @abstractmethod
    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        """Once per batch (and per CUDA-graph replay): precompute index tensors."""

    @abstractmethod
    def forward_extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        layer: "RadixAttention", forward_batch: "ForwardBatch",
    ) -> torch.Tensor:
        """New tokens attend causally to themselves and to their cached prefix."""

    @abstractmethod
    def forward_decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        layer: "RadixAttention", forward_batch: "ForwardBatch",
    ) -> torch.Tensor:
        """One query token per request attends to all of that request's KV."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        layer: "RadixAttention", forward_batch: "ForwardBatch",
    ) -> torch.Tensor:
        """q: [T, heads*head_dim]; k, v: [T, kv_heads*head_dim]. Writes k, v
        into the KV pool at out_cache_loc, returns [T, heads*head_dim].
        Both paths honour layer.sliding_window (a query sees only its latest
        positions) and layer.sinks (extra per-head softmax logits)."""
        if forward_batch.forward_mode.is_decode():
            return self.forward_decode(q, k, v, layer, forward_batch)
        return self.forward_extend(q, k, v, layer, forward_batch)

    # ---- multi-head latent attention (DeepSeek MLA; see mla.py) ----
    def forward_mla(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
        kv_b_weight: torch.Tensor, layer: "MLAAttention", forward_batch: "ForwardBatch",
    ) -> torch.Tensor:
        """Writes latent|k_pe into the latent KV pool, attends in the absorbed or
        the expanded form, returns [T, heads, v_head_dim]. A backend with its own
        fused MLA kernels may override this whole method."""
        from radixserve.layers.attention.mla import mla_forward

        return mla_forward(self, q_nope, q_pe, latent, k_pe, kv_b_weight, layer, forward_batch)

    @abstractmethod
    def mla_attend_latent(
        self, q_latent: torch.Tensor, q_pe: torch.Tensor, layer: "MLAAttention", forward_batch: "ForwardBatch",
    ) -> torch.Tensor:
        """Absorbed MLA: q [T, H, kv_lora_rank] | [T, H, rope] attends as MQA over the
        cached [latent | k_pe] of its request (causally in extend); values are the
        latents. Returns [T, H, kv_lora_rank]."""

    @abstractmethod
    def mla_attend_expanded(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
        v: torch.Tensor, kv_start_loc: torch.Tensor, layer: "MLAAttention", forward_batch: "ForwardBatch",
    ) -> torch.Tensor:
        """Expanded MLA (extend only): causal MHA of the new tokens over their
        request's decompressed keys, packed per request from kv_start_loc;
        k_pe [S, rope] is shared by the heads. Returns [T, H, v_head_dim]."""
