"""Attention for one request in key blocks aligned to absolute positions, the
torch-native backend's --enable-deterministic-inference path.

A query's output is built from blocks of BLOCK keys starting at positions 0,
BLOCK, 2*BLOCK, ... in that order (an online softmax), with every product a
fixed-shape matmul. So the bits of a query's output depend only on its own
keys: not on how many queries run with it (the batch, the prefill chunk), nor
on whether its prefix was computed now or came from the radix cache. Blocks a
query cannot see change nothing: they add exact zeros.
"""

from __future__ import annotations

from typing import Optional

import torch

from radixserve.layers.batch_invariant import MIN_ROWS

BLOCK = 64


def blocked_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    q_positions: torch.Tensor,
    scale: float,
    sliding_window: Optional[int] = None,
    sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """q [n, heads, d] at absolute q_positions [n]; keys/values [L, kv_heads, d]
    for positions 0..L-1 of the same request. Causal (and windowed: a query
    sees its last `sliding_window` positions). Returns [n, heads, d]."""
    n, heads, dim = q.shape
    length, kv_heads = keys.shape[0], keys.shape[1]
    group = heads // kv_heads
    rows = max(n * group, MIN_ROWS)  # fixed-path matmuls: see batch_invariant.py
    # Rows are (query, head of the group) pairs of one KV head.
    q_rows = q.float().view(n, kv_heads, group, dim).transpose(0, 1).reshape(kv_heads, n * group, dim)
    q_rows = torch.cat([q_rows, q_rows.new_zeros(kv_heads, rows - n * group, dim)], dim=1)
    row_pos = torch.full((rows,), max(length - 1, 0), dtype=torch.long, device=q.device)
    row_pos[: n * group] = q_positions.repeat_interleave(group)

    m = torch.full((kv_heads, rows), float("-inf"), device=q.device)
    l = torch.zeros((kv_heads, rows), device=q.device)
    acc = torch.zeros((kv_heads, rows, dim), device=q.device)
    for start in range(0, length, BLOCK):
        k_pos = torch.arange(start, start + BLOCK, device=q.device)
        k_blk = _padded_block(keys, start)  # [kv_heads, BLOCK, d]
        v_blk = _padded_block(values, start)
        scores = torch.bmm(q_rows, k_blk.transpose(1, 2)) * scale
        visible = (k_pos[None, :] <= row_pos[:, None]) & (k_pos[None, :] < length)
        if sliding_window is not None:
            visible &= k_pos[None, :] > row_pos[:, None] - sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        m_new = torch.maximum(m, scores.amax(dim=-1))
        finite = torch.isfinite(m_new)  # a row that has seen no key yet
        alpha = torch.where(finite, torch.exp(m - m_new), 1.0)
        p = torch.where(finite[..., None], torch.exp(scores - m_new[..., None]), 0.0)
        l = l * alpha + p.sum(dim=-1)
        acc = acc * alpha[..., None] + torch.bmm(p, v_blk)
        m = m_new
    if sinks is not None:  # one more logit per head, with a zero value
        sink = sinks.float().view(kv_heads, group, 1).expand(kv_heads, group, n).reshape(kv_heads, n * group)
        sink = torch.cat([sink, sink.new_zeros(kv_heads, rows - n * group)], dim=1)
        m_all = torch.maximum(m, sink)
        rescale = torch.exp(m - m_all)
        acc, l = acc * rescale[..., None], l * rescale + torch.exp(sink - m_all)
    out = acc / torch.where(l > 0, l, 1.0)[..., None]
    out = out[:, : n * group].reshape(kv_heads, n, group, dim).transpose(0, 1)
    return out.reshape(n, heads, dim).to(q.dtype)


def _padded_block(x: torch.Tensor, start: int) -> torch.Tensor:
    """Rows start..start+BLOCK-1 of [L, kv_heads, d] as [kv_heads, BLOCK, d] float32, zero past L."""
    blk = x[start:start + BLOCK].float()
    if blk.shape[0] < BLOCK:
        blk = torch.cat([blk, blk.new_zeros(BLOCK - blk.shape[0], *blk.shape[1:])])
    return blk.transpose(0, 1)
