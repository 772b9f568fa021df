"""Quantized linear weights: one format per flag, each a weight stored in
fewer bytes with one scale per output channel (w ~= q * scale[row]).

- FP8 (--quantization fp8): float8 E4M3 weights, activations quantized per
  token, the product through torch._scaled_mm (cuBLASLt on CUDA), which
  multiplies the FP8 values exactly, accumulates in float32 and applies both
  scales. Half the weight bytes of bfloat16. A decode's few rows on CUDA skip
  the activation quantization (fp8_kernels' weight-only kernel).
- INT8WO (--torchao-config int8wo, SGLang's flag): int8 weights, activations
  left as they are (bfloat16), torch's int8 weight-only kernel
  (aten._weight_int8pack_mm, what torchao's int8wo runs on the CPU). A
  quarter of float32's bytes: a memory-bound CPU decode step reads them all.
- W8A8_INT8 (--quantization w8a8_int8, SGLang's name; CPU): int8 weights per
  output channel and int8 activations per token, multiplied in int8 with
  int32 sums (torch._int_mm). Fast where rows share each weight, but the
  per-token rounding of the activations costs a model without calibrated
  scales much accuracy (docs/benchmarks.md); opt-in only.
- INT4WO-G (--torchao-config int4wo-32|64|128; --quantization gguf is int4wo-32
  for a GGUF file, whose 4-bit blocks are 32 values): 4-bit weights in groups
  of G input values, each group with its own scale and zero point (w ~= (q - 8)
  * scale + zero, torch's int4 CPU kernel aten._weight_int4pack_mm_for_cpu),
  the LM head as int8. An eighth of float32's bytes; a GGUF's Q4_1 block
  (w = d * q + m, its minimum at q = 0 and maximum at q = 15) is recovered from
  its dequantized values exactly, up to the bfloat16 rounding of d and m. CPU only.

Under tensor parallelism each rank quantizes its own shard (a row-parallel
shard's per-channel scales are its own; the all-reduce adds the partial sums).

A block-scaled FP8 checkpoint (DeepSeek-V3's) is not quantized here: its
format (layers/block_fp8.py, `WeightFormat.block`) is the checkpoint's own,
loaded as stored.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence, Tuple

import torch
from torch import nn

from radixserve.layers import cpu_kernels
from radixserve.layers.cpu_quantized_paths import (
    AMX_INT4_DECODE_ROWS, AMX_INT4_FEW_ROWS, AMX_INT8_DECODE_ROWS, KERNEL_COPIES, amx_copy, in_decode_step,
    prefill_gemm, takes_amx, takes_dense_gemm, vnni_copy,
)

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
    [out] -> [..., out] in x's dtype. The activations are quantized per token,
    except for a few rows on CUDA, which multiply the widened weight as they are
    (fp8_kernels: there the step is bound by reading the weight)."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    if rows.is_cuda:
        from radixserve.layers import fp8_kernels, gemv  # Triton: imported where it runs

        if rows.shape[0] == 1:  # a batch-1 decode: a matrix-vector product
            return gemv.gemv(rows.contiguous(), weight, weight_scale, bias).view(*shape[:-1], weight.shape[0])
        if rows.shape[0] <= fp8_kernels.WEIGHT_ONLY_MAX_ROWS:  # a decode: read the weight once
            out = fp8_kernels.fp8_weight_only_matmul(rows.contiguous(), weight, weight_scale, bias)
            return out.view(*shape[:-1], weight.shape[0])
        xq, x_scale = fp8_kernels.quantize_rows_fp8(rows.contiguous())
        out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1), out_dtype=x.dtype)
    else:
        # The CPU has no FP8 arithmetic: the dequantized operands' product in
        # float32. That is what oneDNN's _scaled_mm computes, but torch 2.11's
        # takes only per-tensor scales there (an internal assert).
        xq, x_scale = quantize_per_row(rows)
        out = torch.nn.functional.linear(xq.float() * x_scale, per_row_dequantized(weight, weight_scale)).to(x.dtype)
    if bias is not None:
        out = out + bias
    return out.view(*shape[:-1], weight.shape[0])


def int8_weight_only_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                            bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [..., in] times an int8 weight [out, in] with scales [out] -> [..., out]."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    if takes_amx(rows, weight.shape[0], AMX_INT8_DECODE_ROWS) and weight_scale.dtype == torch.float32:
        out = cpu_kernels.int8_linear_amx(rows, amx_copy(weight, lambda: cpu_kernels.pack_int8_for_amx(weight)),
                                          weight_scale)
    elif takes_dense_gemm(rows):
        out = prefill_gemm(rows, weight, lambda: per_row_dequantized(weight, weight_scale))
    elif in_decode_step() and weight_scale.dtype == torch.float32 and cpu_kernels.avx512_takes(rows, weight.shape[0]):
        out = _int8_decode_rows_avx512(rows, weight, weight_scale)
    else:
        out = torch.ops.aten._weight_int8pack_mm(rows, weight, weight_scale.to(x.dtype))
    if bias is not None:
        out = out + bias
    return out.view(*shape[:-1], weight.shape[0])


def _int8_decode_rows_avx512(rows: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """A decode step's few rows times an int8 weight on a CPU without AMX: int8
    products (int8_linear_vnni, the rows in 16-bit fixed point) where the CPU
    has VNNI, else bfloat16 ones (int8_linear_avx512). The default model's LM
    head at a verify step's 4 rows: 1.7 ms in bfloat16, 0.65 ms in int8
    (2-core Zen 4), where a batch-1 decode step takes about 6 ms."""
    if cpu_kernels.avx512_vnni_available():
        return cpu_kernels.int8_linear_vnni(rows, vnni_copy(weight), weight_scale)
    return cpu_kernels.int8_linear_avx512(rows, amx_copy(weight, lambda: cpu_kernels.pack_int8_for_amx(weight)),
                                          weight_scale)


def w8a8_int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [..., in] times an int8 weight [out, in] with float32 scales [out]
    -> [..., out] in x's dtype: x quantized to int8 per token, the product in
    int8 with int32 sums (torch._int_mm: the CPU's VNNI or AMX dot products),
    both scales applied after."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    xq, x_scale = quantize_per_row(rows, torch.int8)
    out = torch._int_mm(xq, weight.t()).float().mul_(x_scale).mul_(weight_scale.view(1, -1))
    if bias is not None:
        out = out + bias
    return out.to(x.dtype).view(*shape[:-1], weight.shape[0])


def per_row_dequantized(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 values of a weight quantized per row (FP8, int8): q * scale[row]."""
    return q.float() * scale.float()[:, None]


