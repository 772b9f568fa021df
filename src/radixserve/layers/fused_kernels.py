"""Fused Triton kernels for the small per-layer ops on CUDA.

In plain torch, RMSNorm with its residual add is about eight kernels, SiLU-and-mul
three and the rotary embedding a dozen. At small batch sizes each kernel costs
a few microseconds whatever its size, so for a 32-layer model they add up to
milliseconds per decode step. Each op here is one kernel that rounds where the
torch version rounds (the residual sum and the normalised value are cast to
the input dtype before use), so both paths agree to float rounding.
"""

from __future__ import annotations

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


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cos_sin_ptr, q_norm_ptr, k_norm_ptr, eps,
    q_stride, k_stride, q_head_stride, k_head_stride, num_q_heads, num_k_heads,
    HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr, HAS_NORM: tl.constexpr, INTERLEAVED: tl.constexpr = False,
    USE_PDL: tl.constexpr = False,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    half = HEAD_DIM // 2
    offs = tl.arange(0, HALF_BLOCK)
    mask = offs < half
    pdl_wait(USE_PDL)
    pos = tl.load(pos_ptr + token)
    cos = tl.load(cos_sin_ptr + pos * HEAD_DIM + offs, mask=mask, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * HEAD_DIM + half + offs, mask=mask, other=0.0)
    if head < num_q_heads:
        src = q_ptr + token * q_stride + head * q_head_stride
        dst = q_out_ptr + (token * num_q_heads + head) * HEAD_DIM
        norm_ptr = q_norm_ptr
    else:
        src = k_ptr + token * k_stride + (head - num_q_heads) * k_head_stride
        dst = k_out_ptr + (token * num_k_heads + head - num_q_heads) * HEAD_DIM
        norm_ptr = k_norm_ptr
    if INTERLEAVED:  # pairs (x0, x1), (x2, x3), ... rotate: read evens and odds, write [evens | odds]
        x1 = tl.load(src + 2 * offs, mask=mask, other=0.0)
        x2 = tl.load(src + 2 * offs + 1, mask=mask, other=0.0)
    else:
        x1 = tl.load(src + offs, mask=mask, other=0.0)
        x2 = tl.load(src + half + offs, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    if HAS_NORM:  # the head's RMSNorm first, rounded where RMSNorm rounds
        rstd = tl.rsqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / HEAD_DIM + eps)
        w1 = tl.load(norm_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w2 = tl.load(norm_ptr + half + offs, mask=mask, other=0.0).to(tl.float32)
        a = ((a * rstd).to(x1.dtype).to(tl.float32) * w1).to(x1.dtype).to(tl.float32)
        b = ((b * rstd).to(x1.dtype).to(tl.float32) * w2).to(x1.dtype).to(tl.float32)
    tl.store(dst + offs, (a * cos - b * sin).to(x1.dtype), mask=mask)
    tl.store(dst + half + offs, (b * cos + a * sin).to(x1.dtype), mask=mask)


def rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor, head_dim: int,
    head_norms: Optional[Tuple[torch.Tensor, torch.Tensor, float]] = None, interleaved: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotation of q [T, H*D] and k [T, KH*D] by the float32 table
    cos_sin [max_pos, D] = [cos | sin]; q and k may also be [T, H, D] and
    [T, KH, D] (or [T, D]), any view whose last axis is contiguous. Returns
    contiguous [T, H*D] and [T, KH*D]. head_norms (q weight [D], k weight [D],
    eps): each head RMS-normalised first, in the same kernel (Qwen3's q/k norms:
    two kernels and two copies fewer). interleaved: the pairs that rotate are
    (x0, x1), (x2, x3), ... (DeepSeek's rope); each head comes out as its
    rotated [evens | odds], the layout the torch path makes (rotary.py)."""
    tokens = q.shape[0]
    num_q, num_k = _heads(q, head_dim), _heads(k, head_dim)
    q_out = torch.empty((tokens, num_q * head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((tokens, num_k * head_dim), dtype=k.dtype, device=k.device)
    q_weight, k_weight, eps = head_norms if head_norms is not None else (cos_sin, cos_sin, 0.0)
    if tokens:
        pdl = use_pdl(q.device)
        _rotary_kernel[(tokens, num_q + num_k)](
            q, k, q_out, k_out, positions, cos_sin, q_weight, k_weight, eps,
            q.stride(0), k.stride(0), _head_stride(q, head_dim), _head_stride(k, head_dim), num_q, num_k,
            HEAD_DIM=head_dim, HALF_BLOCK=triton.next_power_of_2(head_dim // 2), HAS_NORM=head_norms is not None,
            INTERLEAVED=interleaved, USE_PDL=pdl, num_warps=1, launch_pdl=pdl,
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
    if LIMIT > 0:  # an FP8 cache: saturate, as to_cache_dtype does
        k = tl.clamp(k.to(tl.float32), -LIMIT, LIMIT)
        v = tl.clamp(v.to(tl.float32), -LIMIT, LIMIT)
    tl.store(k_buf_ptr + slot * buf_stride + k_cols, k.to(k_buf_ptr.dtype.element_ty), mask=k_cols < k_size)
    tl.store(v_buf_ptr + slot * buf_stride + v_cols, v.to(v_buf_ptr.dtype.element_ty), mask=v_cols < v_size)


def store_kv(k: torch.Tensor, v: torch.Tensor, loc: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor) -> None:
    """k_buf[loc] = k and v_buf[loc] = v in one kernel (two index_put kernels in
    torch). k, v: [T, kv_heads, D] with rows possibly strided; buffers contiguous."""
    row_size = k_buf.shape[1] * k_buf.shape[2]
    _store_rows(k, v, loc, k_buf, v_buf, row_size, row_size, row_size)


def store_latent_kv(latent: torch.Tensor, rope: torch.Tensor, loc: torch.Tensor, buf: torch.Tensor) -> None:
    """MLA's cache rows: buf[loc] = latent | rope in one kernel (a concatenation
    and an index_put in torch). latent [T, L], rope [T, R], rows possibly
    strided; buf [slots, 1, L + R] contiguous."""
    lora = latent.shape[1]
    _store_rows(latent, rope, loc, buf, buf.view(-1)[lora:], lora, rope.shape[1], buf.stride(0))


def _store_rows(k: torch.Tensor, v: torch.Tensor, loc: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                k_size: int, v_size: int, buf_stride: int) -> None:
    """Row loc[i] of k_buf and of v_buf (buf_stride elements apart) gets k[i]
    (k_size values) and v[i] (v_size values)."""
    tokens = k.shape[0]
    if tokens:
        limit = torch.finfo(k_buf.dtype).max if k_buf.dtype in FP8_DTYPES else 0.0
        pdl = use_pdl(k.device)
        _store_kv_kernel[(tokens,)](k, v, loc, k_buf, v_buf, k.stride(0), v.stride(0), k_size, v_size, buf_stride,
                                    BLOCK_K=triton.next_power_of_2(k_size), BLOCK_V=triton.next_power_of_2(v_size),
                                    LIMIT=limit, USE_PDL=pdl, num_warps=4, launch_pdl=pdl)
