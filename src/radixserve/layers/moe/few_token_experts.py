"""The experts of a few tokens (a small decode batch) as GEMVs: two launches.

The grouped GEMM (fused_moe_triton.py) sorts the (token, k) pairs by expert,
pads each expert's run to a tile of 16 rows and multiplies on the tensor
cores: five launches a layer (grouping, gate_up, activation, down, the sum
over k), and for one token every tile is one row of sixteen. A decode step
of a few tokens is bound by reading the chosen experts' weights, not by
arithmetic, and each launch costs more than its work there. So here:

1. gate_up: one program per (pair, BLOCK_N rows of the intermediate), which
   reads those rows of the expert's gate and up projections, multiplies them
   by the token's hidden row and applies the activation: [pairs, I].
2. down: one program per (token, BLOCK_N rows of the output), which reads
   those rows of all k of the token's experts at once and sums their
   weighted outputs.

Shared experts (DeepSeek's, added to every token's output unweighted) can
ride along as extra slots of a token (`SharedExperts`): the shared MLP cut
into pieces of the routed intermediate size, each read by the same programs
as an expert, with routing weight 1. DeepSeek-V2-Lite's 6 routed + 2 shared
slots fill the down kernel's 8-slot tile that held 6.

Rounding is fused_moe_triton's: gate and up rounded to the input dtype
before the activation, each expert's output rounded, then times its routing
weight and rounded again, the k of them summed in float32. Both kernels read
the expert ids on the device: no host sync, CUDA-graph capturable. Past
FEW_TOKENS_MAX tokens, tokens sharing an expert read its weights once each
here against once per tile there, and the grouped GEMM takes over (on an H100,
one Qwen3-30B-A3B layer: 205 against 220 us at 8 tokens, 344 against 304 at 16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from radixserve.layers.gemv import GemvTiles
from radixserve.layers.moe.activation import ExpertActivation
from radixserve.layers.moe.expert_math import activate, cast
from radixserve.layers.triton_utils import pdl_wait, use_pdl

FEW_TOKENS_MAX = 8


@triton.jit
def _gate_up_kernel(
    hidden_ptr, w13_ptr, bias_ptr, ids_ptr, act_ptr, hidden_size, inter,
    stride_h, stride_we, stride_wn, stride_be, alpha, limit, shared_ptr, stride_sn, shared_inter,
    TOP_K: tl.constexpr, SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, SWIGLU_OAI: tl.constexpr, HAS_LIMIT: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)  # the routing kernel before this one wrote the ids
    pair = tl.program_id(0)  # token * SLOTS + slot: the token's k experts, then its shared slots
    token = pair // SLOTS
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < inter
    if SLOTS > TOP_K:
        slot = pair % SLOTS
        shared = slot >= TOP_K
        expert = tl.load(ids_ptr + token * TOP_K + slot, mask=slot < TOP_K, other=0).to(tl.int64)
        routed_rows = w13_ptr + expert * stride_we + rows.to(tl.int64)[:, None] * stride_wn
        # shared slot j: gate rows [j*inter, (j+1)*inter) of the shared MLP's gate|up, up rows shared_inter on
        shared_rows = shared_ptr + ((slot - TOP_K) * inter + rows).to(tl.int64)[:, None] * stride_sn
        gate_rows = tl.where(shared, shared_rows, routed_rows)
        up_rows = gate_rows + tl.where(shared, shared_inter * stride_sn, inter * stride_wn)
    else:
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        gate_rows = w13_ptr + expert * stride_we + rows.to(tl.int64)[:, None] * stride_wn
        up_rows = gate_rows + inter * stride_wn
    x_row = hidden_ptr + token.to(tl.int64) * stride_h
    gate_acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    up_acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < hidden_size
        x = tl.load(x_row + ks, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        mask = row_mask[:, None] & k_mask[None, :]
        gate_acc += tl.load(gate_rows + ks[None, :], mask=mask, other=0.0).to(tl.float32) * x
        up_acc += tl.load(up_rows + ks[None, :], mask=mask, other=0.0).to(tl.float32) * x
    gate = tl.sum(gate_acc, axis=1)
    up = tl.sum(up_acc, axis=1)
    if HAS_BIAS:
        gate += tl.load(bias_ptr + expert * stride_be + rows, mask=row_mask, other=0.0).to(tl.float32)
        up += tl.load(bias_ptr + expert * stride_be + inter + rows, mask=row_mask, other=0.0).to(tl.float32)
    dtype = act_ptr.dtype.element_ty
    out = activate(cast(gate, dtype).to(tl.float32), cast(up, dtype).to(tl.float32), alpha, limit,
                   SWIGLU_OAI, HAS_LIMIT)
    tl.store(act_ptr + pair.to(tl.int64) * inter + rows, cast(out, dtype), mask=row_mask)


@triton.jit
def _down_kernel(
    act_ptr, w2_ptr, bias_ptr, ids_ptr, weights_ptr, out_ptr, hidden_size, inter,
    stride_we, stride_wn, stride_be, stride_o, shared_ptr, stride_sn,
    TOP_K: tl.constexpr, SLOTS: tl.constexpr, K_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    # A program's tile spans all of its token's slots at once, [K_BLOCK,
    # BLOCK_N, BLOCK_K]: their weight rows stream together rather than one
    # expert after another (each a dependent round trip to memory).
    token = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < hidden_size
    slots = tl.arange(0, K_BLOCK)
    slot_mask = slots < SLOTS
    routed = slots < TOP_K
    choices = token * TOP_K + slots  # the routing's (token, k) entries: ids and weights
    # The routing kernel finished before gate_up (the kernel before this one)
    # let this one start: the ids, and so the first weight tile, can be read
    # before waiting for gate_up's activations.
    experts = tl.load(ids_ptr + choices, mask=routed, other=0).to(tl.int64)
    w_rows = w2_ptr + experts[:, None, None] * stride_we + rows.to(tl.int64)[None, :, None] * stride_wn
    if SLOTS > TOP_K:  # shared slot j: columns [j*inter, (j+1)*inter) of the shared down projection
        shared_rows = shared_ptr + rows.to(tl.int64)[None, :, None] * stride_sn \
            + ((slots - TOP_K) * inter).to(tl.int64)[:, None, None]
        w_rows = tl.where(routed[:, None, None], w_rows, shared_rows)
    w_mask = slot_mask[:, None, None] & row_mask[None, :, None]
    a_rows = act_ptr + (token * SLOTS + slots)[:, None, None] * inter
    cols = tl.arange(0, BLOCK_K)[None, None, :]
    w = tl.load(w_rows + cols, mask=w_mask & (cols < inter), other=0.0)
    pdl_wait(USE_PDL)  # gate_up wrote the activations
    acc = tl.zeros([K_BLOCK, BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        ks = k0 + cols
        a = tl.load(a_rows + ks, mask=slot_mask[:, None, None] & (ks < inter), other=0.0)
        acc += w.to(tl.float32) * a.to(tl.float32)
        ks += BLOCK_K  # the next tile's load issued before this one's sum (past the end: all masked)
        w = tl.load(w_rows + ks, mask=w_mask & (ks < inter), other=0.0)
    out = tl.sum(acc, axis=2)  # [K_BLOCK, BLOCK_N]
    if HAS_BIAS:
        out += tl.load(bias_ptr + experts[:, None] * stride_be + rows[None, :],
                       mask=routed[:, None] & row_mask[None, :], other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    routing_weights = tl.load(weights_ptr + choices, mask=routed, other=0.0)
    if SLOTS > TOP_K:
        routing_weights = tl.where(routed, routing_weights, 1.0)  # shared experts are not weighted
    weighted = cast(cast(out, dtype).to(tl.float32) * routing_weights[:, None], dtype)
    total = tl.sum(weighted.to(tl.float32), axis=0)  # the slots' outputs, in float32
    tl.store(out_ptr + token * stride_o + rows, cast(total, dtype), mask=row_mask)


def gate_up_tiles(hidden_size: int) -> GemvTiles:
    """gate_up's tiles: 1 row of gate and 1 of up, up to 1,024 columns a step,
    4 warps, the K loop pipelined over 2 stages. On an H100
    (bench/moe_kernel_bench.py --tile-grid: 12 gate_up tiles with down's
    fixed) one Qwen3-30B-A3B layer's experts at 1 token took 33.6 us against
    40.6 with 2 rows a program; DeepSeek-V2-Lite's 47.6 against 50.6."""
    return GemvTiles(block_n=1, block_k=min(1024, triton.next_power_of_2(hidden_size)), num_warps=4, num_stages=2)


