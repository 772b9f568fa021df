"""One row times a weight on CUDA (a batch-1 decode step's linears), bound by
reading the weight: bfloat16/float16 weights, or FP8 with per-channel scales
or with one scale per block of rows and columns (DeepSeek's block-scaled FP8).

Streaming a weight at the memory bandwidth needs many bytes in flight on every
SM: each program reads BLOCK_N weight rows, BLOCK_K columns per step, 32 bytes
per thread, and keeps the products apart until the end (one reduction per
output). cuBLAS reaches the bandwidth on a large bfloat16 matrix but not on a
small one (Qwen3-0.6B's o projection: 12.6 us against this kernel's 3.9 on an
H200), and has no GEMV for an FP8 weight with per-channel scales.
`prefer_over_cublas` says where this kernel wins (bench/gemv_bench.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from radixserve.layers.triton_utils import pdl_wait, use_pdl  # (also the interpreter shim: loops bounded by scalars)

# A bfloat16 weight under this many bytes: this kernel; larger, cuBLAS's GEMV,
# which streams a large matrix at the bandwidth (on an H200, bench/gemv_bench.py:
# Llama-8B's 50-235 MB projections, cuBLAS equal or up to 20% ahead, its 34 MB
# o projection equal; Qwen3-0.6B's 4-13 MB ones, this kernel 12-70% ahead on
# three, 8% behind on gate|up).
CUBLAS_FROM_BYTES = 40 << 20


@dataclass(frozen=True)
class GemvTiles:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int = 1  # software pipelining of the K loop (1: none, as the sweep ran)


@triton.jit
def _row_block(x_ptr, ks, k_mask, k, scale_row, SILU_GATED: tl.constexpr, SCALE_BLOCK_N: tl.constexpr,
               SCALE_BLOCK_K: tl.constexpr, res_ptr, norm_w_ptr, rstd, sum_out_ptr, normed_out_ptr, writes,
               NORM: tl.constexpr):
    """x's columns ks in float32, RMS-normed (NORM) or activated (SILU_GATED),
    and block-scaled as the product needs."""
    if NORM:  # x + residual normed, rounded where _rmsnorm_kernel rounds; one program writes both out
        summed = _residual_sum(x_ptr, res_ptr, ks, k_mask)
        normed = (summed.to(tl.float32) * rstd).to(summed.dtype).to(tl.float32)
        x = (normed * tl.load(norm_w_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)).to(summed.dtype)
        tl.store(sum_out_ptr + ks, summed, mask=k_mask & writes)
        tl.store(normed_out_ptr + ks, x, mask=k_mask & writes)
    else:
        x = tl.load(x_ptr + ks, mask=k_mask, other=0.0)
        if SILU_GATED:  # x = [gate | up]: silu(gate) * up, rounded where SiluAndMul rounds
            gate = x.to(tl.float32)
            up = tl.load(x_ptr + k + ks, mask=k_mask, other=0.0).to(tl.float32)
            x = ((gate * tl.sigmoid(gate)).to(x.dtype).to(tl.float32) * up).to(x.dtype)
    x = x.to(tl.float32)
    if SCALE_BLOCK_N:  # each column's block scale folded into x: one multiply per column, not per weight
        x *= tl.load(scale_row + ks // SCALE_BLOCK_K, mask=k_mask, other=0.0)
    return x


@triton.jit
def _residual_sum(x_ptr, res_ptr, ks, k_mask):
    """x + residual at columns ks, rounded to x's dtype (the residual stream's next value)."""
    x = tl.load(x_ptr + ks, mask=k_mask, other=0.0)
    r = tl.load(res_ptr + ks, mask=k_mask, other=0.0)
    return (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)


@triton.jit
def _rms_rstd(x_ptr, res_ptr, k, eps, BLOCK_K: tl.constexpr):
    """1 / rms of x + residual over k columns (_rmsnorm_kernel's, its squares
    summed in steps of BLOCK_K: equal within float32 rounding)."""
    squares = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        h = _residual_sum(x_ptr, res_ptr, ks, ks < k).to(tl.float32)
        squares += h * h
    return tl.rsqrt(tl.sum(squares, axis=0) / k + eps)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, n, k,
                 res_ptr, norm_w_ptr, sum_out_ptr, normed_out_ptr, eps,
                 HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_GATED: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SCALE_BLOCK_N: tl.constexpr = 0, SCALE_BLOCK_K: tl.constexpr = 0, NORM: tl.constexpr = False,
                 USE_PDL: tl.constexpr = False):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * k
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    scale_row = scale_ptr
    if SCALE_BLOCK_N:  # block scales: this program's rows share one row of them (BLOCK_N divides SCALE_BLOCK_N)
        scale_row = scale_ptr + (tl.program_id(0) * BLOCK_N // SCALE_BLOCK_N) * tl.cdiv(k, SCALE_BLOCK_K)
    writes = tl.program_id(0) == 0  # the program that stores a norm's outputs
    first_k = 0
    if USE_PDL:
        # The weights are no kernel's output: the first tile is read while the
        # kernel before this one finishes, then this waits for x.
        ks = tl.arange(0, BLOCK_K)
        k_mask = ks < k
        w = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        pdl_wait(USE_PDL)
    rstd = 0.0
    if NORM:  # every program sums the squares itself: no kernel (and no wait) of its own for the norm
        rstd = _rms_rstd(x_ptr, res_ptr, k, eps, BLOCK_K)
    if USE_PDL:
        x = _row_block(x_ptr, ks, k_mask, k, scale_row, SILU_GATED, SCALE_BLOCK_N, SCALE_BLOCK_K,
                       res_ptr, norm_w_ptr, rstd, sum_out_ptr, normed_out_ptr, writes, NORM)
        acc += w.to(tl.float32) * x[None, :]
        first_k = BLOCK_K
    for start in range(first_k, k, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_mask = ks < k
        x = _row_block(x_ptr, ks, k_mask, k, scale_row, SILU_GATED, SCALE_BLOCK_N, SCALE_BLOCK_K,
                       res_ptr, norm_w_ptr, rstd, sum_out_ptr, normed_out_ptr, writes, NORM)
        w = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    out = tl.sum(acc, axis=1)
    if HAS_SCALE and not SCALE_BLOCK_N:
        out = out * tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, out.to(out_ptr.dtype.element_ty), mask=col_mask)


def gemv_tiles(k: int, weight_bytes: int) -> GemvTiles:
    """Tiles from H200 measurements. bfloat16 (bench/gemv_bench.py's sweep on
    Llama-8B's and Qwen3-0.6B's projections): 4 rows per program, 1,024
    columns per step (512 when K is 1,024), 32 bytes per thread per step; more
    rows per program, or K split over programs, were not faster (split-K: 2% on one shape). FP8: 8 rows
    per program, 1,024 columns per step (8 bytes a thread: the bfloat16 kernel's
    bytes in flight), three stages, from bench/gemv_step_sweep.py, which times
    candidates inside Llama-8B's whole batch-1 step: 3.98 -> 3.59 ms on an H100
    against 512 columns (the tiles of the kernel this one replaced); the sweep
    timed alone had picked tiles that were slower in the step."""
    if weight_bytes == 1:
        return GemvTiles(block_n=8, block_k=min(1024, triton.next_power_of_2(k)),
                         num_warps=8 if k >= 8192 else 4, num_stages=3)
    block_k = 1024 if k >= 2048 else 512
    return GemvTiles(block_n=4, block_k=min(block_k, triton.next_power_of_2(k)), num_warps=8)


# When the product would fold its input's RMSNorm in (gemv_after_norm), the
# norm's own kernel goes too: this kernel takes weights up to this size then
# (Llama-8B's 50 MB q|k|v, where cuBLAS alone was about even).
CUBLAS_FROM_BYTES_AFTER_NORM = 64 << 20


def prefer_over_cublas(weight: torch.Tensor, after_norm: bool = False) -> bool:
    """Whether `gemv` beats cuBLAS for one row times this (unquantized) weight;
    after_norm: with an RMSNorm folded in, which cuBLAS would need a kernel for."""
    limit = CUBLAS_FROM_BYTES_AFTER_NORM if after_norm else CUBLAS_FROM_BYTES
    return weight.numel() * weight.element_size() < limit and weight.is_contiguous()


def fuse_activation(weight: torch.Tensor) -> bool:
    """Whether to fuse the MLP's SiLU into the one-row product with this weight
    (any format). Every program recomputes the activation over all of K, so it
    pays on small weights: Qwen3-0.6B's batch-1 step 1.095 -> 1.056 ms. On
    Llama-8B's FP8 down projection (58 MB) the fused step measured 3.49 ms
    against 3.39 unfused a session earlier, so large weights stay unfused."""
    return weight.numel() * weight.element_size() < CUBLAS_FROM_BYTES


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor] = None,
         bias: Optional[torch.Tensor] = None, tiles: Optional[GemvTiles] = None,
         silu_gated: bool = False, scale_block: Optional[Tuple[int, int]] = None,
         out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """x [1, k] times weight [n, k] (contiguous; FP8 with float32 `scale` [n],
    or x's dtype) plus bias -> [1, n] in out_dtype (default x's), accumulated in float32.
    silu_gated: x is [1, 2k] = [gate | up], and the product is of silu(gate) *
    up (SiluAndMul fused in: one kernel fewer in a batch-1 MLP).
    scale_block (B0, B1): `scale` is one per block instead, [ceil(n/B0), ceil(k/B1)]."""
    k = x.shape[-1] // 2 if silu_gated else x.shape[-1]
    out = torch.empty((1, weight.shape[0]), dtype=out_dtype or x.dtype, device=x.device)
    _launch(x, k, weight, scale, bias, out, tiles, silu_gated, scale_block)
    return out


def gemv_after_norm(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor, scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                    scale_block: Optional[Tuple[int, int]] = None, out_dtype: Optional[torch.dtype] = None,
                    tiles: Optional[GemvTiles] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm(x + residual) times weight, in one kernel: the RMSNorm with its
    residual add (a decoder layer's next norm) folded into the product after
    it. x, residual: [1, k]; the rest as `gemv`. Returns (the product, the
    normed row, x + residual), the last two as RMSNorm returns them."""
    if residual.shape != x.shape or residual.stride(-1) != 1 or norm_weight.shape != (x.shape[-1],):
        raise ValueError(f"gemv_after_norm takes x, a residual of its shape and a norm weight of its width, not "
                         f"{tuple(x.shape)}, {tuple(residual.shape)} and {tuple(norm_weight.shape)}")
    out = torch.empty((1, weight.shape[0]), dtype=out_dtype or x.dtype, device=x.device)
    normed, summed = torch.empty_like(x), torch.empty_like(x)
    _launch(x, x.shape[-1], weight, scale, bias, out, tiles, False, scale_block,
            (residual, norm_weight, eps, summed, normed))
    return out, normed, summed


