"""Row counts of the CPU's bfloat16 GEMMs, rounded up to a few buckets.

torch runs a bfloat16 GEMM on the CPU through oneDNN, which builds a kernel
for each shape it meets and keeps it in two caches (oneDNN's primitive cache
and ideep's, up to 1,024 entries each). A prefill's row count is its token
count, so every new prompt length built new kernels: 1-2.7 ms for the first
call of a shape (576 -> 1,536: 17 rows 1.26 ms against 0.20 ms again; 513
rows 5.7 against 2.9; 2-core EPYC), and about 250 kB that stayed. An
in-process scheduler serving prompts of 8-300 tokens grew by 1 MB of live
heap every 4 requests until the caches were full (several hundred MB).

Rounded up to 8 buckets per doubling (at most 12.5% more rows, zeros that are
dropped after), a model's linears meet about 90 row counts up to 8,192 per
weight shape: the kernels are built once, in the first requests, and stay.

Attention written as matmuls (MLA's torch path, attention sinks) meets a new
key count at every decode step, and the same holds: keys padded to their
bucket, the padding masked out (MLA's decode over 300-400 keys in bfloat16,
16 heads: 1.7-2.5 ms a layer at a new count against 0.3-0.45 at a known one).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

EXACT_ROWS = 16  # up to here every count is its own bucket (decode batches)
BUCKETS_PER_DOUBLING_LOG2 = 3  # 8 buckets between n and 2n


def bucketed_row_count(count: int) -> int:
    """The smallest bucket >= count."""
    if count <= EXACT_ROWS:
        return count
    step = 1 << ((count - 1).bit_length() - 1 - BUCKETS_PER_DOUBLING_LOG2)
    return -(-count // step) * step


def pad_rows(rows: torch.Tensor) -> torch.Tensor:
    """rows [n, k] with zero rows appended up to n's bucket (rows itself when n is a bucket)."""
    padding = bucketed_row_count(rows.shape[0]) - rows.shape[0]
    return F.pad(rows, (0, 0, 0, padding)) if padding else rows


def takes_bucketed_rows(rows: torch.Tensor) -> bool:
    """Whether a GEMM of these rows goes to oneDNN's per-shape kernels."""
    return rows.device.type == "cpu" and rows.dtype == torch.bfloat16 and rows.dim() == 2


def cpu_bf16_linear(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear of CPU bfloat16 rows [n, k], run at n's bucket."""
    count = rows.shape[0]
    return F.linear(pad_rows(rows), weight, bias)[:count]


def bucketed_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear, at the row count's bucket where x is CPU bfloat16 rows (takes_bucketed_rows)."""
    return cpu_bf16_linear(x, weight, bias) if takes_bucketed_rows(x) else F.linear(x, weight, bias)


def padded_key_count(count: int, like: torch.Tensor) -> int:
    """How many keys attention over `count` keys should run over: count's
    bucket where its matmuls are CPU bfloat16 ones (like: the queries), else count."""
    return bucketed_row_count(count) if like.device.type == "cpu" and like.dtype == torch.bfloat16 else count


def pad_keys(keys: torch.Tensor, values: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
             ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """keys and values [..., L, d] with zero keys appended up to L's bucket
    (padded_key_count), mask [..., L] (True: visible) with False for them.
    No values: keys only (MLA's values are the keys' latent part). No mask:
    every key visible, so where keys were added the mask [L'] says which."""
    length = keys.shape[-2]
    extra = padded_key_count(length, keys) - length
    if not extra:
        return keys, values, mask
    if mask is None:
        mask = torch.ones(length, dtype=torch.bool, device=keys.device)
    return (F.pad(keys, (0, 0, 0, extra)), None if values is None else F.pad(values, (0, 0, 0, extra)),
            F.pad(mask, (0, extra), value=False))


def pad_queries(q: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """q [..., Q, d] with zero queries appended up to Q's bucket (a prefill's
    query count is its length), mask [Q, L] with rows seeing every key for them
    (no row without a key: its softmax would be NaN); keep the first Q rows of the output."""
    count = q.shape[-2]
    extra = padded_key_count(count, q) - count
    if not extra:
        return q, mask
    return F.pad(q, (0, 0, 0, extra)), F.pad(mask, (0, 0, 0, extra), value=True)
