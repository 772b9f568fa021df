"""Fused Triton kernels for the small per-layer ops on CUDA.

In plain torch, RMSNorm with its residual add is about eight kernels, SiLU-and-mul
three and the rotary embedding a dozen. At small batch sizes each kernel costs
a few microseconds whatever its size, so for a 32-layer model they add up to
milliseconds per decode step. Each op here is one kernel that rounds where the
torch version rounds (the residual sum and the normalised value are cast to
the input dtype before use), so both paths agree to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from radixserve.layers.triton_utils import pdl_wait, use_pdl
from radixserve.mem_cache.kv_dtype import FP8_DTYPES


@triton.jit
def _rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    x_stride, res_stride, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride passes 2^31 in a long prefill
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    pdl_wait(USE_PDL)
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    normed = (h * rstd).to(x.dtype).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (normed * w.to(tl.float32)).to(x.dtype), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
) -> torch.Tensor | Tuple[torch.Tensor, torch.Tensor]:
    """norm(x) or (norm(x + residual), x + residual); x, residual: [T, hidden]."""
    rows, n = x.shape
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    if rows:
        pdl = use_pdl(x.device)
        _rmsnorm_kernel[(rows,)](
            x, residual if residual is not None else x, weight, out, res_out,
            x.stride(0), residual.stride(0) if residual is not None else 0, n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n), USE_PDL=pdl,
            num_warps=4 if n <= 2048 else 8, launch_pdl=pdl,
        )
    return out if residual is None else (out, res_out)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, n_cols, BLOCK: tl.constexpr):
    # int64: [T, 2I] passes 2^31 elements from T = 74,899 tokens at Llama-8B's I.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * x_stride + n_cols + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g * tl.sigmoid(g)).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate, up] on the last axis, [T, 2I] -> silu(gate) * up, [T, I]."""
    rows, n = x.shape[0], x.shape[1] // 2
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    block = 1024
    if rows:
        _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](x, out, x.stride(0), n, BLOCK=block)
    return out


