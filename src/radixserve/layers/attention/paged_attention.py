"""Triton attention kernels over the paged KV cache.

Both kernels find a request's KV through the request-to-token table
(`req_to_token[row, position]` = slot), so they work for any page size and
read the cached prefix and the new tokens alike (the new tokens' K/V are
written to the pool before attention runs).

- decode: one query token per request. Grid (request x KV head, split): each
  program takes the query heads that share one KV head (GQA) and a contiguous
  share of the request's positions, so a long context is spread over many
  programs; a second kernel merges the splits by their log-sum-exp (in
  deterministic mode a request within one fixed split skips it). Every
  shape depends on the batch size only, and lengths are read on the device,
  so a CUDA graph can capture it.
- extend: the new tokens of every request of a batch in one launch. Grid
  (request, block of new tokens, query head); new token j of a request with
  prefix p sees positions 0..p+j. A speculative verify of draft trees passes
  a bitmask per new token (speculative/tree.py): new token j then sees the
  prefix and those of the request's new tokens its bits name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from radixserve.layers.triton_utils import decode_split_count, dot, dot_block, exact_dot, extend_tile, pdl_wait, use_pdl
from radixserve.mem_cache.kv_dtype import FP8_DTYPES

@triton.jit
def _attend_block(q, m_i, l_i, acc, k_ptr, v_ptr, kv_off, kv_mask, visible, scale, IEEE: tl.constexpr):
    """One block of keys in the online softmax (flash attention): score the
    visible keys, rescale what was accumulated to the new running maximum,
    add this block's weighted values. Returns the new (max, sum, acc)."""
    # .to: an FP8 cache is widened to the query's dtype before the dot.
    k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
    s = tl.where(visible, dot(q, tl.trans(k), IEEE) * scale, float("-inf"))
    v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
    return online_softmax_step(s, v, m_i, l_i, acc, IEEE)


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, IEEE: tl.constexpr):
    """Fold one block of scores s [rows, keys] (invisible ones -inf) and its
    values v [keys, D] into the running (max, sum, weighted values)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit(do_not_specialize_on_alignment=["req_pool_indices_ptr", "seq_lens_ptr"])  # (as _extend_kernel)
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, req_to_token_ptr, req_pool_indices_ptr, seq_lens_ptr,
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_q_tok, stride_kv_slot, stride_table_row, stride_out_tok,
    scale, group, num_heads, window, split_tokens,
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, HAS_WINDOW: tl.constexpr,
    FIXED_SPLITS: tl.constexpr, ONE_SPLIT_DIRECT: tl.constexpr, FP16_DOTS: tl.constexpr = False,
    USE_PDL: tl.constexpr = False,
):
    # The kernel before this one wrote q, or the new tokens' KV.
    pdl_wait(USE_PDL)
    # (request, KV head) on one axis, the KV head fastest: programs that run
    # together read the same slots' rows (1-4% faster than requests first,
    # H100), and a batch is not capped by a second axis's 65,535 programs.
    num_kv_heads = num_heads // group
    kv_head = tl.program_id(0) % num_kv_heads
    req = tl.program_id(0) // num_kv_heads
    seq_len = tl.load(seq_lens_ptr + req)
    row = tl.load(req_pool_indices_ptr + req)
    # The splits share the visible positions only: with a sliding window the
    # query (at seq_len - 1) sees the last `window` of them, and no program
    # reads a key outside it.
    first = tl.maximum(seq_len - window, 0) if HAS_WINDOW else 0

    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    head = kv_head * group + h
    h_mask = h < group
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + req * stride_q_tok + head[:, None] * HEAD_DIM + d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)
    if FP16_DOTS:
        # An FP8 cache widens to float16 in one instruction per pair (to
        # bfloat16 it takes three), exactly; _attend_block widens the keys and
        # values to q's dtype, so q becomes float16 (clamped to its range).
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    out_base = (req * num_heads + head) * NUM_SPLITS
    table_row = req_to_token_ptr + row * stride_table_row
    if FIXED_SPLITS:
        # Deterministic mode: split s holds positions [s, s + 1) * split_tokens
        # and its key blocks start at multiples of BLOCK_N, whatever the batch
        # or the length, so a request's sums never change grouping. The grid's
        # second axis holds fewer programs than splits (as many as the batch
        # size calls for): each takes every num_programs-th split, and each
        # split is still summed on its own. Splits past the request's length
        # are not visited; the merge does not read them either.
        num_written = tl.cdiv(seq_len, split_tokens)
        if ONE_SPLIT_DIRECT and num_written == 1:
            # A request within one split: its output is that split's, which
            # the merge would copy bit for bit (weight exp(0) = 1, total 1).
            # Store it here; the merge skips this request.
            if tl.program_id(1) == 0:
                m_i, l_i, acc = _attend_range(q, k_ptr, v_ptr, table_row, d, d_mask, kv_head, first,
                                              first // BLOCK_N * BLOCK_N, seq_len, stride_kv_slot, scale,
                                              HEAD_DIM, BLOCK_N, IEEE, True)
                # + 0.0: a -0.0 becomes +0.0, as the merge's sum makes it.
                result = acc / tl.where(l_i > 0, l_i, 1.0)[:, None] + 0.0
                tl.store(out_ptr + req * stride_out_tok + head[:, None] * HEAD_DIM + d[None, :],
                         result.to(out_ptr.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])
        else:
            for split in range(tl.program_id(1), num_written, tl.num_programs(1)):
                lo = split * split_tokens
                end = tl.minimum(lo + split_tokens, seq_len)
                # The loop starts at the block holding `first`, so every block it
                # visits has a visible key (no -inf - -inf in the running max).
                start = tl.maximum(lo, first // BLOCK_N * BLOCK_N)
                _decode_one_split(q, k_ptr, v_ptr, table_row, part_out_ptr, part_lse_ptr, out_base + split, d,
                                  h_mask, d_mask, kv_head, first, start, end, end > tl.maximum(lo, first),
                                  stride_kv_slot, scale, HEAD_DIM, BLOCK_D, BLOCK_N, IEEE, True)
    else:
        split = tl.program_id(1)
        split_len = tl.cdiv(seq_len - first, NUM_SPLITS)
        start = first + split * split_len
        end = tl.minimum(start + split_len, seq_len)
        _decode_one_split(q, k_ptr, v_ptr, table_row, part_out_ptr, part_lse_ptr, out_base + split, d,
                          h_mask, d_mask, kv_head, first, start, end, end > start,
                          stride_kv_slot, scale, HEAD_DIM, BLOCK_D, BLOCK_N, IEEE, False)


@triton.jit
def _decode_one_split(q, k_ptr, v_ptr, table_row, part_out_ptr, part_lse_ptr, out_row, d, h_mask, d_mask,
                      kv_head, first, start, end, has_keys, stride_kv_slot, scale,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                      IEEE: tl.constexpr, MASK_FIRST: tl.constexpr):
    """Attention of q's heads over positions [start, end) of one request:
    stores the normalised partial output and its log-sum-exp at out_row. A
    split with no keys stores only an lse of -inf; the merge reads nothing
    else of it (most fixed splits of a short request are empty)."""
    if has_keys:
        m_i, l_i, acc = _attend_range(q, k_ptr, v_ptr, table_row, d, d_mask, kv_head, first, start, end,
                                      stride_kv_slot, scale, HEAD_DIM, BLOCK_N, IEEE, MASK_FIRST)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(part_out_ptr + out_row[:, None] * BLOCK_D + d[None, :], out, mask=h_mask[:, None])
        tl.store(part_lse_ptr + out_row, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), mask=h_mask)
    else:
        tl.store(part_lse_ptr + out_row, tl.full(out_row.shape, float("-inf"), tl.float32), mask=h_mask)


@triton.jit
def _attend_range(q, k_ptr, v_ptr, table_row, d, d_mask, kv_head, first, start, end, stride_kv_slot, scale,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, MASK_FIRST: tl.constexpr):
    """The online softmax of q's heads over positions [start, end) of one
    request, in blocks of BLOCK_N from start: the running (max, sum, acc)."""
    m_i = tl.full([q.shape[0]], float("-inf"), tl.float32)
    l_i = tl.zeros([q.shape[0]], tl.float32)
    acc = tl.zeros([q.shape[0], q.shape[1]], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        n_mask = (pos < end) & (pos >= first) if MASK_FIRST else pos < end
        slot = tl.load(table_row + pos, mask=n_mask, other=0)
        kv_off = slot[:, None] * stride_kv_slot + kv_head * HEAD_DIM + d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, k_ptr, v_ptr, kv_off, kv_mask,
                                      n_mask[None, :], scale, IEEE)
    return m_i, l_i, acc


@triton.jit
def decode_merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, sinks_ptr, seq_lens_ptr, stride_out_tok, stride_out_head, num_heads,
    split_tokens, NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SINKS: tl.constexpr, FIXED_SPLITS: tl.constexpr = False, ONE_SPLIT_DIRECT: tl.constexpr = False,
    USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    req = tl.program_id(0)
    if FIXED_SPLITS:
        # Those past the request's length were never written.
        written = tl.cdiv(tl.load(seq_lens_ptr + req), split_tokens)
        if not ONE_SPLIT_DIRECT or written != 1:  # else the split kernel stored the output
            _merge_written_splits(part_out_ptr, part_lse_ptr, out_ptr, sinks_ptr, stride_out_tok, stride_out_head,
                                  num_heads, req, written, NUM_SPLITS, HEAD_DIM, BLOCK_D, HAS_SINKS)
    else:
        _merge_splits(part_out_ptr, part_lse_ptr, out_ptr, sinks_ptr, stride_out_tok, stride_out_head, num_heads,
                      req, NUM_SPLITS, HEAD_DIM, BLOCK_D, HAS_SINKS)


@triton.jit
def _merge_splits(part_out_ptr, part_lse_ptr, out_ptr, sinks_ptr, stride_out_tok, stride_out_head, num_heads,
                  req, NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  HAS_SINKS: tl.constexpr):
    """The default mode's merge: every split of the request at once."""
    head = tl.program_id(1)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    base = (req * num_heads + head) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + base + s)
    m = tl.max(lse, 0)
    if HAS_SINKS:
        # The sink joins the denominator once, here, not once per split.
        sink = tl.load(sinks_ptr + head).to(tl.float32)
        m = tl.maximum(m, sink)
    # No keys at all (a zero-length padding row): output zeros, not NaN.
    has_keys = lse > float("-inf")
    w = tl.where(has_keys, tl.exp(lse - tl.where(m > float("-inf"), m, 0.0)), 0.0)
    # An empty split stored no output: its rows are not read (their weight is 0).
    parts = tl.load(part_out_ptr + (base + s)[:, None] * BLOCK_D + d[None, :], mask=has_keys[:, None], other=0.0)
    total = tl.sum(w, 0)
    if HAS_SINKS:
        total += tl.exp(sink - m)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + req * stride_out_tok + head * stride_out_head + d, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


