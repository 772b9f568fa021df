"""The experts of one MoE layer in Triton: one grouped GEMM launch per projection.

Each token's K expert choices are T*K (token, k) pairs. The pairs are first
grouped by expert and every expert's run is padded to a multiple of BLOCK_M,
so a block of BLOCK_M sorted rows belongs to one expert; each GEMM program
then multiplies one block of rows by one expert's weight tile. The grouping
runs on the device and every buffer is sized by an upper bound that depends
on T, K and E only, so the whole call can be captured in a CUDA graph: the
GEMMs read the real number of padded rows on the device and skip the rest.

Rounding follows fused_experts_torch: gate_up and the expert output are
rounded to the input dtype, the activation is computed in float32, the
routing weight multiplies in float32, and the K outputs of a token are summed
in float32. One rounding more: each weighted expert output is stored in the
input dtype before that sum (exact for float32; for 16-bit inputs it halves
the bytes of the [T*K, H] buffer at a cost of one rounding).

Block-FP8 experts (DeepSeek-V3's, `ExpertBlockScales`): the GEMM steps
through K one scale group (B1 columns) at a time and scales each step's
product by the weight's block scales; past a decode's 16 tokens the
activations are quantized per token and per group first
(block_fp8_kernels.quantize_groups_fp8) and the product is FP8 x FP8 on the
tensor cores, scaled by both; up to 16 tokens they stay as they are and the
FP8 weight tile is widened in registers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple

import torch
import triton
import triton.language as tl

from radixserve.layers import block_fp8_kernels
from radixserve.layers.block_fp8 import WEIGHT_ONLY_MAX_ROWS
from radixserve.layers.moe import few_token_experts
from radixserve.layers.moe.activation import ExpertActivation
from radixserve.layers.moe.expert_math import activate, cast
from radixserve.layers.triton_utils import dot, dot_block, exact_dot

if TYPE_CHECKING:
    from radixserve.layers.moe.layer import ExpertBlockScales

@dataclass(frozen=True)
class MoeKernelConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# (largest token count, config) for 16-bit weights on Hopper. Few tokens per
# expert: small BLOCK_M wastes little on padding and the kernel is bound by
# reading weights; many tokens: large tiles reuse each weight tile across rows.
_CONFIGS_16BIT = (
    (16, MoeKernelConfig(16, 64, 128, 4, 4)),
    (128, MoeKernelConfig(16, 128, 128, 4, 3)),
    (512, MoeKernelConfig(32, 128, 64, 4, 4)),
    (2048, MoeKernelConfig(64, 128, 64, 4, 4)),
    (None, MoeKernelConfig(128, 128, 64, 8, 4)),
)
# float32 tiles are twice the bytes: a shorter K step keeps them in shared memory.
_CONFIGS_32BIT = (
    (16, MoeKernelConfig(16, 64, 32, 4, 2)),
    (512, MoeKernelConfig(32, 64, 32, 4, 2)),
    (None, MoeKernelConfig(64, 64, 32, 4, 2)),
)


def moe_kernel_config(num_tokens: int, dtype: torch.dtype, batch_invariant: bool = False) -> MoeKernelConfig:
    """The tile sizes for a batch of num_tokens tokens (a host int: the choice
    is fixed per CUDA graph). batch_invariant: one configuration for every
    batch (its last row), so a token's sums never change their grouping."""
    table = _CONFIGS_32BIT if dtype == torch.float32 else _CONFIGS_16BIT
    if batch_invariant:
        return table[-1][1]
    for max_tokens, config in table:
        if max_tokens is None or num_tokens <= max_tokens:
            return config
    raise AssertionError("the last row of a config table has no bound")


@dataclass
class AlignedPairs:
    """The (token, k) pairs grouped by expert, each expert's run padded to BLOCK_M.

    sorted_pair_ids[r] is the flat pair index t*K + k of sorted row r, or
    num_pairs on a padding row; block_expert_ids[b] is the expert of rows
    b*BLOCK_M ... (b+1)*BLOCK_M - 1; num_padded_rows ([1], int32) counts the
    valid rows. Entries past num_padded_rows are left unwritten."""

    sorted_pair_ids: torch.Tensor
    block_expert_ids: torch.Tensor
    num_padded_rows: torch.Tensor
    block_m: int


