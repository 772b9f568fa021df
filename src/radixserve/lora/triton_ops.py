"""Segmented LoRA kernels for CUDA (S-LoRA/Punica's SGMV idea): the batch's
rows come in segments (runs of consecutive rows with one adapter slot), and
each program computes one tile of one segment against that slot's weights,
so every adapter's rows run in the same two launches.

shrink: s[rows] = x[rows] @ A[slot]^T  (A [slots, W, K], s [T, W])
expand: out[rows] += s[rows] @ B[slot]  (B [slots, W, N], out [T, N])
Rows outside every segment (the base model's) are neither read nor written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from radixserve.layers.triton_utils import dot, dot_block, exact_dot

BLOCK_M = 16  # rows per tile: decode segments are one row, prefill ones long
BLOCK_K = 32


@dataclass
class Segments:
    """Runs of rows sharing an adapter slot, as device int32 tensors."""

    starts: torch.Tensor
    lens: torch.Tensor
    slots: torch.Tensor
    max_len: int  # the longest run (the grid's row axis)

    @property
    def count(self) -> int:
        return self.starts.shape[0]

    def head(self, n: int) -> "Segments":
        """The first n segments (views: a CUDA graph keeps their addresses)."""
        return Segments(self.starts[:n], self.lens[:n], self.slots[:n], self.max_len)


def decode_segments(max_bs: int, device: torch.device) -> Segments:
    """One segment per decode row, all of length 0 (no adapter) until filled:
    the fixed shape a decode CUDA graph captures."""
    zeros = torch.zeros(max_bs, dtype=torch.int32, device=device)
    return Segments(torch.arange(max_bs, dtype=torch.int32, device=device), zeros, zeros.clone(), 1)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, s_ptr, starts, lens, slots, K, W, stride_x, stride_as, stride_aw, stride_s,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    seg, mb, nb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, length, slot = tl.load(starts + seg), tl.load(lens + seg), tl.load(slots + seg).to(tl.int64)
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < length, cols < W
    rows64 = (start + rows).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        xb = tl.load(x_ptr + rows64[:, None] * stride_x + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        ab = tl.load(a_ptr + slot * stride_as + cols[None, :] * stride_aw + ks[:, None],
                     mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc += dot(xb, ab, IEEE)
    tl.store(s_ptr + rows64[:, None] * stride_s + cols[None, :], acc.to(s_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _expand_kernel(s_ptr, b_ptr, out_ptr, starts, lens, slots, N, W, stride_s, stride_bs, stride_bw, stride_out,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, IEEE: tl.constexpr):
    seg, mb, nb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, length, slot = tl.load(starts + seg), tl.load(lens + seg), tl.load(slots + seg).to(tl.int64)
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < length, cols < N
    rows64 = (start + rows).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for w0 in range(0, W, BLOCK_W):
        ws = w0 + tl.arange(0, BLOCK_W)
        wmask = ws < W
        sb = tl.load(s_ptr + rows64[:, None] * stride_s + ws[None, :], mask=rmask[:, None] & wmask[None, :], other=0.0)
        bb = tl.load(b_ptr + slot * stride_bs + ws[:, None] * stride_bw + cols[None, :],
                     mask=wmask[:, None] & cmask[None, :], other=0.0)
        acc += dot(sb, bb, IEEE)
    mask = rmask[:, None] & cmask[None, :]
    where = out_ptr + rows64[:, None] * stride_out + cols[None, :]
    total = tl.load(where, mask=mask, other=0.0).to(tl.float32) + acc
    tl.store(where, total.to(out_ptr.dtype.element_ty), mask=mask)


def segmented_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, out: torch.Tensor, segs: Segments) -> torch.Tensor:
    """out[rows of each segment] += x A[slot]^T B[slot], in place; returns out.
    x [T, K], A [slots, W, K], B [slots, W, N], out [T, N]; rows contiguous."""
    if segs.count == 0:
        return out
    assert x.stride(1) == 1 and out.stride(1) == 1 and A.is_contiguous() and B.is_contiguous()
    T, K = x.shape
    W, N = A.shape[1], B.shape[2]
    s = torch.empty(T, W, device=x.device, dtype=x.dtype)
    ieee = exact_dot(x.dtype)
    row_blocks = triton.cdiv(segs.max_len, BLOCK_M)
    block_w = dot_block(min(W, 64))
    _shrink_kernel[(segs.count, row_blocks, triton.cdiv(W, block_w))](
        x, A, s, segs.starts, segs.lens, segs.slots, K, W, x.stride(0), A.stride(0), A.stride(1), s.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=block_w, BLOCK_K=BLOCK_K, IEEE=ieee)
    block_n = 64
    _expand_kernel[(segs.count, row_blocks, triton.cdiv(N, block_n))](
        s, B, out, segs.starts, segs.lens, segs.slots, N, W, s.stride(0), B.stride(0), B.stride(1), out.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_W=block_w, IEEE=ieee)
    return out


def segments_of(slots: list, tokens: list, device: torch.device) -> Segments:
    """Runs of consecutive rows with one slot (-1: no adapter, left out)."""
    starts, lens, seg_slots, start = [], [], [], 0
    for slot, n in zip(slots, tokens):
        if slot >= 0 and n:
            if seg_slots and seg_slots[-1] == slot and starts[-1] + lens[-1] == start:
                lens[-1] += n
            else:
                starts.append(start), lens.append(n), seg_slots.append(slot)
        start += n
    as_tensor = lambda v: torch.tensor(v, dtype=torch.int32).to(device, non_blocking=True)  # noqa: E731
    return Segments(as_tensor(starts), as_tensor(lens), as_tensor(seg_slots), max(lens, default=0))