# ---- int4 with a scale and zero point per group of input values (CPU) ----

INT4_OFFSET = 8  # the kernel computes (q - 8) * scale + zero for q in 0..15
INT4_ROW_BLOCK = 64  # the packed layout interleaves rows in blocks of 64


def quantize_int4_groups(w: torch.Tensor, group: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (packed uint8 [out, in / 2] in the CPU kernel's layout,
    bfloat16 scales_and_zeros [in / group, out, 2]). Each group's minimum maps
    to q = 0 and its maximum to q = 15 (asymmetric min/max, as GGUF's Q4_1)."""
    out_f, in_f = w.shape
    groups = w.float().view(out_f, in_f // group, group)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-12).to(torch.bfloat16)
    # The zero point in the kernel's convention: the value of q = 8.
    zero = (low + INT4_OFFSET * scale.float()).to(torch.bfloat16)
    q = ((groups - zero.float()[..., None]) / scale.float()[..., None] + INT4_OFFSET).round().clamp(0, 15)
    q = q.to(torch.int32).view(out_f, in_f)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    if not torch.equal(unpack_int4(packed), q.to(torch.uint8)):  # the layout unpack_int4 assumes is torch's
        raise RuntimeError("this torch build packs int4 weights in an unknown layout")
    return packed, torch.stack([scale.t(), zero.t()], dim=-1).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The q values [out, in] (uint8, 0..15) of a weight packed by
    _convert_weight_to_int4pack_for_cpu: per block of 64 rows and per input
    column, 32 bytes whose low nibbles are rows 0..31 and high nibbles rows 32..63."""
    out_f, half_in = packed.shape
    blocks = packed.view(out_f // INT4_ROW_BLOCK, 2 * half_in, INT4_ROW_BLOCK // 2)
    rows = torch.cat([blocks & 0xF, blocks >> 4], dim=-1)  # [blocks, in, 64]
    return rows.transpose(1, 2).reshape(out_f, 2 * half_in)


def int4_dequantized(packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The float32 values [out, in] the int4 kernel multiplies by."""
    q = unpack_int4(packed)
    out_f, in_f = q.shape
    groups = scales_and_zeros.shape[0]
    scale, zero = scales_and_zeros.float().permute(2, 1, 0)[..., None]  # each [out, groups, 1]
    # (q - 8) * scale + zero in one pass (float32: faster than bfloat16 on the CPU)
    values = torch.addcmul(zero - INT4_OFFSET * scale, q.view(out_f, groups, in_f // groups).float(), scale)
    return values.reshape(out_f, in_f)


def int4_amx_copy(packed: torch.Tensor) -> torch.Tensor:
    """The AMX int4 kernel's layout of torch's packed int4 weight (amx_copy)."""
    return amx_copy(packed, lambda: cpu_kernels.pack_int4_for_amx(unpack_int4(packed)))


def int4_weight_only_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                            bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [..., in] times an int4 weight -> [..., out] in x's dtype (the kernel
    runs in bfloat16, the dtype of the scales)."""
    # A decode step calls this 4 times a layer: no reshape or cast that would
    # do nothing (each torch call costs microseconds on the CPU).
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    group = x.shape[-1] // scales_and_zeros.shape[0]
    if takes_amx(rows, packed.shape[0], AMX_INT4_DECODE_ROWS, AMX_INT4_FEW_ROWS, group):
        out = cpu_kernels.int4_linear_amx(rows, int4_amx_copy(packed), scales_and_zeros)
    elif takes_dense_gemm(rows):  # a prefill (or a large AMX decode batch): one ordinary GEMM, as for int8
        out = prefill_gemm(rows, packed, lambda: int4_dequantized(packed, scales_and_zeros))
    elif cpu_kernels.avx512_takes(rows, packed.shape[0], group):  # no AMX: as its few-rows kernel, in any forward
        out = cpu_kernels.int4_linear_avx512(rows, int4_amx_copy(packed), scales_and_zeros)
    else:
        if rows.dtype != torch.bfloat16:
            rows = rows.to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, group, scales_and_zeros)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    if bias is not None:
        out = out + bias
    return out if x.dim() == 2 else out.view(*x.shape[:-1], packed.shape[0])


@dataclass(frozen=True)
class WeightFormat:
    name: str
    matmul: Callable[..., torch.Tensor]  # (x, q, scale, bias) -> y
    quantize: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]  # w [out, in] -> (q, scale)
    dequantize: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (q, scale) -> float32 w
    lm_head: Optional["WeightFormat"] = None  # the LM head's format, if it is quantized too
    # Each weight dimension (out, in) must be a multiple of these for the kernel.
    alignment: Tuple[int, int] = (1, 1)
    # What --dtype auto means with this format (None: the device's usual dtype);
    # the int8 and int4 CPU kernels are fast in bfloat16.
    activation_dtype: Optional[torch.dtype] = None
    # Block-scaled formats (layers/block_fp8.py): the (rows, cols) of a block
    # sharing one scale; the weights are loaded quantized rather than quantized after.
    block: Optional[Tuple[int, int]] = None


def _per_row(dtype: torch.dtype) -> Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
    def quantize(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        q, scale = quantize_per_row(w, dtype)
        return q, scale.view(-1)
    return quantize


# cuBLASLt's FP8 GEMM needs both matrix dimensions of the weight in multiples of 16.
FP8 = WeightFormat("fp8", fp8_linear, _per_row(FP8_DTYPE), per_row_dequantized, alignment=(16, 16))
# Input sizes in multiples of 16: torch 2.13's int8 CPU kernel (_weight_int8pack_mm)
# returned infinities or garbage for 40, 100, 200 and 232 input values (right for 48, 64, 208).
_INT8 = WeightFormat("int8wo", int8_weight_only_linear, _per_row(torch.int8), per_row_dequantized,
                     alignment=(1, 16), activation_dtype=torch.bfloat16)
# int8: the LM head too, the largest single read of a CPU decode step.
INT8_WEIGHT_ONLY = dataclasses.replace(_INT8, lm_head=_INT8)


# --quantization w8a8_int8 (CPU): int8wo's weights and scales, the LM head too;
# activations keep the model's dtype around the products (float32 by default on the CPU).
_W8A8 = dataclasses.replace(_INT8, name="w8a8_int8", matmul=w8a8_int8_linear, activation_dtype=None)
W8A8_INT8 = dataclasses.replace(_W8A8, lm_head=_W8A8)


def int4_weight_only(group: int) -> WeightFormat:
    """int4 in groups of `group` input values; the LM head as int8 (a 4-bit
    head costs the most accuracy for the least time)."""
    return WeightFormat(f"int4wo-{group}", int4_weight_only_linear,
                        lambda w: quantize_int4_groups(w, group), int4_dequantized,
                        lm_head=_INT8, alignment=(INT4_ROW_BLOCK, group), activation_dtype=torch.bfloat16)


# GGUF block types whose values are 4-bit codes in blocks (or sub-blocks) of 32:
# int4 groups of 32 hold them (Q4_1 and Q4_K's w = d * q + m exactly, up to
# bfloat16 scales; Q4_0's symmetric blocks to within a step).
GGUF_4BIT_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def is_4bit_gguf(block_types: Sequence[str]) -> bool:
    return bool(block_types) and all(t in GGUF_4BIT_TYPES for t in block_types)


def gguf_weight_format(block_types: Sequence[str]) -> WeightFormat:
    """--quantization gguf: a file of 4-bit projections stays 4-bit (int4 in
    groups of 32, its block size); any other file's projections become int8."""
    return int4_weight_only(32) if is_4bit_gguf(block_types) else INT8_WEIGHT_ONLY


def weight_format_of(quantization: Optional[str], torchao_config: Optional[str],
                     gguf_block_types: Sequence[str] = ()) -> Optional[WeightFormat]:
    """The format --quantization / --torchao-config ask for (ServerArgs allows one), or None."""
    if quantization == "fp8":
        return FP8
    if quantization == "gguf":
        return gguf_weight_format(gguf_block_types)
    if quantization == "w8a8_int8":
        return W8A8_INT8
    if torchao_config == "int8wo":
        return INT8_WEIGHT_ONLY
    if torchao_config and torchao_config.startswith("int4wo-"):
        return int4_weight_only(int(torchao_config.split("-")[1]))
    return None


def can_quantize(module: nn.Module, fmt: WeightFormat) -> bool:
    return all(size % align == 0 for size, align in zip(module.weight.shape, fmt.alignment))


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
        if isinstance(module, LMHead) and fmt.lm_head is not None:
            if not can_quantize(module, fmt.lm_head):
                continue
            module.weight_format = fmt.lm_head
            module.qweight, module.qscale = fmt.lm_head.quantize(module.weight.data)
            count += 1
        elif isinstance(module, Linear) and name.rsplit(".", 1)[-1] not in keep and can_quantize(module, fmt):
            module.unquantized_dtype = module.weight.dtype
            q, scale = fmt.quantize(module.weight.data)
            module.weight = nn.Parameter(q, requires_grad=False)
            module.weight_scale, module.weight_format = scale, fmt
            count += 1
    return count


@contextmanager
def unquantized(model: nn.Module) -> Iterator[None]:
    """The quantized linears back in their original dtype for the duration
    (weight updates load into them, reads see real values), quantized again
    after into the same tensors (CUDA graphs captured their addresses); the LM
    head's quantized copy is refreshed from its weight. A row whose values did
    not change comes back to the same quantized values and scale, so a partial
    update (q of q|k|v) leaves the other rows exact. Holds both copies of those
    weights meanwhile. Block-FP8 experts too (block_fp8.unquantized_experts)."""
    from radixserve.layers.block_fp8 import unquantized_experts
    from radixserve.layers.embedding import LMHead
    from radixserve.layers.linear import Linear

    saved = [(m, m.weight, m.weight_scale) for m in model.modules()
             if isinstance(m, Linear) and m.weight_scale is not None]
    heads = [m for m in model.modules() if isinstance(m, LMHead) and m.weight_format is not None]
    for m, weight, scale in saved:
        dense = nn.Parameter(m.weight_format.dequantize(weight, scale).to(m.unquantized_dtype), requires_grad=False)
        if hasattr(weight, "shard_slice"):  # a tensor-parallel shard: updates load this rank's slice
            dense.shard_slice = weight.shard_slice
        m.weight = dense
        m.weight_scale = None
    try:
        with unquantized_experts(model):
            yield
    finally:
        for m, weight, scale in saved:
            q, new_scale = m.weight_format.quantize(m.weight.data)
            weight.data.copy_(q)
            scale.copy_(new_scale)
            m.weight, m.weight_scale = weight, scale
            for copy in KERNEL_COPIES:  # prefill_gemm's and the kernels', of the old values
                weight.__dict__.pop(copy, None)
        for m in heads:
            q, new_scale = m.weight_format.quantize(m.weight.data)
            m.qweight.copy_(q)
            m.qscale.copy_(new_scale)
            for copy in KERNEL_COPIES:
                m.qweight.__dict__.pop(copy, None)