# The pair count varies with every batch: not specialised on (1, multiples of
# 16), so each tile configuration is one compiled variant (kernel_warmup.py).
@triton.jit(do_not_specialize=["num_pairs"])
def _align_kernel(
    topk_ids_ptr, sorted_pair_ids_ptr, block_expert_ids_ptr, num_padded_rows_ptr, num_pairs,
    NUM_EXPERTS: tl.constexpr, NUM_BINS: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
):
    # One program per expert. Each counts every expert's pairs (all it needs to
    # know where its run starts), then writes its own pairs in pair order.
    expert = tl.program_id(0)
    lanes = tl.arange(0, CHUNK)
    counts = tl.zeros([NUM_BINS], tl.int32)
    for start in range(0, num_pairs, CHUNK):
        idx = start + lanes
        in_range = idx < num_pairs
        ids = tl.load(topk_ids_ptr + idx, mask=in_range, other=0).to(tl.int32)
        counts += tl.histogram(ids, NUM_BINS, mask=in_range)
    bins = tl.arange(0, NUM_BINS)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    run_start = tl.sum(tl.where(bins < expert, padded, 0), 0)
    run_padded = tl.sum(tl.where(bins == expert, padded, 0), 0)
    if expert == 0:
        tl.store(num_padded_rows_ptr, tl.sum(padded, 0))

    placed = run_start
    for start in range(0, num_pairs, CHUNK):
        idx = start + lanes
        ids = tl.load(topk_ids_ptr + idx, mask=idx < num_pairs, other=-1)
        mine = (ids == expert).to(tl.int32)
        rank = tl.cumsum(mine, 0)  # inclusive: the first of mine gets 1
        tl.store(sorted_pair_ids_ptr + placed + rank - 1, idx, mask=mine != 0)
        placed += tl.sum(mine, 0)
    pad_rows = placed + tl.arange(0, BLOCK_M)
    tl.store(sorted_pair_ids_ptr + pad_rows, num_pairs, mask=pad_rows < run_start + run_padded)

    first_block = run_start // BLOCK_M
    for b0 in range(0, run_padded // BLOCK_M, CHUNK):
        blocks = b0 + lanes
        tl.store(block_expert_ids_ptr + first_block + blocks, expert, mask=blocks < run_padded // BLOCK_M)


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """An upper bound of the padded row count, a multiple of block_m: at most
    min(pairs, experts) experts have a partly filled last block."""
    bound = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    return triton.cdiv(bound, block_m) * block_m


def align_pairs_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedPairs:
    """Group the [T, K] expert choices by expert ("moe align block size"), on
    the device without a host sync; shapes depend on T, K and E only."""
    num_pairs = topk_ids.numel()
    rows = max_padded_rows(num_pairs, num_experts, block_m)
    device = topk_ids.device
    aligned = AlignedPairs(
        sorted_pair_ids=torch.empty(rows, dtype=torch.int32, device=device),
        block_expert_ids=torch.empty(rows // block_m, dtype=torch.int32, device=device),
        num_padded_rows=torch.empty(1, dtype=torch.int32, device=device),
        block_m=block_m,
    )
    chunk = min(1024, dot_block(num_pairs))
    _align_kernel[(num_experts,)](
        topk_ids.contiguous(), aligned.sorted_pair_ids, aligned.block_expert_ids, aligned.num_padded_rows,
        num_pairs, NUM_EXPERTS=num_experts, NUM_BINS=triton.next_power_of_2(num_experts),
        BLOCK_M=block_m, CHUNK=chunk, num_warps=4,
    )
    return aligned


@triton.jit(do_not_specialize=["num_pairs"])  # (as _align_kernel)
def _grouped_gemm_kernel(
    a_ptr, w_ptr, bias_ptr, out_ptr, routing_weights_ptr, a_scale_ptr, w_scale_ptr,
    sorted_pair_ids_ptr, block_expert_ids_ptr, num_padded_rows_ptr,
    num_pairs, n_out, k_dim, k_groups,
    stride_am, stride_we, stride_wn, stride_be, stride_om, stride_se,
    PAIRS_PER_A_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, WEIGHTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
    SCALE_BLOCK_N: tl.constexpr, QUANTIZED_A: tl.constexpr,
):
    """out[pair] = a[pair // PAIRS_PER_A_ROW] @ w[expert]^T (+ bias[expert]),
    rounded to out's dtype, times the pair's routing weight when WEIGHTED.
    SCALE_BLOCK_N > 0: w is block-FP8, one scale per SCALE_BLOCK_N rows and
    BLOCK_K columns (w_scale [E, ceil(N/SCALE_BLOCK_N), k_groups]); each K
    step's product is scaled by its block scales, and with QUANTIZED_A by a's
    per-row group scales too (a_scale [rows, k_groups], a in E4M3)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_rows_ptr):
        return
    pair = tl.load(sorted_pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_mask = pair < num_pairs
    a_row = (pair // PAIRS_PER_A_ROW).to(tl.int64)
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_out
    ks = tl.arange(0, BLOCK_K)
    # Unit stride along K (the launcher ensures it) lets loads vectorise and pipeline.
    a_ptrs = a_ptr + a_row[:, None] * stride_am + ks[None, :]
    w_ptrs = w_ptr + expert * stride_we + cols[None, :] * stride_wn + ks[:, None]

    if SCALE_BLOCK_N:
        w_scale_ptrs = w_scale_ptr + expert * stride_se + (cols // SCALE_BLOCK_N) * k_groups
        a_scale_ptrs = a_scale_ptr + a_row * k_groups

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        k_mask = ks < k_dim - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if SCALE_BLOCK_N:  # one K step is one group of block scales
            w_scale = tl.load(w_scale_ptrs + k0 // BLOCK_K, mask=col_mask, other=0.0)
            if QUANTIZED_A:  # FP8 x FP8 on the tensor cores
                a_scale = tl.load(a_scale_ptrs + k0 // BLOCK_K, mask=row_mask, other=0.0)
                acc += dot(a, w, IEEE) * a_scale[:, None] * w_scale[None, :]
            else:  # the FP8 weight widened to a's dtype
                acc += dot(a, w.to(a.dtype), IEEE) * w_scale[None, :]
        else:
            acc += dot(a, w, IEEE)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * stride_be + cols, mask=col_mask, other=0.0).to(tl.float32)
    out = cast(acc, out_ptr.dtype.element_ty)
    if WEIGHTED:
        weight = tl.load(routing_weights_ptr + pair, mask=row_mask, other=0.0)
        out = cast(out.to(tl.float32) * weight[:, None], out_ptr.dtype.element_ty)
    out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, out, mask=row_mask[:, None] & col_mask[None, :])


def _unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@dataclass(frozen=True)
class GemmScales:
    """Block scales for one grouped GEMM: the weight's [E, ceil(N/B0),
    ceil(K/B1)], and the activations' [rows, ceil(K/B1)] when a is E4M3."""

    weight: torch.Tensor
    block: Tuple[int, int]
    activations: Optional[torch.Tensor] = None


def _grouped_gemm(
    a: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor,
    aligned: AlignedPairs, config: MoeKernelConfig, pairs_per_a_row: int,
    routing_weights: Optional[torch.Tensor] = None, scales: Optional[GemmScales] = None,
) -> None:
    """out [pairs, N] from a [rows, K] and w [E, N, K], one launch for all experts."""
    n_out, k_dim = w.shape[1], w.shape[2]
    a, w = _unit_stride_rows(a), _unit_stride_rows(w)
    bias = _unit_stride_rows(bias) if bias is not None else None
    # Tiles no wider than the problem: the interpreter's cost grows with tile area.
    block_n = min(config.block_n, dot_block(n_out))
    # A block-scaled weight steps through K one scale group at a time.
    block_k = min(config.block_k, dot_block(k_dim)) if scales is None else scales.block[1]
    w_scale = scales.weight.contiguous() if scales is not None else w
    quantized_a = scales is not None and scales.activations is not None
    a_scale = scales.activations if quantized_a else w_scale
    grid = (aligned.block_expert_ids.numel(), triton.cdiv(n_out, block_n))
    _grouped_gemm_kernel[grid](
        a, w, bias if bias is not None else w, out,
        routing_weights if routing_weights is not None else out, a_scale, w_scale,
        aligned.sorted_pair_ids, aligned.block_expert_ids, aligned.num_padded_rows,
        out.shape[0], n_out, k_dim, triton.cdiv(k_dim, block_k),
        a.stride(0), w.stride(0), w.stride(1),
        bias.stride(0) if bias is not None else 0, out.stride(0), w_scale.stride(0),
        PAIRS_PER_A_ROW=pairs_per_a_row, HAS_BIAS=bias is not None, WEIGHTED=routing_weights is not None,
        BLOCK_M=aligned.block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        IEEE=exact_dot(a.dtype) or (quantized_a and block_k < block_fp8_kernels.MIN_FP8_DOT_K),
        SCALE_BLOCK_N=scales.block[0] if scales is not None else 0,
        QUANTIZED_A=quantized_a,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def _gemm_input(a: torch.Tensor, weight_scale: Optional[torch.Tensor], block: Optional[Tuple[int, int]],
                num_tokens: int) -> Tuple[torch.Tensor, Optional[GemmScales]]:
    """What a grouped GEMM reads for activations a: a itself, or for block-FP8
    experts past a decode's few tokens, a quantized per token and per B1
    columns (a decode step is bound by reading the weights: a stays unquantized)."""
    if weight_scale is None:
        return a, None
    block_fp8_kernels.check_group(block[1])  # (the K step is one group)
    if num_tokens <= WEIGHT_ONLY_MAX_ROWS:
        return a, GemmScales(weight_scale, block)
    aq, a_scale = block_fp8_kernels.quantize_groups_fp8(a, block[1])
    return aq, GemmScales(weight_scale, block, a_scale)


@triton.jit
def _gated_activation_kernel(
    gate_up_ptr, out_ptr, inter, stride_in, stride_out, alpha, limit,
    SWIGLU_OAI: tl.constexpr, HAS_LIMIT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = activate(gate, up, alpha, limit, SWIGLU_OAI, HAS_LIMIT)
    tl.store(out_ptr + row * stride_out + cols, cast(out, out_ptr.dtype.element_ty), mask=mask)


def gated_activation(gate_up: torch.Tensor, activation: ExpertActivation) -> torch.Tensor:
    """[N, 2I] -> [N, I]: apply_activation's math in one kernel."""
    if activation.kind not in ("silu", "swiglu_oai"):
        raise ValueError(f"unknown expert activation {activation.kind!r}")
    gate_up = _unit_stride_rows(gate_up)
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(inter))
    limit = activation.limit
    _gated_activation_kernel[(rows, triton.cdiv(inter, block))](
        gate_up, out, inter, gate_up.stride(0), out.stride(0), activation.alpha,
        0.0 if limit is None else limit,
        SWIGLU_OAI=activation.kind == "swiglu_oai", HAS_LIMIT=limit is not None, BLOCK=block, num_warps=4,
    )
    return out


def few_tokens(num_tokens: int, block_scales: Optional["ExpertBlockScales"], batch_invariant: bool) -> bool:
    """Whether fused_experts_triton takes the few-token GEMVs (few_token_experts.py)."""
    return num_tokens <= few_token_experts.FEW_TOKENS_MAX and block_scales is None and not batch_invariant


def fused_experts_triton(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: ExpertActivation,
    w13_bias: Optional[torch.Tensor] = None,
    w2_bias: Optional[torch.Tensor] = None,
    batch_invariant: bool = False,
    block_scales: Optional["ExpertBlockScales"] = None,
    shared: Optional[few_token_experts.SharedExperts] = None,
) -> torch.Tensor:
    """sum_k weight[t, k] * expert_{id[t, k]}(hidden[t]); the arguments and
    rounding of fused_experts_torch. No host sync: CUDA-graph capturable.
    block_scales: w13 and w2 are block-FP8 (layers/moe/layer.py).
    shared: shared experts added as extra slots (few tokens only: `few_tokens`)."""
    num_tokens, top_k = topk_ids.shape
    if num_tokens == 0:
        return torch.empty_like(hidden)
    if few_tokens(num_tokens, block_scales, batch_invariant):
        return few_token_experts.fused_experts_few_tokens(
            hidden, w13, w2, topk_weights, topk_ids, activation, w13_bias, w2_bias, shared)
    if shared is not None:
        raise ValueError(f"shared expert slots need the few-token kernels, not {num_tokens} tokens")
    num_experts, inter = w13.shape[0], w2.shape[2]
    config = moe_kernel_config(num_tokens, hidden.dtype, batch_invariant)
    aligned = align_pairs_by_expert(topk_ids, num_experts, config.block_m)
    num_pairs = num_tokens * top_k

    block, w13_scale, w2_scale = (block_scales.block, block_scales.w13, block_scales.w2) \
        if block_scales is not None else (None, None, None)
    gate_up = torch.empty((num_pairs, 2 * inter), dtype=hidden.dtype, device=hidden.device)
    a, scales = _gemm_input(hidden, w13_scale, block, num_tokens)
    _grouped_gemm(a, w13, w13_bias, gate_up, aligned, config, pairs_per_a_row=top_k, scales=scales)
    act = gated_activation(gate_up, activation)
    down = torch.empty((num_pairs, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
    a, scales = _gemm_input(act, w2_scale, block, num_tokens)
    _grouped_gemm(a, w2, w2_bias, down, aligned, config, pairs_per_a_row=1,
                  routing_weights=topk_weights.contiguous().view(-1).float(), scales=scales)
    down = down.view(num_tokens, top_k, -1)
    if batch_invariant:  # a library reduction may regroup the sum with the batch size
        total = down[:, 0].float()
        for k in range(1, top_k):
            total += down[:, k]
        return total.to(hidden.dtype)
    return down.sum(dim=1, dtype=torch.float32).to(hidden.dtype)
