"""The experts in plain torch: loops over the experts that received tokens.

The reference for the Triton kernel (fused_moe_triton.py) and the CPU path.
"""

from __future__ import annotations

from typing import Optional

import torch

from radixserve.layers.batch_invariant import invariant_linear
from radixserve.layers.cpu_gemm_rows import bucketed_linear
from radixserve.layers.moe.activation import ExpertActivation, apply_activation


def fused_experts_torch(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: ExpertActivation,
    w13_bias: Optional[torch.Tensor] = None,
    w2_bias: Optional[torch.Tensor] = None,
    batch_invariant: bool = False,
) -> torch.Tensor:
    """sum_k weight[t, k] * expert_{id[t, k]}(hidden[t]).

    hidden [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I];
    topk_weights [T, K] float32; topk_ids [T, K] (-1: not on this rank, skipped); biases [E, 2I] and [E, H].
    Each expert's output is rounded to hidden's dtype before it is weighted,
    as the reference implementations do. batch_invariant: each expert's matmuls
    take the library's many-row path whatever number of tokens it received.
    """
    if batch_invariant:
        linear = invariant_linear
    else:  # each expert's row count varies: on the CPU, oneDNN's kernels per bucket
        linear = bucketed_linear
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    flat_ids = topk_ids.flatten().long()
    order = torch.argsort(flat_ids, stable=True)
    # Id -1 (an expert another expert-parallel rank holds) sorts first and is skipped.
    counts = torch.bincount(flat_ids + 1, minlength=w13.shape[0] + 1).tolist()
    token_of = order // topk_ids.shape[1]
    start = counts[0]
    for expert, count in enumerate(counts[1:]):
        if count == 0:
            continue
        rows = order[start:start + count]
        tokens = token_of[start:start + count]
        start += count
        x = hidden[tokens]
        gate_up = linear(x, w13[expert], None if w13_bias is None else w13_bias[expert])
        y = linear(
            apply_activation(gate_up, activation), w2[expert], None if w2_bias is None else w2_bias[expert]
        )
        weight = topk_weights.flatten()[rows].float()[:, None]
        out.index_add_(0, tokens, y.float() * weight)
    return out.to(hidden.dtype)
