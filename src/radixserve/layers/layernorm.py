"""RMSNorm, with the residual add fused into the same call (one kernel on
CUDA, and on the CPU in bfloat16: cpu_kernels)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from radixserve.layers import cpu_kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """norm(x), or with residual: (norm(x + residual), x + residual)."""
        if x.is_cuda and x.dim() == 2 and x.stride(-1) == 1:
            from radixserve.layers.fused_kernels import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        if cpu_kernels.takes_bf16_rows(x, residual, self.weight):
            return cpu_kernels.rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
            residual = x
        # HF's order: normalized in float32, rounded to x's dtype, then scaled.
        # F.rms_norm does the float32 part in one call from Python (the CPU
        # decode step is made of small calls, each costing more to launch than to run).
        h = torch.nn.functional.rms_norm(x.float(), x.shape[-1:], eps=self.eps)
        out = self.weight * h.to(x.dtype)
        return out if residual is None else (out, residual)
