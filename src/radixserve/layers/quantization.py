"""Quantized linear weights: one format per flag, each a weight stored in
fewer bytes with one scale per output channel (w ~= q * scale[row]).

- FP8 (--quantization fp8): float8 E4M3 weights, activations quantized per
  token on every call, the product through torch._scaled_mm (cuBLASLt on
  CUDA), which multiplies the FP8 values exactly, accumulates in float32 and
  applies both scales. Half the weight bytes of bfloat16.
- INT8WO (--torchao-config int8wo, SGLang's flag): int8 weights, activations
  left as they are (bfloat16), torch's int8 weight-only kernel
  (aten._weight_int8pack_mm, what torchao's int8wo runs on the CPU). A
  quarter of float32's bytes: a memory-bound CPU decode step reads them all.

Under tensor parallelism each rank quantizes its own shard (a row-parallel
shard's per-channel scales are its own; the all-reduce adds the partial sums).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Tuple

import torch
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
INT8_MAX = 127
# Linears kept in their dtype: MoE routers (a tiny matmul whose errors move
# tokens to other experts); models add the ones whose weight they read directly.
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def quantize_per_row(x: torch.Tensor, dtype: torch.dtype = FP8_DTYPE) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [rows, cols] -> (q [rows, cols] in dtype, float32 scales [rows, 1]) with
    x ~= q * scale; each row's largest magnitude maps to the format's largest
    value (FP8: rounded to the nearest E4M3 value; int8: to the nearest integer)."""
    top = FP8_MAX if dtype == FP8_DTYPE else INT8_MAX
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / top
    q = (x.float() / scale).clamp(-top, top)
    return (q if dtype == FP8_DTYPE else q.round()).to(dtype), scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [..., in] (any float dtype) times an FP8 weight [out, in] with scales
    [out] -> [..., out] in x's dtype; the activations are quantized per token."""
    shape = x.shape
    xq, x_scale = quantize_per_row(x.reshape(-1, shape[-1]))
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1), out_dtype=x.dtype)
    if bias is not None:
        out = out + bias
    return out.view(*shape[:-1], weight.shape[0])


# From this many rows on (a prefill) the int8 kernel, made for a few rows, loses
# to dequantizing the weight and one ordinary GEMM (2.7x at 4,096 rows, 2x at
# 128, on a 2-core AVX-512 CPU; the int8 kernel wins 9x at one row).
INT8_DEQUANTIZE_FROM_ROWS = 128


def int8_weight_only_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                            bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [..., in] times an int8 weight [out, in] with scales [out] -> [..., out]."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    scale = weight_scale.to(x.dtype)
    if rows.shape[0] >= INT8_DEQUANTIZE_FROM_ROWS:
        out = torch.nn.functional.linear(rows, weight.to(x.dtype) * scale[:, None])
    else:
        out = torch.ops.aten._weight_int8pack_mm(rows, weight, scale)
    if bias is not None:
        out = out + bias
    return out.view(*shape[:-1], weight.shape[0])


@dataclass(frozen=True)
class WeightFormat:
    name: str
    dtype: torch.dtype
    matmul: Callable[..., torch.Tensor]  # (x, q, scale [out], bias) -> y
    quantize_lm_head: bool  # the LM head too (int8: the largest single read of a CPU decode step)
    alignment: int = 1  # both weight dimensions must be multiples of this for the kernel


# cuBLASLt's FP8 GEMM needs both matrix dimensions of the weight in multiples of 16.
FP8 = WeightFormat("fp8", FP8_DTYPE, fp8_linear, quantize_lm_head=False, alignment=16)
INT8_WEIGHT_ONLY = WeightFormat("int8wo", torch.int8, int8_weight_only_linear, quantize_lm_head=True)


def weight_format_of(quantization: Optional[str], torchao_config: Optional[str]) -> Optional[WeightFormat]:
    """The format --quantization / --torchao-config ask for (ServerArgs allows one), or None."""
    if quantization == "fp8":
        return FP8
    if torchao_config == "int8wo":
        return INT8_WEIGHT_ONLY
    return None


def can_quantize(module: nn.Module, fmt: WeightFormat) -> bool:
    return all(size % fmt.alignment == 0 for size in module.weight.shape)


def quantize_linears(model: nn.Module, fmt: WeightFormat, skip: Iterable[str] = ()) -> int:
    """Every Linear of the model (and the LM head when the format says so) in
    `fmt`, in place, except routers, the names in `skip` (last name component)
    and weights the format's kernel cannot take. Returns how many were quantized.
    A Linear's unquantized weight is freed as it is replaced; the LM head keeps
    its own (the embedding may share it) next to the quantized copy."""
    from radixserve.layers.embedding import LMHead
    from radixserve.layers.linear import Linear

    keep = set(ROUTER_NAMES) | set(skip)
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, LMHead) and fmt.quantize_lm_head:
            module.weight_format = fmt
            module.qweight, module.qscale = _quantized(module.weight.data, fmt)
            count += 1
        elif isinstance(module, Linear) and name.rsplit(".", 1)[-1] not in keep and can_quantize(module, fmt):
            module.unquantized_dtype = module.weight.dtype
            q, scale = _quantized(module.weight.data, fmt)
            module.weight = nn.Parameter(q, requires_grad=False)
            module.weight_scale, module.weight_format = scale, fmt
            count += 1
    return count


def _quantized(weight: torch.Tensor, fmt: WeightFormat) -> Tuple[torch.Tensor, torch.Tensor]:
    q, scale = quantize_per_row(weight, fmt.dtype)
    return q, scale.view(-1)


@contextmanager
def unquantized(model: nn.Module) -> Iterator[None]:
    """The quantized linears back in their original dtype for the duration
    (weight updates load into them, reads see real values), quantized again
    after into the same tensors (CUDA graphs captured their addresses); the LM
    head's quantized copy is refreshed from its weight. A row whose values did
    not change comes back to the same quantized values and scale, so a partial
    update (q of q|k|v) leaves the other rows exact. Holds both copies of those
    weights meanwhile."""
    from radixserve.layers.embedding import LMHead
    from radixserve.layers.linear import Linear

    saved = [(m, m.weight, m.weight_scale) for m in model.modules()
             if isinstance(m, Linear) and m.weight_scale is not None]
    heads = [m for m in model.modules() if isinstance(m, LMHead) and m.weight_format is not None]
    for m, weight, scale in saved:
        m.weight = nn.Parameter((weight.float() * scale[:, None]).to(m.unquantized_dtype), requires_grad=False)
        m.weight_scale = None
    try:
        yield
    finally:
        for m, weight, scale in saved:
            q, new_scale = _quantized(m.weight.data, m.weight_format)
            weight.data.copy_(q)
            scale.copy_(new_scale)
            m.weight, m.weight_scale = weight, scale
        for m in heads:
            q, new_scale = _quantized(m.weight.data, m.weight_format)
            m.qweight.copy_(q)
            m.qscale.copy_(new_scale)
