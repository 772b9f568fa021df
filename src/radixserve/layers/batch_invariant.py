"""Matmuls whose result for a row does not depend on how many other rows are
in the batch (--enable-deterministic-inference).

A library GEMM picks its algorithm from the problem's shape: cuBLAS switches
tile sizes and split-K with the number of rows, and on the CPU MKL takes
another code path below about a dozen rows. Either changes the order in which
a row's products are summed, so the same request gets different bits alone
and in a batch. Here:

- CUDA: one Triton kernel with a single fixed tile configuration. Every output
  element is the sum over K in the same BLOCK_K steps, in the same order,
  whatever M is (no split-K).
- CPU: every library call gets exactly CPU_ROWS rows (the batch is split into
  blocks of that many, the last one padded), so the library sees one shape
  whatever the batch. Padding to a minimum alone was not enough: on a Xeon
  without BF16 (2026-12-03), MKL summed a row differently in products of 63
  to 128 rows than in one of 300 (K 1536). One shape is not enough either:
  with 12 or more threads and K large beside N (K 1536, N 576), MKL's
  x @ W^T summed a row differently by its place in the block (seen on the
  H200 host's 16 cores, 2026-12-04). So each block is computed as W @ x^T:
  the library splits its work over the weight's rows, and a row of x is one
  column whose place changes nothing (checked up to 64 threads, bf16 and
  float32). tests/layers/test_batch_invariant.py checks the property itself on
  the machine that runs them, at its own thread count and at 16 threads.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from radixserve.layers.triton_utils import dot, exact_dot

CPU_ROWS = 16  # rows per library GEMM call on the CPU
MIN_ROWS = CPU_ROWS  # blocked attention pads its row blocks to at least this many
# One configuration for every shape: changing it with M would change the sums.
_BLOCK_M, _BLOCK_N, _BLOCK_K = 64, 64, 64


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias) computed the same way for every row count."""
    if x.is_cuda:
        return _triton_linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    pad = -rows % CPU_ROWS
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad, flat.shape[1])])
    out = torch.cat([torch.mm(weight, chunk.t()).t() for chunk in flat.split(CPU_ROWS)])[:rows]
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


# m (the batch's rows) is not specialised on: one compiled variant per shape of
# weight, whatever the batch (kernel_warmup.py).
@triton.jit(do_not_specialize=["m"])
def _linear_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, m, n, k, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k, BLOCK_K):
        k_mask = ks < k - k0
        a = tl.load(x_ptrs, mask=(rows[:, None] < m) & k_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_mask[:, None] & (cols[None, :] < n), other=0.0)
        acc += dot(a, b, IEEE)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < m) & (cols[None, :] < n))


def _triton_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    m, k = flat.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m:
        grid = (triton.cdiv(m, _BLOCK_M), triton.cdiv(n, _BLOCK_N))
        _linear_kernel[grid](
            flat, weight, bias if bias is not None else weight, out, m, n, k,
            flat.stride(0), weight.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K,
            IEEE=exact_dot(x.dtype), num_warps=4, num_stages=3,
        )
    return out.reshape(*x.shape[:-1], n)
