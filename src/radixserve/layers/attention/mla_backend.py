"""The MLA backend interface: what an attention backend adds to serve models
with multi-head latent attention (DeepSeek; see mla.py).

A backend that serves MLA models derives from MLABackend as well as
AttentionBackend; the others carry none of this. The model runner refuses an
MLA model on a backend without it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from radixserve.layers.attention.mla import MLAAttention
    from radixserve.model_executor.forward_batch import ForwardBatch


class MLABackend(ABC):
    def forward_mla(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
        kv_b_weight: torch.Tensor, layer: "MLAAttention", forward_batch: "ForwardBatch", cached: bool = False,
    ) -> torch.Tensor:
        """Writes latent|k_pe into the latent KV pool (unless `cached`: written
        already), attends in the absorbed or the expanded form, returns
        [T, heads, v_head_dim]. A backend with its own fused MLA kernels may
        override this whole method."""
        from radixserve.layers.attention.mla import mla_forward

        return mla_forward(self, q_nope, q_pe, latent, k_pe, kv_b_weight, layer, forward_batch, cached)

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
