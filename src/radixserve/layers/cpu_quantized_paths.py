"""Which path a quantized linear's rows take on the CPU, and the dense copy
some of them multiply: torch's int8/int4 kernels, our C++ kernels (AMX, or
AVX-512 BF16 without it) or one ordinary GEMM over a dequantized copy of the
weight. The choice depends on the row count and on whether the forward is a
decode step (decode_step(), set by ModelRunner); the fused CPU decode layers
ask the same questions (int4_rows_on_kernel, int8_rows_on_kernel), so both
paths give a row the same arithmetic. The linears themselves are in
quantization.py.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from radixserve.layers import cpu_kernels
from radixserve.layers.cpu_gemm_rows import pad_rows, takes_bucketed_rows
from radixserve.utils.cpu_features import cpu_has_native_bf16

# From this many rows on (a prefill) the int8 and int4 kernels, made for a few
# rows, lose to one ordinary GEMM over a dequantized copy of the weight (int8:
# 2.7x at 4,096 rows, 2x at 128; int4 2.1x at 128, 576 -> 1,536, 2-core AVX-512
# CPU; the int8 kernel wins 9x at one row).
INT8_DEQUANTIZE_FROM_ROWS = 128
# With bfloat16 units (AMX, or AVX-512 BF16) a decode step of this many
# bfloat16 rows or more takes the dense copy too: the kernels' time grows with
# the rows, the dense GEMM's hardly (2-core AMX Xeon, 32 rows: int4 686 us
# against 162 us for 3,072 x 576; the int8 LM head 13.8 ms against 3.1 ms). In
# the whole default model, which then reads 4x the weight bytes, the dense copy
# lost at 8 requests on AMX (-13 to -18% decode tok/s) and won from 16 (+9% at
# 16, +19% at 24, +52% at 32; docs/benchmarks.md). (There the AMX kernels take
# int4 rows up to 64 and int8 up to 32 first, so this count decides only on
# CPUs without AMX.) On a Zen 4 EPYC (AVX-512 BF16) the kernels, since they
# keep 3-4 rows' sums in registers, won at 16 rows (28.9-31.2 against
# 32.8-45.3 ms a step) and tied at 20-32; the dense copy won by 1.5-2x at 64.
# Decode steps only: a short prompt's prefill keeps the kernels, so its KV and
# first token are what they were (with every 8- to 127-row extend on the dense
# copy, the default model's answer to "What is the capital of France?" changed
# after other requests had filled the radix cache, 2026-12-04).
DECODE_DENSE_FROM_ROWS = 20
# int4 weights in a decode step of this many rows go through the AMX kernel
# (cpu_kernels.int4_linear_amx), which reads the int4 weight itself and runs
# the dense copy's arithmetic on the tile unit: 2x faster than the dense copy
# at 32 rows and 2x faster than torch's int4 kernel at 8 (3,072 x 576, weights
# not in cache, 2-core AMX Xeon: 108 against 218 and 747 us at 32 rows; 100
# against 174 and 200 at 8). Past 32 rows each weight block is dequantized once
# per 32 rows. Up to 8 rows the kernel multiplies by the weight's integers and
# scales each group's sums (cpu_kernels_amx.cpp's amx_int4_few_rows: 44 us at
# one row and 54 at eight against torch's 51 and 182), in any forward, not
# only a decode step: a speculative verify's few rows and a short extend then
# take the kernel a batch-1 decode takes, and get the rows it would.
AMX_INT4_DECODE_ROWS = range(8, 65)
AMX_INT4_FEW_ROWS = range(1, 9)
# int8 (the LM head's format): the kernel ties torch's at one row and wins from
# two (the default model's LM head, 49,152 x 576: 924 against 1,584 us at 4
# rows, 968 against 3,243 at 8); the dense copy wins past 32 (1,377 against
# 1,729 us at 32, 2,777 against 2,086 at 64). From one row, so that a batch-1
# decode step and a speculative verify (a decode step too: ForwardBatch.as_decode_step)
# give each row the same logits, the verify's 4 rows at the kernel's price.
AMX_INT8_DECODE_ROWS = range(1, 33)
# Only in decode steps: with the AMX kernel in any forward (a prompt's last row
# too) the default model's answer to "What is the capital of France?" lost
# " Paris", whether the kernel rounded the weights to bfloat16 or scaled its
# sums (2026-12-05): a prefill's LM head stays on torch's int8 kernel. The
# AVX-512 BF16 int8 kernel (CPUs without AMX) keeps the same rule.
_in_decode_step = False  # set by decode_step()


@contextmanager
def decode_step() -> Iterator[None]:
    """Linear layers called within run one decode step (ModelRunner)."""
    global _in_decode_step
    _in_decode_step = True
    try:
        yield
    finally:
        _in_decode_step = False


def in_decode_step() -> bool:
    """Whether the linears now called run within a decode step."""
    return _in_decode_step


def dense_from_rows(in_decode_step: bool) -> int:
    """From how many bfloat16 rows a quantized linear takes the dense copy."""
    native = in_decode_step and cpu_has_native_bf16()
    return DECODE_DENSE_FROM_ROWS if native else INT8_DEQUANTIZE_FROM_ROWS


def amx_row_count(count: int, in_decode_step: bool, decode_rows: range, few_rows: range = range(0)) -> bool:
    """Whether `count` rows take an AMX kernel by their number: decode_rows in a
    decode step, few_rows in any forward (CpuDecodeLayers follows the same rule)."""
    return count in few_rows or (in_decode_step and count in decode_rows)


def int4_rows_on_kernel(count: int, in_decode_step: bool) -> bool:
    """Whether int4 linears of `count` bfloat16 rows run on a C++ kernel (the
    fused CPU layers take only those): AMX's by amx_row_count; without AMX the
    AVX-512 BF16 kernel, below the dense copy's rows (a decode step's or a
    prefill's), in any forward."""
    if cpu_kernels.amx_available():
        return amx_row_count(count, in_decode_step, AMX_INT4_DECODE_ROWS, AMX_INT4_FEW_ROWS)
    return cpu_kernels.avx512_bf16_available() and 1 <= count < dense_from_rows(in_decode_step)


