"""Routing in one Triton kernel: scores, top-k, renormalisation and scaling of
a token's router logits by one program.

topk.select_experts in torch is 6-8 small kernels (softmax, topk, gather,
sum, divide, scale, casts) per MoE layer; in a batch-1 decode step, where
each kernel costs its launch more than its work, that is a visible share of
the step. This kernel covers every routing without expert groups (Qwen-MoE,
Mixtral, GPT-OSS, DeepSeek-V2-Lite; a sigmoid score with a correction bias
too); group-limited routing stays in torch.

The k choices come out best first, as torch.topk's; among equal scores the
lower expert id wins.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from radixserve.layers.moe.topk import RoutingConfig
from radixserve.layers.triton_utils import pdl_wait, use_pdl


@triton.jit
def _routing_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, num_experts, stride_row, scaling,
    TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr, SOFTMAX_AFTER_TOPK: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)  # the router's product is the kernel before this one
    row = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    valid = experts < num_experts
    logits = tl.load(logits_ptr + row * stride_row + experts, mask=valid, other=float("-inf")).to(tl.float32)
    if SOFTMAX_AFTER_TOPK:  # the softmax runs over the k chosen logits below
        scores = logits
    elif SIGMOID:
        scores = tl.sigmoid(logits)
    else:
        exps = tl.where(valid, tl.exp(logits - tl.max(logits, 0)), 0.0)
        scores = exps / tl.sum(exps, 0)
    choice = scores
    if HAS_BIAS:  # the bias picks the experts; the weights stay unbiased
        choice = scores + tl.load(bias_ptr + experts, mask=valid, other=0.0).to(tl.float32)
    # NaN logits (a diverged hidden state) choose like -inf: every id stays a
    # real expert's, so the experts' kernels never read outside the weights.
    choice = tl.where(valid & (choice == choice), choice, float("-inf"))

    slots = tl.arange(0, BLOCK_K)
    kept = tl.zeros([BLOCK_K], tl.float32)
    kept_ids = tl.zeros([BLOCK_K], tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(choice, 0)
        best_id = tl.min(tl.where(choice == best, experts, BLOCK_E), 0)
        kept = tl.where(slots == k, tl.sum(tl.where(experts == best_id, scores, 0.0), 0), kept)
        kept_ids = tl.where(slots == k, best_id, kept_ids)
        choice = tl.where(experts == best_id, float("-inf"), choice)

    in_k = slots < TOP_K
    if SOFTMAX_AFTER_TOPK:
        exps = tl.where(in_k, tl.exp(kept - tl.max(tl.where(in_k, kept, float("-inf")), 0)), 0.0)
        kept = exps / tl.sum(exps, 0)
    elif RENORMALIZE:
        kept = kept / tl.sum(tl.where(in_k, kept, 0.0), 0)
    tl.store(weights_ptr + row * TOP_K + slots, kept * scaling, mask=in_k)
    tl.store(ids_ptr + row * TOP_K + slots, kept_ids, mask=in_k)


def select_experts_triton(
    router_logits: torch.Tensor, cfg: RoutingConfig, correction_bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """select_experts (topk.py) in one kernel for routing without expert
    groups: (weights [T, k] float32, expert ids [T, k] int32)."""
    if cfg.num_groups != 1:
        raise ValueError("group-limited routing is not fused: use topk.select_experts")
    tokens, num_experts = router_logits.shape
    if router_logits.stride(-1) != 1:
        router_logits = router_logits.contiguous()
    weights = torch.empty((tokens, cfg.top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((tokens, cfg.top_k), dtype=torch.int32, device=router_logits.device)
    if tokens == 0:
        return weights, ids
    block_e = triton.next_power_of_2(num_experts)
    pdl = use_pdl(router_logits.device)
    _routing_kernel[(tokens,)](
        router_logits, correction_bias if correction_bias is not None else router_logits, weights, ids,
        num_experts, router_logits.stride(0),
        1.0 if cfg.softmax_after_topk else cfg.routed_scaling_factor,  # (as topk.select_experts)
        TOP_K=cfg.top_k, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(cfg.top_k),
        SIGMOID=cfg.scoring == "sigmoid", HAS_BIAS=correction_bias is not None,
        RENORMALIZE=cfg.renormalize, SOFTMAX_AFTER_TOPK=cfg.softmax_after_topk, USE_PDL=pdl,
        num_warps=1 if block_e <= 256 else 4, launch_pdl=pdl,
    )
    return weights, ids
