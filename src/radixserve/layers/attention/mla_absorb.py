"""MLA's two per-head products of a small decode step, as GEMVs on CUDA.

The absorbed form (mla.py) moves each query into the latent space,
q_latent[h] = q_nope[h] W_UK[h], and the attention output back out of it,
out[h] = W_UV[h] out_latent[h]. For a few tokens both read every head's slice
of kv_b_proj (DeepSeek-V2-Lite: 2 MB each) and do almost no arithmetic;
cuBLAS's batched GEMMs took 4.6 and 3.3 us a layer on an H100 at batch 1
(docs/results/profile_deepseek_v2_lite_bs1_h100_44ca7ea_2026-12-07.txt);
these took 2.6 and 2.9 us on an H200 (not measured against cuBLAS on that card).
Here each is one Triton launch with programmatic dependent launch: one
program per (token, head, block of outputs), the products summed in float32
and rounded once to the input dtype, as the batched GEMM rounds. A program
reads a tile of TILE elements (8 KB of bfloat16) a step, most often in one
step: at batch 1 the time is a round trip to memory, so many small programs
beat few long ones (V2-Lite: 256 programs each).

W_UK[h] is [nope, lora] (rows of kv_b_proj's head block): the sum runs down
its rows, so a program keeps a block of lora columns. W_UV[h] is [v, lora]:
the sum runs along its rows, so a program keeps a block of v rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixserve.layers.triton_utils import pdl_wait, use_pdl

# Up to this many tokens the GEMVs run; more, and cuBLAS's batched GEMMs
# reuse each weight tile across tokens. A decode step of a small batch.
FEW_TOKENS_MAX = 8
TILE = 4096  # weight elements a program reads a step


@triton.jit
def _query_to_latent_kernel(q_ptr, w_ptr, out_ptr, stride_q_tok, stride_q_head, stride_w_head, num_heads, lora,
                            NOPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
                            USE_PDL: tl.constexpr = False):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    col_mask = cols < lora
    w_head = w_ptr + head.to(tl.int64) * stride_w_head
    q_row = q_ptr + token * stride_q_tok + head * stride_q_head
    pdl_wait(USE_PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_L], tl.float32)
    for n0 in range(0, NOPE, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < NOPE
        w = tl.load(w_head + rows[:, None] * lora + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0)
        q = tl.load(q_row + rows, mask=row_mask, other=0.0)
        acc += w.to(tl.float32) * q.to(tl.float32)[:, None]
    out = tl.sum(acc, axis=0)
    tl.store(out_ptr + (token * num_heads + head) * lora + cols, out.to(out_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _latent_to_value_kernel(x_ptr, w_ptr, out_ptr, stride_x_tok, stride_x_head, stride_w_head, num_heads, lora,
                            V: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_L: tl.constexpr,
                            USE_PDL: tl.constexpr = False):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < V
    w_rows = w_ptr + head.to(tl.int64) * stride_w_head + rows[:, None] * lora
    x_row = x_ptr + token * stride_x_tok + head * stride_x_head
    pdl_wait(USE_PDL)
    acc = tl.zeros([BLOCK_V, BLOCK_L], tl.float32)
    for l0 in range(0, lora, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        col_mask = cols < lora
        w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        x = tl.load(x_row + cols, mask=col_mask, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    out = tl.sum(acc, axis=1)
    tl.store(out_ptr + (token * num_heads + head) * V + rows, out.to(out_ptr.dtype.element_ty), mask=row_mask)


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether these GEMVs serve x [T, H, D] against a head-sliced weight view."""
    return (x.is_cuda and x.shape[0] <= FEW_TOKENS_MAX and x.stride(-1) == 1 and weight.stride(-1) == 1
            and x.dtype == weight.dtype)


def query_to_latent(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """q_nope [T, H, nope] (any strides, last axis contiguous) times w_uk
    [H, nope, lora] (rows lora apart) -> q_latent [T, H, lora], contiguous."""
    tokens, heads, nope = q_nope.shape
    lora = w_uk.shape[2]
    assert w_uk.stride(1) == lora, "W_UK's rows must be lora apart (views of kv_b_proj's weight)"
    out = q_nope.new_empty((tokens, heads, lora))
    block_n = min(triton.next_power_of_2(nope), 128)  # W_UK's rows, all in one step where they fit
    block_l = max(TILE // block_n, 16)
    if tokens:
        pdl = use_pdl(q_nope.device)
        _query_to_latent_kernel[(tokens, heads, triton.cdiv(lora, block_l))](
            q_nope, w_uk, out, q_nope.stride(0), q_nope.stride(1), w_uk.stride(0), heads, lora,
            NOPE=nope, BLOCK_N=block_n, BLOCK_L=block_l, USE_PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out


def latent_to_value(out_latent: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """out_latent [T, H, lora] (last axis contiguous) times w_uv [H, v, lora]
    (rows lora apart), each head's rows against its latent -> [T, H, v], contiguous."""
    tokens, heads, lora = out_latent.shape
    v = w_uv.shape[1]
    assert w_uv.stride(1) == lora, "W_UV's rows must be lora apart (views of kv_b_proj's weight)"
    out = out_latent.new_empty((tokens, heads, v))
    block_l = min(triton.next_power_of_2(lora), 512)  # a whole latent row in one step where it fits
    block_v = max(TILE // block_l, 2)
    if tokens:
        pdl = use_pdl(out_latent.device)
        _latent_to_value_kernel[(tokens, heads, triton.cdiv(v, block_v))](
            out_latent, w_uv, out, out_latent.stride(0), out_latent.stride(1), w_uv.stride(0), heads, lora,
            V=v, BLOCK_V=block_v, BLOCK_L=block_l, USE_PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out