def int8_rows_on_kernel(count: int, in_decode_step: bool) -> bool:
    """The same for int8 linears: decode steps only, on either kernel."""
    if cpu_kernels.amx_available():
        return amx_row_count(count, in_decode_step, AMX_INT8_DECODE_ROWS)
    return in_decode_step and cpu_kernels.avx512_bf16_available() and 1 <= count < dense_from_rows(True)


def takes_amx(rows: torch.Tensor, out_features: int, decode_rows: range, few_rows: range = range(0),
              group: int = cpu_kernels.AMX_BLOCK) -> bool:
    """Whether rows times a quantized weight run on an AMX kernel (amx_row_count)."""
    return amx_row_count(rows.shape[0], _in_decode_step, decode_rows, few_rows) \
        and cpu_kernels.amx_takes(rows, out_features, group)


# The copies of a quantized weight made for a path on first use and kept on
# it (attributes of the tensor); unquantized() drops them when it requantizes.
KERNEL_COPIES = ("dense_copy", "amx_copy", "vnni_copy")


def amx_copy(weight: torch.Tensor, pack: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The AMX kernels' layout of a quantized weight (`pack()`: as many bytes),
    made on first use and kept on the weight."""
    copy = weight.__dict__.get("amx_copy")
    if copy is None:
        copy = weight.amx_copy = pack()
    return copy


def vnni_copy(weight: torch.Tensor) -> torch.Tensor:
    """The VNNI kernel's layout of an int8 weight (cpu_kernels.pack_int8_for_vnni), kept as amx_copy is."""
    copy = weight.__dict__.get("vnni_copy")
    if copy is None:
        copy = weight.vnni_copy = cpu_kernels.pack_int8_for_vnni(weight)
    return copy


def takes_dense_gemm(rows: torch.Tensor) -> bool:
    """Whether these rows go through the dequantized copy rather than the kernel."""
    if rows.dtype == torch.bfloat16 and rows.device.type == "cpu":
        return rows.shape[0] >= dense_from_rows(_in_decode_step)
    return rows.shape[0] >= INT8_DEQUANTIZE_FROM_ROWS


# A prefill's dequantized GEMM runs in bfloat16 where the CPU has bfloat16
# units, else in float32: without them a bfloat16 GEMM is converted element by
# element and ran 4x slower than float32 (4,096 x 576 x 1,536 on a 2-core
# AVX-512 Xeon without BF16: 127 ms against 31 ms).
PREFILL_GEMM_DTYPE = torch.bfloat16 if cpu_has_native_bf16() else torch.float32


# On a CPU with bfloat16 units the copy is kept in oneDNN's blocked layout (the
# one torch.compile's CPU backend packs weights into) instead of being reordered
# inside every call: the same bits, and on a 2-core AMX Xeon 1.4-2.7x faster up
# to 128 rows (3,072 x 576 at 32 rows 156 -> 111 us; the LM head 2,628 -> 1,564
# us), even at 4,096; a batch-32 decode step of the default model 62.3 -> 56.4 ms.
ONEDNN_PACKED_BF16 = (cpu_has_native_bf16() and torch.backends.mkldnn.is_available()
                      and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
ONEDNN_PACK_ROWS = 32  # the row count the layout is chosen for; any count multiplies correctly


def prefill_gemm(rows: torch.Tensor, weight: torch.Tensor, dequantize: Callable[[], torch.Tensor]) -> torch.Tensor:
    """rows [n, in] times the quantized `weight` [out, in] -> [n, out] in rows'
    dtype, through a dequantized copy of it (`dequantize()`), made on the first
    prefill and kept on the weight: dequantizing on every call cost more than
    the GEMM (3.2 ms against 0.9 for 128 rows, 576 -> 1,536), which made a
    128-token prompt's prefill 4x slower than transformers'. The copy costs the
    unquantized model's bytes (the default model: 430 MB in float32); decode
    steps still read the quantized weight. `unquantized` drops it."""
    dtype = PREFILL_GEMM_DTYPE if rows.device.type == "cpu" else rows.dtype
    dense = weight.__dict__.get("dense_copy")
    if dense is None or dense.dtype != dtype:
        dense = dequantize().to(dtype)
        if dtype == torch.bfloat16 and rows.device.type == "cpu" and ONEDNN_PACKED_BF16:
            dense = torch.ops.mkldnn._reorder_linear_weight(dense, ONEDNN_PACK_ROWS)
            dense.onednn_packed = True
        weight.dense_copy = dense
    count, operand = rows.shape[0], rows.to(dtype)
    if takes_bucketed_rows(operand):
        operand = pad_rows(operand)  # (cpu_gemm_rows.py: one oneDNN kernel per bucket, not per prompt length)
    if dense.__dict__.get("onednn_packed"):
        out = torch.ops.mkldnn._linear_pointwise(operand, dense, None, "none", [], "")
    else:
        out = torch.nn.functional.linear(operand, dense)
    return out[:count].to(rows.dtype)
