"""FP8 linear layers (--quantization fp8): weights quantized once at load to
float8 E4M3 with one scale per output channel, activations quantized per
token on every call, and the product through torch._scaled_mm (cuBLASLt on
CUDA), which multiplies the FP8 values exactly, accumulates in float32 and
applies both scales: y[t, o] = x_scale[t] * w_scale[o] * sum_i xq[t, i] * wq[o, i].

Halves the bytes a decode step reads for the weights against bfloat16.
Under tensor parallelism each rank quantizes its own shard (a row-parallel
shard's per-channel scales are its own; the all-reduce adds the partial sums).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, Tuple

import torch
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
# cuBLASLt's FP8 GEMM needs both matrix dimensions of the weight in multiples of 16.
FP8_ALIGNMENT = 16
# Linears kept in their dtype: MoE routers (a tiny matmul whose errors move
# tokens to other experts); models add the ones whose weight they read directly.
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def quantize_per_row(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [rows, cols] -> (float8 [rows, cols], float32 scales [rows, 1]) with
    x ~= fp8 * scale; each row's largest magnitude maps to FP8_MAX."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [..., in] (any float dtype) times an FP8 weight [out, in] with scales
    [out] -> [..., out] in x's dtype; the activations are quantized per token."""
    shape = x.shape
    xq, x_scale = quantize_per_row(x.reshape(-1, shape[-1]))
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1),
                           out_dtype=x.dtype, bias=None)
    if bias is not None:
        out = out + bias
    return out.view(*shape[:-1], weight.shape[0])


def can_quantize(module: nn.Module) -> bool:
    out_features, in_features = module.weight.shape
    return out_features % FP8_ALIGNMENT == 0 and in_features % FP8_ALIGNMENT == 0


def quantize_linears(model: nn.Module, skip: Iterable[str] = ()) -> int:
    """Every Linear of the model to FP8, in place, except routers, the names
    in `skip` (last name component) and weights whose shape the FP8 GEMM
    cannot take. Returns how many were quantized. The unquantized weights'
    memory is freed as each one is replaced."""
    from radixserve.layers.linear import Linear

    keep = set(ROUTER_NAMES) | set(skip)
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or name.rsplit(".", 1)[-1] in keep or not can_quantize(module):
            continue
        quantize_linear(module)
        count += 1
    return count


def quantize_linear(module: nn.Module) -> None:
    module.unquantized_dtype = module.weight.dtype
    q, scale = quantize_per_row(module.weight.data)
    module.weight = nn.Parameter(q, requires_grad=False)
    module.weight_scale = scale.view(-1)


@contextmanager
def unquantized(model: nn.Module) -> Iterator[None]:
    """The FP8 linears back in their original dtype for the duration (weight
    updates load into them, reads see real values), quantized again after into
    the same tensors (CUDA graphs captured their addresses). A row whose values
    did not change comes back to the same FP8 values and scale, so a partial
    update (q of q|k|v) leaves the other rows exact. Holds both copies of
    those weights meanwhile."""
    from radixserve.layers.linear import Linear

    saved = [(m, m.weight, m.weight_scale) for m in model.modules()
             if isinstance(m, Linear) and m.weight_scale is not None]
    for m, weight, scale in saved:
        m.weight = nn.Parameter((weight.float() * scale[:, None]).to(m.unquantized_dtype), requires_grad=False)
        m.weight_scale = None
    try:
        yield
    finally:
        for m, weight, scale in saved:
            q, new_scale = quantize_per_row(m.weight.data)
            weight.data.copy_(q)
            scale.copy_(new_scale.view(-1))
            m.weight, m.weight_scale = weight, scale