# (loc as in _store_kv_kernel: any alignment)
@triton.jit(do_not_specialize_on_alignment=["loc_ptr"])
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cos_sin_ptr, q_norm_ptr, k_norm_ptr, eps,
    q_stride, k_stride, q_head_stride, k_head_stride, num_q_heads, num_k_heads,
    v_ptr, v_stride, v_head_stride, loc_ptr, k_buf_ptr, v_buf_ptr,
    HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr, HAS_NORM: tl.constexpr, STORE_KV: tl.constexpr,
    LIMIT: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    half = HEAD_DIM // 2
    offs = tl.arange(0, HALF_BLOCK)
    mask = offs < half
    pdl_wait(USE_PDL)
    cos, sin = _token_cos_sin(pos_ptr, cos_sin_ptr, token, offs, mask, HEAD_DIM)
    if head < num_q_heads:
        src = q_ptr + token * q_stride + head * q_head_stride
        dst = q_out_ptr + (token * num_q_heads + head) * HEAD_DIM
        norm_ptr = q_norm_ptr
    else:
        src = k_ptr + token * k_stride + (head - num_q_heads) * k_head_stride
        dst = k_out_ptr + (token * num_k_heads + head - num_q_heads) * HEAD_DIM
        norm_ptr = k_norm_ptr
    x1, x2 = _rotary_pair(src, offs, mask, half, False)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    if HAS_NORM:  # the head's RMSNorm first, rounded where RMSNorm rounds
        rstd = tl.rsqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / HEAD_DIM + eps)
        w1 = tl.load(norm_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w2 = tl.load(norm_ptr + half + offs, mask=mask, other=0.0).to(tl.float32)
        a = ((a * rstd).to(x1.dtype).to(tl.float32) * w1).to(x1.dtype).to(tl.float32)
        b = ((b * rstd).to(x1.dtype).to(tl.float32) * w2).to(x1.dtype).to(tl.float32)
    r1, r2 = _rotated(a, b, cos, sin, x1)
    tl.store(dst + offs, r1, mask=mask)
    tl.store(dst + half + offs, r2, mask=mask)
    if STORE_KV:  # a key head's program also writes it, and its value head, to the cache row
        if head >= num_q_heads:
            kv_head = head - num_q_heads
            row = tl.load(loc_ptr + token).to(tl.int64) * (num_k_heads * HEAD_DIM) + kv_head * HEAD_DIM
            tl.store(k_buf_ptr + row + offs, _cache_value(r1, LIMIT, k_buf_ptr), mask=mask)
            tl.store(k_buf_ptr + row + half + offs, _cache_value(r2, LIMIT, k_buf_ptr), mask=mask)
            v_src = v_ptr + token * v_stride + kv_head * v_head_stride
            v1, v2 = _rotary_pair(v_src, offs, mask, half, False)
            tl.store(v_buf_ptr + row + offs, _cache_value(v1, LIMIT, v_buf_ptr), mask=mask)
            tl.store(v_buf_ptr + row + half + offs, _cache_value(v2, LIMIT, v_buf_ptr), mask=mask)


@dataclass(frozen=True)
class KVCacheRows:
    """Where a layer's new keys and values go: the rows `loc` [T] of its pool
    buffers k_buf and v_buf [slots, kv_heads, head_dim] (contiguous)."""

    loc: torch.Tensor
    k_buf: torch.Tensor
    v_buf: torch.Tensor


@triton.jit
def _token_cos_sin(pos_ptr, cos_sin_ptr, token, offs, mask, DIM: tl.constexpr):
    """The halves at offs of the token's position's row of the [cos | sin] table [max_pos, DIM]."""
    pos = tl.load(pos_ptr + token)
    cos = tl.load(cos_sin_ptr + pos * DIM + offs, mask=mask, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * DIM + DIM // 2 + offs, mask=mask, other=0.0)
    return cos, sin


@triton.jit
def _rotated(a, b, cos, sin, like):
    """The pair (a, b) (float32) rotated, in like's dtype."""
    return (a * cos - b * sin).to(like.dtype), (b * cos + a * sin).to(like.dtype)


@triton.jit
def _rotary_pair(src, offs, mask, half, INTERLEAVED: tl.constexpr):
    """The two halves that rotate together: x[:half] and x[half:], or with
    INTERLEAVED the pairs (x0, x1), (x2, x3), ... read as evens and odds (the
    output is written [evens | odds])."""
    if INTERLEAVED:
        x1 = tl.load(src + 2 * offs, mask=mask, other=0.0)
        x2 = tl.load(src + 2 * offs + 1, mask=mask, other=0.0)
    else:
        x1 = tl.load(src + offs, mask=mask, other=0.0)
        x2 = tl.load(src + half + offs, mask=mask, other=0.0)
    return x1, x2


def rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor, head_dim: int,
    head_norms: Optional[Tuple[torch.Tensor, torch.Tensor, float]] = None,
    cache: Optional[Tuple[torch.Tensor, KVCacheRows]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotation of q [T, H*D] and k [T, KH*D] by the float32 table
    cos_sin [max_pos, D] = [cos | sin]; q and k may also be [T, H, D] and
    [T, KH, D] (or [T, D]), any view whose last axis is contiguous. Returns
    contiguous [T, H*D] and [T, KH*D]. head_norms (q weight [D], k weight [D],
    eps): each head RMS-normalised first, in the same kernel (Qwen3's q/k norms:
    two kernels and two copies fewer). cache (v [T, KH*D] or [T, KH, D], rows):
    the rotated keys and v also written to the cache rows, as store_kv would
    (one kernel fewer a layer). DeepSeek's interleaved rope is mla_latent_kv's."""
    tokens = q.shape[0]
    num_q, num_k = _heads(q, head_dim), _heads(k, head_dim)
    q_out = torch.empty((tokens, num_q * head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((tokens, num_k * head_dim), dtype=k.dtype, device=k.device)
    q_weight, k_weight, eps = head_norms if head_norms is not None else (cos_sin, cos_sin, 0.0)
    v, rows = cache if cache is not None else (k, KVCacheRows(positions, k_out, k_out))  # unread without a cache
    if cache is not None and (_heads(v, head_dim) != num_k or v.stride(-1) != 1
                              or rows.k_buf.shape[1:] != (num_k, head_dim) or not rows.k_buf.is_contiguous()
                              or rows.v_buf.shape != rows.k_buf.shape or not rows.v_buf.is_contiguous()):
        raise ValueError(f"rotary's cache rows take v of {num_k} heads of {head_dim} and [slots, {num_k}, "
                         f"{head_dim}] buffers, not {tuple(v.shape)} and {tuple(rows.k_buf.shape)}")
    limit = torch.finfo(rows.k_buf.dtype).max if rows.k_buf.dtype in FP8_DTYPES else 0.0
    if tokens:
        pdl = use_pdl(q.device)
        _rotary_kernel[(tokens, num_q + num_k)](
            q, k, q_out, k_out, positions, cos_sin, q_weight, k_weight, eps,
            q.stride(0), k.stride(0), _head_stride(q, head_dim), _head_stride(k, head_dim), num_q, num_k,
            v, v.stride(0), _head_stride(v, head_dim), rows.loc, rows.k_buf, rows.v_buf,
            HEAD_DIM=head_dim, HALF_BLOCK=triton.next_power_of_2(head_dim // 2), HAS_NORM=head_norms is not None,
            STORE_KV=cache is not None, LIMIT=limit, USE_PDL=pdl, num_warps=1, launch_pdl=pdl,
        )
    return q_out, k_out


def _heads(x: torch.Tensor, head_dim: int) -> int:
    return x.shape[1] if x.dim() == 3 else x.shape[1] // head_dim


def _head_stride(x: torch.Tensor, head_dim: int) -> int:
    """Elements from one head to the next: [T, H*D] packs them; [T, H, D] says."""
    return x.stride(1) if x.dim() == 3 else head_dim


# loc may be a slice of the allocator's free-slot list, at any 8-byte offset:
# one variant whatever its alignment (kernel_warmup.py).
@triton.jit(do_not_specialize_on_alignment=["loc_ptr"])
def _store_kv_kernel(k_ptr, v_ptr, loc_ptr, k_buf_ptr, v_buf_ptr, k_stride, v_stride, k_size, v_size, buf_stride,
                     BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, LIMIT: tl.constexpr, USE_PDL: tl.constexpr = False):
    token = tl.program_id(0).to(tl.int64)
    k_cols = tl.arange(0, BLOCK_K)
    v_cols = tl.arange(0, BLOCK_V)
    pdl_wait(USE_PDL)
    slot = tl.load(loc_ptr + token).to(tl.int64)  # a layer's buffer may pass 2^31 elements
    k = tl.load(k_ptr + token * k_stride + k_cols, mask=k_cols < k_size)
    v = tl.load(v_ptr + token * v_stride + v_cols, mask=v_cols < v_size)
    tl.store(k_buf_ptr + slot * buf_stride + k_cols, _cache_value(k, LIMIT, k_buf_ptr), mask=k_cols < k_size)
    tl.store(v_buf_ptr + slot * buf_stride + v_cols, _cache_value(v, LIMIT, v_buf_ptr), mask=v_cols < v_size)


def store_kv(k: torch.Tensor, v: torch.Tensor, loc: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor) -> None:
    """k_buf[loc] = k and v_buf[loc] = v in one kernel (two index_put kernels in
    torch). k, v: [T, kv_heads, D] with rows possibly strided; buffers contiguous."""
    tokens, row_size = k.shape[0], k_buf.shape[1] * k_buf.shape[2]
    if tokens:
        limit = torch.finfo(k_buf.dtype).max if k_buf.dtype in FP8_DTYPES else 0.0
        pdl = use_pdl(k.device)
        block = triton.next_power_of_2(row_size)
        _store_kv_kernel[(tokens,)](k, v, loc, k_buf, v_buf, k.stride(0), v.stride(0), row_size, row_size, row_size,
                                    BLOCK_K=block, BLOCK_V=block, LIMIT=limit, USE_PDL=pdl, num_warps=4,
                                    launch_pdl=pdl)


# (loc as in _store_kv_kernel: any alignment)
@triton.jit(do_not_specialize_on_alignment=["loc_ptr"])
def _mla_latent_kv_kernel(
    q_ptr, kv_a_ptr, pos_ptr, cos_sin_ptr, norm_ptr, loc_ptr, q_out_ptr, latent_out_ptr, k_out_ptr, buf_ptr,
    q_stride, q_head_stride, kv_a_stride, buf_stride, num_heads, eps,
    LORA: tl.constexpr, BLOCK_L: tl.constexpr, ROPE: tl.constexpr, HALF_BLOCK: tl.constexpr,
    INTERLEAVED: tl.constexpr, LIMIT: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    half = ROPE // 2
    offs = tl.arange(0, HALF_BLOCK)
    mask = offs < half
    pdl_wait(USE_PDL)
    cos, sin = _token_cos_sin(pos_ptr, cos_sin_ptr, token, offs, mask, ROPE)
    if head < num_heads:  # a query head's rope part
        x1, x2 = _rotary_pair(q_ptr + token * q_stride + head * q_head_stride, offs, mask, half, INTERLEAVED)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        dst = q_out_ptr + (token * num_heads + head) * ROPE
        q1, q2 = _rotated(a, b, cos, sin, x1)
        tl.store(dst + offs, q1, mask=mask)
        tl.store(dst + half + offs, q2, mask=mask)
    else:  # the token's cache row: the normed latent, then the rotated rope key
        row = buf_ptr + tl.load(loc_ptr + token).to(tl.int64) * buf_stride
        x1, x2 = _rotary_pair(kv_a_ptr + token * kv_a_stride + LORA, offs, mask, half, INTERLEAVED)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        k1, k2 = _rotated(a, b, cos, sin, x1)
        tl.store(k_out_ptr + token * ROPE + offs, k1, mask=mask)
        tl.store(k_out_ptr + token * ROPE + half + offs, k2, mask=mask)
        tl.store(row + LORA + offs, _cache_value(k1, LIMIT, buf_ptr), mask=mask)
        tl.store(row + LORA + half + offs, _cache_value(k2, LIMIT, buf_ptr), mask=mask)
        cols = tl.arange(0, BLOCK_L)
        col_mask = cols < LORA
        x = tl.load(kv_a_ptr + token * kv_a_stride + cols, mask=col_mask, other=0.0)
        h = x.to(tl.float32)  # RMSNorm, rounded where _rmsnorm_kernel rounds
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / LORA + eps)
        w = tl.load(norm_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        latent = ((h * rstd).to(x.dtype).to(tl.float32) * w).to(x.dtype)
        tl.store(latent_out_ptr + token * LORA + cols, latent, mask=col_mask)
        tl.store(row + cols, _cache_value(latent, LIMIT, buf_ptr), mask=col_mask)


@triton.jit
def _cache_value(x, LIMIT: tl.constexpr, buf_ptr):
    """x in the cache's dtype; an FP8 cache saturates (LIMIT > 0), as to_cache_dtype does."""
    if LIMIT > 0:
        x = tl.clamp(x.to(tl.float32), -LIMIT, LIMIT)
    return x.to(buf_ptr.dtype.element_ty)


def mla_latent_kv(
    positions: torch.Tensor, q_pe: torch.Tensor, kv_a: torch.Tensor, norm_weight: torch.Tensor, eps: float,
    cos_sin: torch.Tensor, interleaved: bool, loc: torch.Tensor, buf: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MLA's per-token work between its projections and attention, in one
    kernel (three in torch's order: the latent's RMSNorm, the rotary
    embedding, the cache write): q_pe [T, H, R] (a view of q, last axis
    contiguous) rotated; kv_a = [latent | k_pe] [T, L + R] (rows possibly
    strided): the latent normed by norm_weight, k_pe rotated; and buf[loc] =
    latent | k_pe (buf [slots, 1, L + R] contiguous, any cache dtype).
    Returns q_pe [T, H*R], latent [T, L] and k_pe [T, R], contiguous, each
    head's rope part laid out as `rotary` lays it out."""
    tokens, num_heads, rope = q_pe.shape
    lora = kv_a.shape[1] - rope
    q_out = torch.empty((tokens, num_heads * rope), dtype=q_pe.dtype, device=q_pe.device)
    latent = torch.empty((tokens, lora), dtype=kv_a.dtype, device=kv_a.device)
    k_pe = torch.empty((tokens, rope), dtype=kv_a.dtype, device=kv_a.device)
    if tokens:
        limit = torch.finfo(buf.dtype).max if buf.dtype in FP8_DTYPES else 0.0
        pdl = use_pdl(q_pe.device)
        _mla_latent_kv_kernel[(tokens, num_heads + 1)](
            q_pe, kv_a, positions, cos_sin, norm_weight, loc, q_out, latent, k_pe, buf,
            q_pe.stride(0), q_pe.stride(1), kv_a.stride(0), buf.stride(0), num_heads, eps,
            LORA=lora, BLOCK_L=triton.next_power_of_2(lora), ROPE=rope, HALF_BLOCK=triton.next_power_of_2(rope // 2),
            INTERLEAVED=interleaved, LIMIT=limit, USE_PDL=pdl, num_warps=1, launch_pdl=pdl,
        )
    return q_out, latent, k_pe
