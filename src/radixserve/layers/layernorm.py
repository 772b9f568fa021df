"""RMSNorm, with the residual add fused into the same call (one kernel on
CUDA, and on the CPU in bfloat16: cpu_kernels); and DeferredNorm, an RMSNorm
handed to the product after it unapplied, to be folded into its kernel."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class DeferredNorm:
    """norm(x + residual), not computed yet: what a decoder layer hands its
    attention or MLP at one row on CUDA, where a kernel costs more than its
    work. The first product that reads it folds the norm into its GEMV
    (`Linear`, the routers: one kernel fewer); anything else reads `value()`,
    which runs the norm. Either way `normed` and `summed` (x + residual, the
    residual stream's next value) are then set, once."""

    x: torch.Tensor
    residual: torch.Tensor
    norm: RMSNorm
    normed: Optional[torch.Tensor] = None
    summed: Optional[torch.Tensor] = None

    def value(self) -> torch.Tensor:
        if self.normed is None:
            self.normed, self.summed = self.norm(self.x, self.residual)
        return self.normed

    def foldable(self) -> bool:
        """Whether a product may still take the norm into its kernel."""
        return self.normed is None

    def fold_into_gemv(self, weight: torch.Tensor, scale: Optional[torch.Tensor] = None,
                       bias: Optional[torch.Tensor] = None, scale_block: Optional[Tuple[int, int]] = None,
                       out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The norm and one row's product with weight in one kernel (gemv.gemv's arguments)."""
        from radixserve.layers.gemv import gemv_after_norm  # Triton: imported where it runs

        out, self.normed, self.summed = gemv_after_norm(self.x, self.residual, self.norm.weight, self.norm.eps,
                                                         weight, scale, bias, scale_block, out_dtype)
        return out


def normed_value(x: Union[torch.Tensor, DeferredNorm]) -> torch.Tensor:
    """x, or a deferred norm's value."""
    return x.value() if isinstance(x, DeferredNorm) else x