def down_tiles(inter: int) -> GemvTiles:
    """down's tiles: 2 output rows of each of the k experts (a tile of k x 2 x
    256 weights a step), 8 warps: of 16 down tiles with gate_up's fixed, the
    best summed over both shapes at 1 token on an H100 (Qwen3-30B-A3B 34.4 us,
    DeepSeek-V2-Lite 47.5)."""
    return GemvTiles(block_n=2, block_k=min(256, triton.next_power_of_2(inter)), num_warps=8)


@dataclass(frozen=True)
class SharedExperts:
    """Shared experts (DeepSeek's: every token's output adds them, unweighted)
    as extra slots of a token's experts: gate_up [2 * S * I, H] (gate rows,
    then up rows) and down [H, S * I], S whole experts' worth of the routed
    experts' intermediate size I. Slot j runs rows [j*I, (j+1)*I) of gate and
    up and the same columns of down, so the sum over the S slots is the shared
    MLP's output, each slot's part rounded as an expert's is."""

    gate_up: torch.Tensor
    down: torch.Tensor

    def slots(self, inter: int) -> int:
        """S for routed experts of intermediate size `inter`; ValueError if the
        shared intermediate size is not a multiple of it."""
        shared_inter = self.down.shape[1]
        if shared_inter % inter or self.gate_up.shape[0] != 2 * shared_inter:
            raise ValueError(f"shared experts of intermediate size {shared_inter} (gate|up "
                             f"{tuple(self.gate_up.shape)}) are not whole experts of intermediate size {inter}")
        return shared_inter // inter


