"""Routing: which experts each token goes to, and with what weight.

Every family scores experts from the router logits and keeps the top k; they
differ in the scoring (softmax or sigmoid), whether the kept weights are
renormalised, and DeepSeek's group-limited choice (first the best groups,
then the best experts inside them). Weights come back in float32, ids in int32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from radixserve.layers.layernorm import DeferredNorm, normed_value


@dataclass(frozen=True)
class RoutingConfig:
    top_k: int
    scoring: str = "softmax"  # "softmax" over all experts, or "sigmoid" per expert
    renormalize: bool = True  # kept weights divided by their sum
    softmax_after_topk: bool = False  # GPT-OSS: top-k of the logits, softmax over those k
    num_groups: int = 1  # DeepSeek: experts split into groups...
    topk_groups: int = 1  # ...and only the best topk_groups groups are eligible
    routed_scaling_factor: float = 1.0  # multiplies the final weights


def float32_router_logits(hidden: Union[torch.Tensor, DeferredNorm], weight: torch.Tensor) -> torch.Tensor:
    """hidden [T, H] times the router weight [E, H], in float32 (DeepSeek's
    router: the choice of experts is sensitive to rounding) -> [T, E] float32.
    A product of two bfloat16 values is exact in float32, so reading them as
    they are and accumulating in float32 is the float32 product: one CUDA row
    takes one GEMV kernel instead of two casts and cuBLAS's two kernels (with a
    DeferredNorm, the norm's too)."""
    if isinstance(hidden, DeferredNorm) and not hidden.foldable():
        hidden = hidden.value()
    row = hidden.x if isinstance(hidden, DeferredNorm) else hidden
    if row.is_cuda and row.shape[0] == 1 and row.stride(-1) == 1 and weight.is_contiguous() \
            and row.dtype == weight.dtype and row.dtype in (torch.bfloat16, torch.float16, torch.float32):
        if isinstance(hidden, DeferredNorm):
            return hidden.fold_into_gemv(weight, out_dtype=torch.float32)
        from radixserve.layers.gemv import gemv  # Triton: imported where it runs

        return gemv(hidden, weight, out_dtype=torch.float32)
    return torch.nn.functional.linear(normed_value(hidden).float(), weight.float())


def select_experts(
    router_logits: torch.Tensor,
    cfg: RoutingConfig,
    correction_bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """[T, E] router logits -> (weights [T, k] float32, expert ids [T, k] int32).

    correction_bias (DeepSeek-V3): added to the scores to choose experts (and
    to rank groups) only; the weights use the unbiased scores.
    On CUDA, routing without groups runs as one kernel (topk_triton.py).
    """
    if router_logits.is_cuda and cfg.num_groups == 1:
        from radixserve.layers.moe.topk_triton import select_experts_triton  # Triton: imported where it runs

        return select_experts_triton(router_logits, cfg, correction_bias)
    logits = router_logits.float()
    if cfg.softmax_after_topk:
        values, ids = torch.topk(logits, cfg.top_k, dim=-1)
        return torch.softmax(values, dim=-1), ids.to(torch.int32)
    scores = torch.softmax(logits, dim=-1) if cfg.scoring == "softmax" else torch.sigmoid(logits)
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if cfg.num_groups > 1:
        choice = _mask_outside_best_groups(choice, cfg, biased=correction_bias is not None)
    _, ids = torch.topk(choice, cfg.top_k, dim=-1)
    weights = scores.gather(1, ids)
    if cfg.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * cfg.routed_scaling_factor, ids.to(torch.int32)


def _mask_outside_best_groups(choice: torch.Tensor, cfg: RoutingConfig, biased: bool) -> torch.Tensor:
    """Scores of experts outside the topk_groups best groups set to -inf.

    A group ranks by its best expert (DeepSeek-V2), or by the sum of its two
    best biased scores when a correction bias is used (DeepSeek-V3)."""
    tokens, experts = choice.shape
    grouped = choice.view(tokens, cfg.num_groups, experts // cfg.num_groups)
    if biased:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.max(dim=-1).values
    best = group_scores.topk(cfg.topk_groups, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return grouped.masked_fill(~keep[:, :, None], float("-inf")).view(tokens, experts)