def _launch(x: torch.Tensor, k: int, weight: torch.Tensor, scale: Optional[torch.Tensor],
            bias: Optional[torch.Tensor], out: torch.Tensor, tiles: Optional[GemvTiles], silu_gated: bool,
            scale_block: Optional[Tuple[int, int]], norm: Optional[tuple] = None) -> None:
    """_gemv_kernel on one row; norm: (residual, norm weight, eps, sum out, normed out)."""
    n = weight.shape[0]
    if x.shape[0] != 1 or x.stride(-1) != 1 or not weight.is_contiguous() or weight.shape[1] != k:
        raise ValueError(f"gemv takes one contiguous row and a contiguous weight of as many columns, "
                         f"not {tuple(x.shape)} and {tuple(weight.shape)}")
    tiles = tiles or gemv_tiles(k, weight.element_size())
    pdl = use_pdl(x.device)
    if scale_block is not None and scale_block[0] % tiles.block_n:  # a program's rows in one block
        tiles = dataclasses.replace(tiles, block_n=math.gcd(tiles.block_n, scale_block[0]))
    residual, norm_weight, eps, summed, normed = norm if norm is not None else (out, out, 0.0, out, out)
    _gemv_kernel[(triton.cdiv(n, tiles.block_n),)](
        x, weight, scale if scale is not None else out, bias if bias is not None else out, out, n, k,
        residual, norm_weight, summed, normed, eps,
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, SILU_GATED=silu_gated,
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, num_warps=tiles.num_warps,
        SCALE_BLOCK_N=scale_block[0] if scale_block else 0, SCALE_BLOCK_K=scale_block[1] if scale_block else 0,
        NORM=norm is not None, USE_PDL=pdl, num_stages=tiles.num_stages, launch_pdl=pdl)
