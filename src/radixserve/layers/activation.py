"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.layers import cpu_kernels


class SiluAndMul(nn.Module):
    """x = [gate, up] on the last axis -> silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dim() == 2 and x.stride(-1) == 1:
            from radixserve.layers.fused_kernels import silu_and_mul

            return silu_and_mul(x)
        if cpu_kernels.takes_bf16_rows(x):
            return cpu_kernels.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