def fused_experts_few_tokens(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: ExpertActivation,
    w13_bias: Optional[torch.Tensor] = None,
    w2_bias: Optional[torch.Tensor] = None,
    shared: Optional[SharedExperts] = None,
) -> torch.Tensor:
    """fused_experts_triton's result for a few tokens of 16- or 32-bit experts,
    plus the shared experts' output when `shared` is given (extra slots of the
    same two launches: no kernels of their own)."""
    if activation.kind not in ("silu", "swiglu_oai"):
        raise ValueError(f"unknown expert activation {activation.kind!r}")
    num_tokens, top_k = topk_ids.shape
    hidden_size, inter = hidden.shape[1], w2.shape[2]
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    w13, w2 = w13.contiguous(), w2.contiguous()
    ids = topk_ids.contiguous()
    slots = top_k
    if shared is not None:
        if w13_bias is not None or w2_bias is not None or activation.kind != "silu":
            raise ValueError("shared expert slots take SiLU experts without biases")
        slots += shared.slots(inter)
        shared_gate_up, shared_down = shared.gate_up.contiguous(), shared.down.contiguous()
    else:
        shared_gate_up, shared_down = w13, w2  # unread
    act = torch.empty((num_tokens * slots, inter), dtype=hidden.dtype, device=hidden.device)
    tiles = gate_up_tiles(hidden_size)
    pdl = use_pdl(hidden.device)
    _gate_up_kernel[(num_tokens * slots, triton.cdiv(inter, tiles.block_n))](
        hidden, w13, w13_bias if w13_bias is not None else w13, ids, act, hidden_size, inter,
        hidden.stride(0), w13.stride(0), w13.stride(1), w13_bias.stride(0) if w13_bias is not None else 0,
        activation.alpha, 0.0 if activation.limit is None else activation.limit,
        shared_gate_up, shared_gate_up.stride(0), (slots - top_k) * inter,
        TOP_K=top_k, SLOTS=slots, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, HAS_BIAS=w13_bias is not None,
        SWIGLU_OAI=activation.kind == "swiglu_oai", HAS_LIMIT=activation.limit is not None, USE_PDL=pdl,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, launch_pdl=pdl,
    )
    out = torch.empty((num_tokens, hidden_size), dtype=hidden.dtype, device=hidden.device)
    tiles = down_tiles(inter)
    _down_kernel[(num_tokens, triton.cdiv(hidden_size, tiles.block_n))](
        act, w2, w2_bias if w2_bias is not None else w2, ids, topk_weights.float().contiguous(), out,
        hidden_size, inter, w2.stride(0), w2.stride(1), w2_bias.stride(0) if w2_bias is not None else 0,
        out.stride(0), shared_down, shared_down.stride(0), TOP_K=top_k, SLOTS=slots,
        K_BLOCK=triton.next_power_of_2(slots), BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        HAS_BIAS=w2_bias is not None, USE_PDL=pdl, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        launch_pdl=pdl,
    )
    return out