@triton.jit
def _merge_written_splits(part_out_ptr, part_lse_ptr, out_ptr, sinks_ptr, stride_out_tok, stride_out_head,
                          num_heads, req, written, NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr):
    """Fixed splits (deterministic mode): the `written` splits merged one
    after another, in the same order at every batch size. A request reaches
    a few of its up to 64 splits, and _merge_splits' NUM_SPLITS-wide load
    made this merge 4x the default mode's (H100, 256 x 640 tokens)."""
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    base = (req * num_heads + head) * NUM_SPLITS
    m = tl.full([], float("-inf"), tl.float32)
    for s in range(0, written):
        m = tl.maximum(m, tl.load(part_lse_ptr + base + s))
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32)
        m = tl.maximum(m, sink)
    shift = tl.where(m > float("-inf"), m, 0.0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    total = tl.zeros([], tl.float32)
    for s in range(0, written):
        lse = tl.load(part_lse_ptr + base + s)
        # An empty split (before a sliding window) stored no output: not read, weight 0.
        has_keys = lse > float("-inf")
        w = tl.where(has_keys, tl.exp(lse - shift), 0.0)
        acc += tl.load(part_out_ptr + (base + s) * BLOCK_D + d, mask=d < tl.where(has_keys, HEAD_DIM, 0),
                       other=0.0) * w
        total += w
    if HAS_SINKS:
        total += tl.exp(sink - m)
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + req * stride_out_tok + head * stride_out_head + d, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


def decode_num_splits(batch_size: int, num_kv_heads: int, num_sms: int, max_splits: int = 16) -> int:
    """Splits per (request, KV head) program: see decode_split_count."""
    return decode_split_count(batch_size * num_kv_heads, num_sms, max_splits)


def fixed_decode_splits(context_len: int, max_splits: int = 64) -> tuple:
    """(num_splits, split_tokens) for deterministic decode: splits of a fixed
    number of positions (a multiple of every BLOCK_N) covering the context."""
    split_tokens = 256
    while triton.cdiv(context_len, split_tokens) > max_splits:
        split_tokens *= 2
    return triton.next_power_of_2(triton.cdiv(context_len, split_tokens)), split_tokens


@dataclass(frozen=True)
class DecodeTiles:
    block_n: int  # keys per loop step
    num_warps: int
    num_stages: int
    fp16_dots: bool  # widen an FP8 cache to float16 rather than to q's bfloat16


# From this many (request, KV head) programs on, bfloat16 decode takes blocks
# of 32 keys over 2 warps: 9% faster at 256 requests of 640 tokens (8 KV
# heads), 6% slower at 64 (H200, Llama-8B's heads; docs/benchmarks.md).
MANY_DECODE_PROGRAMS = 1024
# An FP8 cache (float16 dots) below this many programs takes blocks of 128
# keys over 4 warps, from it blocks of 64 over 2 warps with 4 stages: from 8
# to 256 programs (1-32 requests, 1,024-2,048 tokens) 21-29% faster, at 512
# (64 x 1,024) and 2,048 (256 x 640) 2% slower (H100 on the flattened grid,
# Llama-8B's 8 KV heads; docs/benchmarks.md).
FP8_FEW_DECODE_PROGRAMS = 512


def decode_tiles(cache_dtype: torch.dtype, q_dtype: torch.dtype, block_d: int, programs: int,
                 fixed_splits: bool) -> DecodeTiles:
    """The decode kernel's tiles, from sweeps on the H200 and H100. An FP8
    cache under 16-bit queries: float16 dots (0.69x the time of the
    bfloat16-widening default, averaged over 256 x 640, 64 x 1,024 and 1 x
    2,048 tokens), the block and warps by the programs (FP8_FEW_DECODE_PROGRAMS).
    Deterministic mode keeps one tile whatever the batch (its key blocks must start at the same positions and
    be summed alike). The large-batch tile there made 256 x 640 tokens
    slower, not faster (H200, docs/benchmarks.md), so it keeps the default."""
    if block_d > 128:
        return DecodeTiles(32, 4, 2, False)  # within shared memory
    if cache_dtype in FP8_DTYPES and q_dtype in (torch.bfloat16, torch.float16):
        return DecodeTiles(64, 2, 4, True) if programs >= FP8_FEW_DECODE_PROGRAMS else DecodeTiles(128, 4, 3, True)
    if programs >= MANY_DECODE_PROGRAMS and not fixed_splits:
        return DecodeTiles(32, 2, 2, False)
    return DecodeTiles(64, 4, 2, False)


def decode_attention(
    q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, out: torch.Tensor,
    req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
    scale: float, num_splits: int,
    sliding_window: Optional[int] = None, sinks: Optional[torch.Tensor] = None,
    split_tokens: Optional[int] = None, split_programs: Optional[int] = None,
) -> None:
    """q, out: [bs, heads*D]; k/v_buffer: [slots, kv_heads, D]. Writes out.
    sliding_window: the query sees its last `sliding_window` positions only;
    sinks: [heads] logits in each head's softmax denominator;
    split_tokens: each split takes this many positions (fixed_decode_splits:
    batch-invariant) instead of an equal share of the request's length;
    split_programs: with split_tokens, the programs per (request, KV head)
    that share the splits (default: one per split)."""
    bs = q.shape[0]
    num_kv_heads, head_dim = k_buffer.shape[1], k_buffer.shape[2]
    num_heads = q.shape[1] // head_dim
    group = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    part_out = torch.empty((bs, num_heads, num_splits, block_d), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((bs, num_heads, num_splits), dtype=torch.float32, device=q.device)
    tiles = decode_tiles(k_buffer.dtype, q.dtype, block_d, bs * num_kv_heads, split_tokens is not None)
    programs = min(split_programs or num_splits, num_splits) if split_tokens else num_splits
    # Fixed splits, no sinks: a request within one split skips the merge.
    one_split_direct = split_tokens is not None and sinks is None
    pdl = use_pdl(q.device)
    _decode_split_kernel[(bs * num_kv_heads, programs)](
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, part_out, part_lse, out,
        q.stride(0), k_buffer.stride(0), req_to_token.stride(0), out.stride(0), scale, group, num_heads,
        sliding_window or 0, split_tokens or 0, NUM_SPLITS=num_splits, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_H=dot_block(group), BLOCK_N=tiles.block_n, IEEE=exact_dot(q.dtype), HAS_WINDOW=sliding_window is not None,
        FIXED_SPLITS=split_tokens is not None, ONE_SPLIT_DIRECT=one_split_direct, FP16_DOTS=tiles.fp16_dots,
        USE_PDL=pdl, num_warps=tiles.num_warps, num_stages=tiles.num_stages, launch_pdl=pdl,
    )
    decode_merge_kernel[(bs, num_heads)](
        part_out, part_lse, out, q if sinks is None else sinks, seq_lens, out.stride(0), head_dim, num_heads,
        split_tokens or 0, NUM_SPLITS=num_splits, HEAD_DIM=head_dim, BLOCK_D=block_d, HAS_SINKS=sinks is not None,
        FIXED_SPLITS=split_tokens is not None, ONE_SPLIT_DIRECT=one_split_direct, USE_PDL=pdl,
        num_warps=1 if split_tokens else 4,  # fixed splits: one head_dim-wide sum, element by element
        launch_pdl=pdl,
    )


# Index and length arrays may start anywhere in a larger tensor (a mixed batch's
# extend half, a slice of the free-slot list): no variant per pointer alignment.
@triton.jit(do_not_specialize_on_alignment=[
    "req_pool_indices_ptr", "prefix_lens_ptr", "extend_lens_ptr", "extend_starts_ptr", "tree_mask_ptr",
    "tree_positions_ptr"])
def _extend_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, req_to_token_ptr, req_pool_indices_ptr,
    prefix_lens_ptr, extend_lens_ptr, extend_starts_ptr, tree_mask_ptr, tree_positions_ptr,
    sinks_ptr, stride_q_tok, stride_out_tok, stride_kv_slot, stride_table_row, scale, group, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_TREE: tl.constexpr = False,
):
    req = tl.program_id(0)
    m_block = tl.program_id(1)
    head = tl.program_id(2)
    extend_len = tl.load(extend_lens_ptr + req)
    if m_block * BLOCK_M >= extend_len:
        return
    prefix = tl.load(prefix_lens_ptr + req)
    first_tok = tl.load(extend_starts_ptr + req)
    row = tl.load(req_pool_indices_ptr + req)
    kv_head = head // group

    m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m_mask = m < extend_len
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + (first_tok + m)[:, None] * stride_q_tok + head * HEAD_DIM + d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    q_pos = prefix + m  # absolute position of each query (a tree's rows: causal bound only)
    if HAS_TREE:
        # Bit k of a query's mask: it sees the request's k-th new token.
        tree_bits = tl.load(tree_mask_ptr + first_tok + m, mask=m_mask, other=0)
        if HAS_WINDOW:
            # A tree node stands at prefix + its depth, not at prefix + its row:
            # the window counts those positions.
            q_win = tl.load(tree_positions_ptr + first_tok + m, mask=m_mask, other=0)

    if HAS_SINKS:
        # The sink is one more logit with a zero value: the online softmax
        # starts from it (max = sink, sum = 1), which also keeps the running
        # max finite for rows whose first blocks are outside their window.
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(sinks_ptr + head).to(tl.float32)
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    elif HAS_WINDOW:
        # A row may see no key of a block before its window starts; a finite
        # floor keeps exp(m_old - m_new) from being exp(-inf + inf) = NaN there.
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Causal: the block's last query sees positions up to prefix + its index.
    kv_end = prefix + tl.minimum((m_block + 1) * BLOCK_M, extend_len)
    # With a window, the block's first query sees nothing before window_lo:
    # those keys are not loaded, and blocks wholly before it are skipped. The
    # loop starts at a multiple of BLOCK_N, so key blocks begin at the same
    # absolute positions however the prompt was chunked (deterministic mode
    # relies on it).
    window_lo = tl.maximum(prefix + m_block * BLOCK_M - window + 1, 0) if HAS_WINDOW else 0
    if HAS_TREE:
        if HAS_WINDOW:
            # From the block's shallowest node's window: a key whose row is
            # before the bound stands before it too (a node's depth <= its row).
            shallowest = tl.min(tl.where(m_mask, q_win, prefix + extend_len), 0)
            window_lo = tl.maximum(shallowest - window + 1, 0)
    for n0 in range(window_lo // BLOCK_N * BLOCK_N, kv_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        n_mask = (pos < kv_end) & (pos >= window_lo)
        slot = tl.load(req_to_token_ptr + row * stride_table_row + pos, mask=n_mask, other=0)
        kv_off = slot[:, None] * stride_kv_slot + kv_head * HEAD_DIM + d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        visible = (pos[None, :] <= q_pos[:, None]) & n_mask[None, :]
        if HAS_TREE:
            new = pos - prefix  # the key's index among the new tokens (< 0: the prefix)
            bit = tl.minimum(tl.maximum(new, 0), 63).to(tl.int64)
            visible &= (new[None, :] < 0) | (((tree_bits[:, None] >> bit[None, :]) & 1) != 0)
            if HAS_WINDOW:
                in_tree = n_mask & (new >= 0)
                key_win = tl.where(in_tree, tl.load(tree_positions_ptr + first_tok + tl.maximum(new, 0),
                                                    mask=in_tree, other=0), pos)
                visible &= key_win[None, :] > q_win[:, None] - window
        elif HAS_WINDOW:
            visible &= pos[None, :] > q_pos[:, None] - window
        m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, k_ptr, v_ptr, kv_off, kv_mask, visible, scale, IEEE)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (first_tok + m)[:, None] * stride_out_tok + head * HEAD_DIM + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def extend_attention(
    q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, out: torch.Tensor,
    req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor, extend_starts: torch.Tensor, max_extend_len: int, scale: float,
    sliding_window: Optional[int] = None, sinks: Optional[torch.Tensor] = None,
    tree_mask: Optional[torch.Tensor] = None, tree_positions: Optional[torch.Tensor] = None,
) -> None:
    """q, out: [T, heads*D] (the new tokens of all requests, packed); k/v_buffer:
    [slots, kv_heads, D] already holding the new tokens' K/V. Writes out.
    sliding_window: a query at p sees positions p - sliding_window + 1 .. p;
    sinks: [heads] logits in each head's softmax denominator;
    tree_mask: [T] int64, the request's new tokens each one sees (bit k: the
    k-th; at most 64 new tokens per request) on top of its whole prefix;
    tree_positions: [T], with tree_mask and a window: each new token's
    position (prefix + its depth in the tree), which the window counts."""
    num_kv_heads, head_dim = k_buffer.shape[1], k_buffer.shape[2]
    num_heads = q.shape[1] // head_dim
    block_d = triton.next_power_of_2(head_dim)
    block = extend_tile(q.dtype, block_d)
    grid = (len(extend_lens), triton.cdiv(max_extend_len, block), num_heads)
    _extend_kernel[grid](
        q, k_buffer, v_buffer, out, req_to_token, req_pool_indices, prefix_lens, extend_lens, extend_starts,
        prefix_lens if tree_mask is None else tree_mask, prefix_lens if tree_positions is None else tree_positions,
        q if sinks is None else sinks,
        q.stride(0), out.stride(0), k_buffer.stride(0), req_to_token.stride(0), scale, num_heads // num_kv_heads,
        sliding_window or 0,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block, BLOCK_N=block, IEEE=exact_dot(q.dtype),
        HAS_WINDOW=sliding_window is not None, HAS_SINKS=sinks is not None, HAS_TREE=tree_mask is not None,
        num_warps=4, num_stages=2,
    )
