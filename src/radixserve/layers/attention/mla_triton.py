"""Triton kernels of multi-head latent attention (mla.py explains the two forms).

Keys come in two parts, scored as qa·ka + qb·kb: the latent (or k_nope) part
and the rope part. Each part is padded to its own power of two, so DeepSeek-V3's
key of 512 + 64 = 576 values costs 576 lanes, not 1024, and the latent tile
loaded for the score is reused as the value tile in the absorbed form.

- decode (absorbed): one query per request over its cached [latent | k_pe]
  rows, found through req_to_token. Grid (request, block of heads, split):
  every head shares the one latent KV head, so a program takes up to 16 heads
  (one tl.dot tile) and a contiguous share of the positions; a second kernel
  merges the splits by their log-sum-exp. Shapes depend on the batch size
  only and lengths are read on the device: a CUDA graph can capture it.
- extend: grid (request, block of new tokens, head); new token j of a request
  with prefix p sees positions 0..p+j. Keys are read either through
  req_to_token from the latent cache (absorbed) or from packed per-request
  rows (expanded: decompressed k_nope per head, k_pe shared, v per head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixserve.layers.attention.paged_attention import decode_merge_kernel, online_softmax_step
from radixserve.layers.triton_utils import (
    MIN_DOT, decode_split_count, dot, dot_block, exact_dot, extend_tile, pdl_wait, use_pdl,
)


@triton.jit(do_not_specialize_on_alignment=["req_pool_indices_ptr", "seq_lens_ptr"])  # (as below)
def _mla_decode_split_kernel(
    q_lat_ptr, q_pe_ptr, kv_ptr, req_to_token_ptr, req_pool_indices_ptr, seq_lens_ptr,
    part_out_ptr, part_lse_ptr,
    stride_ql_tok, stride_ql_head, stride_qp_tok, stride_qp_head, stride_kv_slot, stride_table_row,
    scale, num_heads,
    NUM_SPLITS: tl.constexpr, D_LATENT: tl.constexpr, D_ROPE: tl.constexpr,
    BLOCK_DL: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)  # the kernel before this one wrote the query
    req = tl.program_id(0)
    head_block = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    row = tl.load(req_pool_indices_ptr + req)
    split_len = tl.cdiv(seq_len, NUM_SPLITS)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    dl = tl.arange(0, BLOCK_DL)
    dr = tl.arange(0, BLOCK_DR)
    h_mask = h < num_heads
    dl_mask = dl < D_LATENT
    dr_mask = dr < D_ROPE
    q_lat = tl.load(q_lat_ptr + req * stride_ql_tok + h[:, None] * stride_ql_head + dl[None, :],
                    mask=h_mask[:, None] & dl_mask[None, :], other=0.0)
    q_pe = tl.load(q_pe_ptr + req * stride_qp_tok + h[:, None] * stride_qp_head + dr[None, :],
                   mask=h_mask[:, None] & dr_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DL], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        n_mask = pos < end
        slot = tl.load(req_to_token_ptr + row * stride_table_row + pos, mask=n_mask, other=0)
        row_ptr = kv_ptr + slot[:, None] * stride_kv_slot
        # .to: an FP8 cache is widened to the query's dtype before the dots.
        latent = tl.load(row_ptr + dl[None, :], mask=n_mask[:, None] & dl_mask[None, :], other=0.0).to(q_lat.dtype)
        rope = tl.load(row_ptr + D_LATENT + dr[None, :], mask=n_mask[:, None] & dr_mask[None, :],
                       other=0.0).to(q_pe.dtype)
        s = (dot(q_lat, tl.trans(latent), IEEE) + dot(q_pe, tl.trans(rope), IEEE)) * scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, latent, m_i, l_i, acc, IEEE)  # the latent is the value

    out_base = (req * num_heads + h) * NUM_SPLITS + split
    has_keys = end > start
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(part_out_ptr + out_base[:, None] * BLOCK_DL + dl[None, :], out, mask=h_mask[:, None])
    tl.store(part_lse_ptr + out_base, lse, mask=h_mask)


def mla_decode_num_splits(batch_size: int, num_heads: int, num_sms: int, max_splits: int = 16) -> int:
    """Splits per request so the grid fills the GPU about twice over: a power of
    two (the merge kernel's arange), from the batch size alone (one value per CUDA graph)."""
    return decode_split_count(batch_size * triton.cdiv(num_heads, MIN_DOT), num_sms, max_splits)


def mla_decode_attention(
    q_latent: torch.Tensor, q_pe: torch.Tensor, kv_buffer: torch.Tensor, out: torch.Tensor,
    req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
    scale: float, num_splits: int,
) -> None:
    """Absorbed decode. q_latent, out: [bs, H, L]; q_pe: [bs, H, R]; kv_buffer:
    [slots, 1, L + R] (latent | rope key). Writes out."""
    bs, num_heads, d_latent = q_latent.shape
    d_rope = q_pe.shape[2]
    assert kv_buffer.shape[-1] == d_latent + d_rope and q_latent.stride(2) == 1 and q_pe.stride(2) == 1
    block_dl = dot_block(d_latent)
    pdl = use_pdl(q_latent.device)
    part_out = torch.empty((bs, num_heads, num_splits, block_dl), dtype=torch.float32, device=q_latent.device)
    part_lse = torch.empty((bs, num_heads, num_splits), dtype=torch.float32, device=q_latent.device)
    _mla_decode_split_kernel[(bs, triton.cdiv(num_heads, MIN_DOT), num_splits)](
        q_latent, q_pe, kv_buffer, req_to_token, req_pool_indices, seq_lens, part_out, part_lse,
        q_latent.stride(0), q_latent.stride(1), q_pe.stride(0), q_pe.stride(1), kv_buffer.stride(0),
        req_to_token.stride(0), scale, num_heads,
        NUM_SPLITS=num_splits, D_LATENT=d_latent, D_ROPE=d_rope, BLOCK_DL=block_dl, BLOCK_DR=dot_block(d_rope),
        BLOCK_H=MIN_DOT, BLOCK_N=32 if block_dl <= 256 else 16,
        IEEE=exact_dot(q_latent.dtype), USE_PDL=pdl, num_warps=4 if block_dl <= 256 else 8,
        num_stages=2, launch_pdl=pdl,
    )
    decode_merge_kernel[(bs, num_heads)](
        part_out, part_lse, out, out, seq_lens, out.stride(0), out.stride(1), num_heads, 0,
        NUM_SPLITS=num_splits, HEAD_DIM=d_latent, BLOCK_D=block_dl, HAS_SINKS=False, USE_PDL=pdl, num_warps=4,
        launch_pdl=pdl,
    )


# (index and length arrays: no variant per alignment, as paged_attention's kernels)
@triton.jit(do_not_specialize_on_alignment=[
    "req_pool_indices_ptr", "prefix_lens_ptr", "extend_lens_ptr", "extend_starts_ptr", "kv_starts_ptr"])
def _mla_extend_kernel(
    qa_ptr, qb_ptr, ka_ptr, kb_ptr, v_ptr, out_ptr,
    req_to_token_ptr, req_pool_indices_ptr, prefix_lens_ptr, extend_lens_ptr, extend_starts_ptr, kv_starts_ptr,
    stride_qa_tok, stride_qa_head, stride_qb_tok, stride_qb_head,
    stride_ka_row, stride_ka_head, stride_kb_row, stride_kb_head, stride_v_row, stride_v_head,
    stride_out_tok, stride_out_head, stride_table_row, scale,
    DA: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr,
    BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr, V_IS_KEY_A: tl.constexpr, IEEE: tl.constexpr,
):
    req = tl.program_id(0)
    m_block = tl.program_id(1)
    head = tl.program_id(2)
    extend_len = tl.load(extend_lens_ptr + req)
    if m_block * BLOCK_M >= extend_len:
        return
    prefix = tl.load(prefix_lens_ptr + req)
    first_tok = tl.load(extend_starts_ptr + req)
    table_row = tl.load(req_pool_indices_ptr + req)
    first_key_row = tl.load(kv_starts_ptr + req)

    m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    da = tl.arange(0, BLOCK_DA)
    db = tl.arange(0, BLOCK_DB)
    dv = tl.arange(0, BLOCK_DV)
    m_mask = m < extend_len
    tok = first_tok + m
    qa = tl.load(qa_ptr + tok[:, None] * stride_qa_tok + head * stride_qa_head + da[None, :],
                 mask=m_mask[:, None] & (da < DA)[None, :], other=0.0)
    qb = tl.load(qb_ptr + tok[:, None] * stride_qb_tok + head * stride_qb_head + db[None, :],
                 mask=m_mask[:, None] & (db < DB)[None, :], other=0.0)
    q_pos = prefix + m  # absolute position of each query

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # Causal: the block's last query sees positions up to prefix + its index.
    kv_end = prefix + tl.minimum((m_block + 1) * BLOCK_M, extend_len)
    for n0 in range(0, kv_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        n_mask = pos < kv_end
        if PAGED:
            key_row = tl.load(req_to_token_ptr + table_row * stride_table_row + pos, mask=n_mask, other=0)
        else:
            key_row = first_key_row + pos
        # .to: keys read from an FP8 cache are widened to the queries' dtype.
        ka = tl.load(ka_ptr + key_row[:, None] * stride_ka_row + head * stride_ka_head + da[None, :],
                     mask=n_mask[:, None] & (da < DA)[None, :], other=0.0).to(qa.dtype)
        kb = tl.load(kb_ptr + key_row[:, None] * stride_kb_row + head * stride_kb_head + db[None, :],
                     mask=n_mask[:, None] & (db < DB)[None, :], other=0.0).to(qb.dtype)
        s = (dot(qa, tl.trans(ka), IEEE) + dot(qb, tl.trans(kb), IEEE)) * scale
        s = tl.where((pos[None, :] <= q_pos[:, None]) & n_mask[None, :], s, float("-inf"))
        if V_IS_KEY_A:  # absorbed: the latent is both key part and value
            v = ka
        else:
            v = tl.load(v_ptr + key_row[:, None] * stride_v_row + head * stride_v_head + dv[None, :],
                        mask=n_mask[:, None] & (dv < DV)[None, :], other=0.0)
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, IEEE)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tok[:, None] * stride_out_tok + head * stride_out_head + dv[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & (dv < DV)[None, :])


def _launch_extend(qa, qb, ka, kb, v, out, req_to_token, req_pool_indices, prefix_lens, extend_lens,
                   extend_starts, kv_starts, max_extend_len, scale, paged: bool, v_is_key_a: bool) -> None:
    """ka/kb/v: [rows, heads or 1, dim] (a head stride of 0 shares one head)."""
    num_heads = qa.shape[1]
    da, db, dv = qa.shape[2], qb.shape[2], out.shape[2]
    for t in (qa, qb, ka, kb, v, out):
        assert t.stride(-1) == 1, "the last axis must be contiguous"
    block_da, block_dv = dot_block(da), dot_block(dv)
    block = extend_tile(qa.dtype, max(block_da, block_dv))
    head_stride = lambda t: t.stride(1) if t.shape[1] > 1 else 0  # noqa: E731
    grid = (len(extend_lens), triton.cdiv(max_extend_len, block), num_heads)
    _mla_extend_kernel[grid](
        qa, qb, ka, kb, v, out, req_to_token, req_pool_indices, prefix_lens, extend_lens, extend_starts, kv_starts,
        qa.stride(0), qa.stride(1), qb.stride(0), qb.stride(1),
        ka.stride(0), head_stride(ka), kb.stride(0), head_stride(kb), v.stride(0), head_stride(v),
        out.stride(0), out.stride(1), req_to_token.stride(0), scale,
        DA=da, DB=db, DV=dv, BLOCK_DA=block_da, BLOCK_DB=dot_block(db), BLOCK_DV=block_dv,
        BLOCK_M=block, BLOCK_N=block, PAGED=paged, V_IS_KEY_A=v_is_key_a, IEEE=exact_dot(qa.dtype),
        num_warps=4 if max(block_da, block_dv) <= 256 else 8, num_stages=2,
    )


def mla_extend_latent_attention(
    q_latent: torch.Tensor, q_pe: torch.Tensor, kv_buffer: torch.Tensor, out: torch.Tensor,
    req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor, extend_starts: torch.Tensor, max_extend_len: int, scale: float,
) -> None:
    """Absorbed extend over the paged cache (which already holds the new tokens).
    q_latent, out: [T, H, L]; q_pe: [T, H, R]; kv_buffer: [slots, 1, L + R]. Writes out."""
    d_latent = q_latent.shape[2]
    latent, rope = kv_buffer[..., :d_latent], kv_buffer[..., d_latent:]
    _launch_extend(q_latent, q_pe, latent, rope, latent, out, req_to_token, req_pool_indices, prefix_lens,
                   extend_lens, extend_starts, extend_starts, max_extend_len, scale, paged=True, v_is_key_a=True)


def mla_extend_expanded_attention(
    q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, prefix_lens: torch.Tensor, extend_lens: torch.Tensor, extend_starts: torch.Tensor,
    kv_starts: torch.Tensor, max_extend_len: int, scale: float,
) -> None:
    """Expanded extend: each request's keys are rows kv_starts[i] .. + prefix + extend
    of k_nope [S, H, nope], k_pe [S, R] (shared by the heads), v [S, H, V].
    q_nope [T, H, nope], q_pe [T, H, R], out [T, H, V]. Writes out."""
    unused = extend_starts  # no request table: keys are packed rows
    _launch_extend(q_nope, q_pe, k_nope, k_pe[:, None, :], v, out, unused, unused, prefix_lens, extend_lens,
                   extend_starts, kv_starts, max_extend_len, scale, paged=False, v_is_key_a=False)
