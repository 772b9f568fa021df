"""Triton kernels of --quantization fp8 on CUDA.

A decode step multiplies a few rows by every weight, so it is bound by reading
the weights. In torch, quantizing the activations per token before
torch._scaled_mm is about eight small kernels per linear (abs, amax, divide,
clamp, cast, ...): over a 32-layer model a thousand launches, which cost more
than the bytes FP8 saves. Two kernels replace them:

- `quantize_rows_fp8`: the per-token quantization in one kernel (the rows the
  FP8 GEMM takes when there are many rows, a prefill).
- `fp8_weight_only_matmul`: for a few rows, no activation quantization at all.
  The kernel reads the FP8 weight, widens it in registers and multiplies the
  activations as they are (W8A16): the same weight bytes as the FP8 GEMM, one
  launch, and the activations keep their precision. The rows go through the
  tensor cores in tiles of 16; one row (batch-1 decode) is layers/gemv.py's
  matrix-vector product on the CUDA cores instead (`fp8_linear` picks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from radixserve.layers.triton_utils import INTERPRETED, MIN_DOT, dot, exact_dot

# Up to this many rows the weight-only kernel runs; from here the activations
# are quantized and the FP8 GEMM runs on the FP8 tensor cores (on an H200, for
# a Llama-8B layer's linears, 16 rows: weight-only 15-45 us against 20-48; at
# 32 rows the FP8 GEMM is ahead: bench/fp8_gemm_bench.py).
WEIGHT_ONLY_MAX_ROWS = 16


@triton.jit
def round_to_e4m3(x):
    """x (float32, |x| <= 448) rounded to the nearest E4M3 value, ties to even,
    in software: Triton 3.6's interpreter casts a value whose rounding carries
    into the next power of two wrongly (124.3 became 64)."""
    bits = x.to(tl.int32, bitcast=True)
    keep_even = (bits >> 20) & 1  # float32 has 23 mantissa bits, E4M3 keeps 3
    normal = ((bits + 0x7FFFF + keep_even) & ~0xFFFFF).to(tl.float32, bitcast=True)
    # below 2**-6 the step is 2**-9: adding 1.5 * 2**23 rounds x * 512 to an integer, ties to even
    subnormal = ((x * 512.0 + 12582912.0) - 12582912.0) / 512.0
    return tl.where(tl.abs(x) < 0.015625, subnormal, normal)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, x_stride, n_cols, BLOCK: tl.constexpr,
                          SOFTWARE_ROUNDING: tl.constexpr):
    # 64-bit: a 150,000-token prefill of Llama-8B's down projection input
    # ([T, 14,336]) has more than 2^31 elements.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    top = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        top = tl.maximum(top, tl.abs(x))
    scale = tl.maximum(tl.max(top, axis=0), 1e-12) / 448.0  # E4M3's largest value
    tl.store(scale_ptr + row, scale)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
        if SOFTWARE_ROUNDING:
            q = round_to_e4m3(q)
        tl.store(q_ptr + row * n_cols + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


def quantize_rows_fp8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [rows, cols] -> (E4M3 q [rows, cols], float32 scales [rows, 1]) with
    x ~= q * scale, as `quantization.quantize_per_row`, in one kernel."""
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block = min(triton.next_power_of_2(cols), 2048)
        _quantize_rows_kernel[(rows,)](x, q, scale, x.stride(0), cols, BLOCK=block,
                                       SOFTWARE_ROUNDING=INTERPRETED, num_warps=4)
    return q, scale


@dataclass(frozen=True)
class WeightOnlyTiles:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def weight_only_tiles(n: int, k: int) -> WeightOnlyTiles:
    """Tiles for 2-16 rows times an [n, k] weight, from the sweep of
    bench/fp8_gemm_bench.py on an H200 (Llama-8B's linears)."""
    block_k = 512 if k >= 512 else max(MIN_DOT, triton.next_power_of_2(k))
    return WeightOnlyTiles(block_n=32, block_k=block_k, num_warps=4, num_stages=3)


@triton.jit(do_not_specialize=["rows"])
def _fp8_weight_only_kernel(
    x_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    rows, n, k, x_stride, out_stride,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ids = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = row_ids < rows
    col_mask = cols < n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_mask = ks < k
        x = tl.load(x_ptr + row_ids[:, None] * x_stride + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * k + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc += dot(x, tl.trans(w.to(x.dtype)), IEEE)
    acc = acc * tl.load(w_scale_ptr + cols, mask=col_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + row_ids[:, None] * out_stride + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def fp8_weight_only_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                           bias: Optional[torch.Tensor] = None,
                           tiles: Optional[WeightOnlyTiles] = None) -> torch.Tensor:
    """x [rows, in] (bfloat16, float16 or float32) times an E4M3 weight
    [out, in] with float32 scales [out] -> [rows, out] in x's dtype, with x
    unquantized: the weight is widened to x's dtype in the kernel."""
    rows, k = x.shape
    n = weight.shape[0]
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    tiles = tiles or weight_only_tiles(n, k)
    grid = (triton.cdiv(n, tiles.block_n), triton.cdiv(rows, MIN_DOT))
    _fp8_weight_only_kernel[grid](
        x, weight, weight_scale, bias if bias is not None else weight_scale, out,
        rows, n, k, x.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, IEEE=exact_dot(x.dtype),
        BLOCK_M=MIN_DOT, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out
