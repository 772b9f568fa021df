"""Segmented LoRA kernels for CUDA (S-LoRA/Punica's SGMV idea): the batch's
rows are grouped by adapter slot through an index (`order`: row numbers,
each slot's rows together), and each program computes one tile of one
slot's rows against that slot's weights, so every adapter's rows run in the
same two launches and each slot's A and B are read once per row tile, not
once per request.

shrink: s[rows] = x[rows] @ A[slot]^T  (A [slots, W, K], s [T, W])
expand: out[rows] += s[rows] @ B[slot]  (B [slots, W, N], out [T, N])
Rows in no segment (the base model's) are neither read nor written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
import triton
import triton.language as tl

from radixserve.layers.triton_utils import dot, dot_block, exact_dot

BLOCK_M = 16  # rows per tile
BLOCK_K = 32


@dataclass
class Segments:
    """Rows by slot, as device int32 tensors: segment i holds the rows
    order[starts[i] : starts[i] + lens[i]], all with adapter slot slots[i]."""

    order: torch.Tensor
    starts: torch.Tensor
    lens: torch.Tensor
    slots: torch.Tensor
    max_len: int  # the grid's row extent (at least the longest segment)

    @property
    def count(self) -> int:
        return self.starts.shape[0]


@triton.jit
def _segmented_matmul_kernel(in_ptr, w_ptr, out_ptr, order, starts, lens, slots, K, N,
                             stride_in, stride_ws, stride_wk, stride_wn, stride_out,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             ACCUMULATE: tl.constexpr, IEEE: tl.constexpr):
    """out[rows] (+)= in[rows] @ w[slot] for each segment's rows, where
    w[slot][k, n] sits at slot * stride_ws + k * stride_wk + n * stride_wn
    (shrink reads A transposed, expand reads B as it is)."""
    seg, mb, nb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, length, slot = tl.load(starts + seg), tl.load(lens + seg), tl.load(slots + seg).to(tl.int64)
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < length, cols < N
    row_ids = tl.load(order + start + rows, mask=rmask, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        xb = tl.load(in_ptr + row_ids[:, None] * stride_in + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                     other=0.0)
        wb = tl.load(w_ptr + slot * stride_ws + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                     mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc += dot(xb, wb, IEEE)
    mask = rmask[:, None] & cmask[None, :]
    where = out_ptr + row_ids[:, None] * stride_out + cols[None, :]
    if ACCUMULATE:
        acc += tl.load(where, mask=mask, other=0.0).to(tl.float32)
    tl.store(where, acc.to(out_ptr.dtype.element_ty), mask=mask)


def segmented_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, out: torch.Tensor, segs: Segments) -> torch.Tensor:
    """out[rows of each segment] += x A[slot]^T B[slot], in place; returns out.
    x [T, K], A [slots, W, K], B [slots, W, N], out [T, N]; rows contiguous."""
    if segs.count == 0 or segs.max_len == 0:
        return out
    assert x.stride(1) == 1 and out.stride(1) == 1 and A.is_contiguous() and B.is_contiguous()
    T, K = x.shape
    W, N = A.shape[1], B.shape[2]
    s = torch.empty(T, W, device=x.device, dtype=x.dtype)
    ieee = exact_dot(x.dtype)
    row_blocks = triton.cdiv(segs.max_len, BLOCK_M)
    block_w = dot_block(min(W, 64))
    grid = lambda n, block: (segs.count, row_blocks, triton.cdiv(n, block))  # noqa: E731
    _segmented_matmul_kernel[grid(W, block_w)](  # shrink: s = x A[slot]^T
        x, A, s, segs.order, segs.starts, segs.lens, segs.slots, K, W,
        x.stride(0), A.stride(0), A.stride(2), A.stride(1), s.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=block_w, BLOCK_K=BLOCK_K, ACCUMULATE=False, IEEE=ieee)
    block_n = 64
    _segmented_matmul_kernel[grid(N, block_n)](  # expand: out += s B[slot]
        s, B, out, segs.order, segs.starts, segs.lens, segs.slots, W, N,
        s.stride(0), B.stride(0), B.stride(1), B.stride(2), out.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_w, ACCUMULATE=True, IEEE=ieee)
    return out


def slot_order(row_slots: List[int], num_slots: int) -> tuple:
    """(order, starts, lens) of every slot 0..num_slots-1 (empty ones too):
    the rows of slot 0, then of slot 1, ...; rows of slot -1 are left out."""
    by_slot: List[List[int]] = [[] for _ in range(num_slots)]
    for row, slot in enumerate(row_slots):
        if slot >= 0:
            by_slot[slot].append(row)
    lens = [len(rows) for rows in by_slot]
    starts = [sum(lens[:i]) for i in range(num_slots)]
    return [row for rows in by_slot for row in rows], starts, lens


def segments_of(slots: List[int], tokens: List[int], device: torch.device) -> Segments:
    """Segments of the slots present, from each request's slot (-1: none) and token count."""
    row_slots = [slot for slot, n in zip(slots, tokens) for _ in range(n)]
    present = sorted({s for s in slots if s >= 0})
    order, starts, lens = slot_order([present.index(s) if s >= 0 else -1 for s in row_slots], len(present))
    as_tensor = lambda v: torch.tensor(v, dtype=torch.int32).to(device, non_blocking=True)  # noqa: E731
    return Segments(as_tensor(order), as_tensor(starts), as_tensor(lens), as_tensor(present), max(lens, default=0))


class DecodeSegments:
    """The static segments a decode CUDA graph reads: one per slot (empty
    ones have length 0), over rows up to max_bs; fill() rewrites them in place
    before each replay, so the captured addresses stay valid."""

    def __init__(self, num_slots: int, max_bs: int, device: torch.device) -> None:
        self.num_slots, self.max_bs = num_slots, max_bs
        self.order = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self.starts = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.lens = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.slots = torch.arange(num_slots, dtype=torch.int32, device=device)

    def view(self, bs: int) -> Segments:
        """What the graph of bs rows captures: any slot may hold all bs rows."""
        return Segments(self.order[:bs], self.starts, self.lens, self.slots, bs)

    def fill(self, row_slots: List[int]) -> None:
        order, starts, lens = slot_order(row_slots, self.num_slots)
        packed = torch.tensor(order + [0] * (len(row_slots) - len(order)) + starts + lens, dtype=torch.int32)
        n = len(row_slots)
        self.order[:n].copy_(packed[:n], non_blocking=True)
        self.starts.copy_(packed[n:n + self.num_slots], non_blocking=True)
        self.lens.copy_(packed[n + self.num_slots:], non_blocking=True)
