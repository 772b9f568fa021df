"""Triton kernels for block-scaled FP8 weights (DeepSeek-V3/R1 checkpoints).

The weight W [N, K] is E4M3 with one float32 scale per GROUP_N x GROUP_K block
(w = q * scale[n // GROUP_N, k // GROUP_K]; [128, 128] for DeepSeek).

- `quantize_groups_fp8`: the activations x [M, K] quantized per token and per
  GROUP_K columns (one scale per row and group), in one kernel.
- `block_fp8_matmul`: the GEMM. One K step is one group of GROUP_K columns, so
  both operands carry one scale over it: the FP8 x FP8 product of the step (on
  the FP8 tensor cores) is multiplied by (activation group scale x weight
  block scale) and added to a float32 accumulator. With `x_scale` None the
  activations are not quantized (a decode's few rows: the step is bound by
  reading the weight, and x keeps its precision): the FP8 tile is widened to
  x's dtype in registers and only the weight's block scale applies.

One row (a batch-1 decode) goes to layers/gemv.py, which takes block scales
too. Under Triton's interpreter (the CPU tests) `dot` widens to float32 (its
bfloat16 dot is wrong) and the E4M3 cast is rounded in software
(fp8_kernels.round_to_e4m3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from radixserve.layers.fp8_kernels import round_to_e4m3
from radixserve.layers.triton_utils import INTERPRETED, MIN_DOT, dot, exact_dot

FP8_DTYPE = torch.float8_e4m3fn
# An FP8 tl.dot takes K steps of at least 32 on the GPU; smaller column blocks
# (the tests' 16) multiply in float32 instead (`dot`'s IEEE flag).
MIN_FP8_DOT_K = 32


@triton.jit
def _quantize_groups_kernel(x_ptr, q_ptr, scale_ptr, x_stride, n_cols, n_groups,
                            GROUP: tl.constexpr, GROUPS_PER_PROGRAM: tl.constexpr,
                            SOFTWARE_ROUNDING: tl.constexpr):
    # One row's GROUPS_PER_PROGRAM groups as a [groups, GROUP] tile: one max per group.
    row = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) / 448.0  # E4M3's largest value
    q = tl.minimum(tl.maximum(x / scale[:, None], -448.0), 448.0)
    if SOFTWARE_ROUNDING:
        q = round_to_e4m3(q)
    tl.store(q_ptr + row * n_cols + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row * n_groups + groups, scale, mask=groups < n_groups)


def check_group(group: int) -> None:
    """The kernels step through K one group at a time: a power of two that tl.dot takes."""
    if group < MIN_DOT or group & (group - 1):
        raise ValueError(f"weight_block_size's column block must be a power of two >= {MIN_DOT} "
                         f"for the block-FP8 Triton kernels, got {group}")


def quantize_groups_fp8(x: torch.Tensor, group: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (E4M3 q [M, K], float32 scales [M, ceil(K / group)]) with
    x[m, k] ~= q[m, k] * scale[m, k // group]; each group's largest magnitude
    maps to 448 (DeepSeek's activation quantization)."""
    check_group(group)
    rows, cols = x.shape
    groups = triton.cdiv(cols, group)
    q = torch.empty((rows, cols), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((rows, groups), dtype=torch.float32, device=x.device)
    if rows and x.stride(-1) != 1:
        x = x.contiguous()
    if rows:
        per_program = min(triton.next_power_of_2(groups), max(1, 2048 // group))  # up to 2,048 values
        _quantize_groups_kernel[(rows, triton.cdiv(groups, per_program))](
            x, q, scale, x.stride(0), cols, groups, GROUP=group, GROUPS_PER_PROGRAM=per_program,
            SOFTWARE_ROUNDING=INTERPRETED, num_warps=4)
    return q, scale


@dataclass(frozen=True)
class BlockGemmTiles:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def block_gemm_tiles(rows: int, n: int) -> BlockGemmTiles:
    """Tiles by row count (K steps are one scale group). Few rows: narrow
    column tiles so a small N still spreads over every SM; many rows: square
    128 tiles that reuse each weight tile over many rows. A first guess for
    Hopper, to be swept with bench/block_fp8_bench.py."""
    if rows <= MIN_DOT:
        return BlockGemmTiles(MIN_DOT, 32 if n >= 4096 else 16, 4, 4)
    if rows <= 64:
        return BlockGemmTiles(64, 64, 4, 4)
    return BlockGemmTiles(128 if rows >= 512 else 64, 128, 8, 3)


@triton.jit(do_not_specialize=["rows"])
def _block_fp8_matmul_kernel(
    x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    rows, n, k, x_stride, out_stride, k_groups,
    QUANTIZED_X: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row_ids = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = row_ids < rows, cols < n
    ks = tl.arange(0, GROUP_K)
    x_ptrs = x_ptr + row_ids.to(tl.int64)[:, None] * x_stride + ks[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * k + ks[None, :]
    # The weight scales of these columns' blocks: one row of the scale grid per GROUP_N columns.
    w_scale_ptrs = w_scale_ptr + (cols // GROUP_N) * k_groups
    x_scale_ptrs = x_scale_ptr + row_ids * k_groups
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for group in range(0, k_groups):
        k_mask = ks < k - group * GROUP_K
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        w_scale = tl.load(w_scale_ptrs + group, mask=col_mask, other=0.0)
        if QUANTIZED_X:  # FP8 x FP8 on the tensor cores, then both scales of this K group
            x_scale = tl.load(x_scale_ptrs + group, mask=row_mask, other=0.0)
            acc += dot(x, tl.trans(w), IEEE) * x_scale[:, None] * w_scale[None, :]
        else:
            acc += dot(x, tl.trans(w.to(x.dtype)), IEEE) * w_scale[None, :]
        x_ptrs += GROUP_K
        w_ptrs += GROUP_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + row_ids.to(tl.int64)[:, None] * out_stride + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def block_fp8_matmul(x: torch.Tensor, x_scale: Optional[torch.Tensor], weight: torch.Tensor,
                     weight_scale: torch.Tensor, block: Tuple[int, int], out_dtype: torch.dtype,
                     bias: Optional[torch.Tensor] = None,
                     tiles: Optional[BlockGemmTiles] = None) -> torch.Tensor:
    """x [M, K] times an E4M3 weight [N, K] with block scales [ceil(N/B0),
    ceil(K/B1)] (+ bias) -> [M, N] in out_dtype, accumulated in float32.
    x_scale [M, ceil(K/B1)]: x is E4M3 from `quantize_groups_fp8(x, B1)`;
    None: x is bfloat16/float16/float32, multiplied as it is."""
    rows, k = x.shape
    n = weight.shape[0]
    check_group(block[1])
    grid_shape = (triton.cdiv(n, block[0]), triton.cdiv(k, block[1]))
    if tuple(weight_scale.shape) != grid_shape or weight.shape[1] != k:
        raise ValueError(f"block-FP8 weight {tuple(weight.shape)} with blocks {block} and x {tuple(x.shape)} "
                         f"needs weight_scale {grid_shape}, got {tuple(weight_scale.shape)}")
    out = torch.empty((rows, n), dtype=out_dtype, device=x.device)
    if rows == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    tiles = tiles or block_gemm_tiles(rows, n)
    grid = (triton.cdiv(n, tiles.block_n), triton.cdiv(rows, tiles.block_m))
    _block_fp8_matmul_kernel[grid](
        x, x_scale if x_scale is not None else weight_scale, weight.contiguous(), weight_scale.contiguous(),
        bias if bias is not None else weight_scale, out,
        rows, n, k, x.stride(0), out.stride(0), grid_shape[1],
        QUANTIZED_X=x_scale is not None, HAS_BIAS=bias is not None,
        IEEE=exact_dot(x.dtype) or (x_scale is not None and block[1] < MIN_FP8_DOT_K),
        GROUP_N=block[0], GROUP_K=block[1], BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out
