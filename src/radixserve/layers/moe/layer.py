"""FusedMoE: all experts of one layer as two stacked weights, run in one call.

w13 [E, 2I, H] holds each expert's gate rows then up rows; w2 [E, H, I] its
down projection. On CUDA the Triton kernel runs every expert in one launch
per projection; elsewhere the torch loop does (both: fused_experts below).
A block-FP8 checkpoint's experts (layers/block_fp8.py) are E4M3 with one
float32 scale per block, w13_scale [E, ceil(2I/B0), ceil(H/B1)] and w2_scale
[E, ceil(H/B0), ceil(I/B1)] (`ExpertBlockScales`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple

import torch
from torch import nn

from radixserve.distributed import get_parallel_config, get_tp_group
from radixserve.layers.moe.activation import ExpertActivation
from radixserve.layers.sharding import ShardSlice, block_scale_slice, copy_checkpoint_tensor
from radixserve.layers.moe.torch_experts import fused_experts_torch

if TYPE_CHECKING:
    from radixserve.layers.moe.few_token_experts import SharedExperts


@dataclass(frozen=True)
class ExpertBlockScales:
    """The block scales of E4M3 expert weights: w13 [E, ceil(2I/B0), ceil(H/B1)],
    w2 [E, ceil(H/B0), ceil(I/B1)], block (B0, B1)."""

    w13: torch.Tensor
    w2: torch.Tensor
    block: Tuple[int, int]


def fused_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: ExpertActivation,
    w13_bias: Optional[torch.Tensor] = None,
    w2_bias: Optional[torch.Tensor] = None,
    batch_invariant: bool = False,
    block_scales: Optional[ExpertBlockScales] = None,
    shared: Optional["SharedExperts"] = None,
) -> torch.Tensor:
    """The weighted sum of each token's chosen experts: Triton on CUDA, torch elsewhere.
    batch_invariant: a token's result does not depend on the other tokens.
    block_scales: w13 and w2 are block-FP8 (on the CPU: dequantized for the call).
    shared: shared experts to add as extra slots of the few-token kernels (CUDA only)."""
    if hidden.is_cuda:
        from radixserve.layers.moe.fused_moe_triton import fused_experts_triton

        return fused_experts_triton(
            hidden, w13, w2, topk_weights, topk_ids, activation, w13_bias, w2_bias, batch_invariant, block_scales,
            shared,
        )
    if shared is not None:
        raise ValueError("shared expert slots run on CUDA only")
    if block_scales is not None:  # a reference, not a fast path: the CPU has no FP8 GEMM
        from radixserve.layers.block_fp8 import dequantize_block_fp8

        w13 = dequantize_block_fp8(w13, block_scales.w13, block_scales.block).to(hidden.dtype)
        w2 = dequantize_block_fp8(w2, block_scales.w2, block_scales.block).to(hidden.dtype)
    return fused_experts_torch(
        hidden, w13, w2, topk_weights, topk_ids, activation, w13_bias, w2_bias, batch_invariant
    )


class FusedMoE(nn.Module):
    """One layer's experts. Under expert parallelism this rank holds experts
    [first_expert, first_expert + num_local_experts) of num_experts, and of
    each a 1/moe_tp_size column slice of gate/up (rows of down's input); the
    router stays replicated, so every rank sees every token's choice, runs its
    experts on the tokens routed to them, and the partial outputs are summed
    with one all-reduce over the tensor-parallel group. At tp=1 the forward is
    today's single call."""

    batch_invariant = False  # set by the model runner under --enable-deterministic-inference

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        activation: ExpertActivation = ExpertActivation(),
        bias: bool = False,
    ) -> None:
        super().__init__()
        parallel = get_parallel_config()
        if num_experts % parallel.ep_size or intermediate_size % parallel.moe_tp_size:
            raise ValueError(
                f"{num_experts} experts of intermediate size {intermediate_size} cannot be split over "
                f"ep_size {parallel.ep_size} x moe tp {parallel.moe_tp_size}"
            )
        self.tp_group = get_tp_group()
        self.num_experts = num_experts
        self.num_local_experts = num_experts // parallel.ep_size
        self.first_expert = parallel.ep_rank * self.num_local_experts
        self.full_intermediate_size = intermediate_size
        self.intermediate_size = inter = intermediate_size // parallel.moe_tp_size
        self.inter_start = parallel.moe_tp_rank * inter
        # Down's bias belongs to the whole expert: added by one rank of its column slices.
        self.adds_down_bias = parallel.moe_tp_rank == 0
        self.activation = activation
        local = self.num_local_experts
        self.w13 = nn.Parameter(torch.empty(local, 2 * inter, hidden_size))
        self.w2 = nn.Parameter(torch.empty(local, hidden_size, inter))
        self.register_parameter("w13_bias", nn.Parameter(torch.empty(local, 2 * inter)) if bias else None)
        self.register_parameter("w2_bias", nn.Parameter(torch.empty(local, hidden_size)) if bias else None)
        # Block-FP8 experts (block_fp8.prepare_block_fp8): the block size and scales.
        self.weight_block: Optional[Tuple[int, int]] = None
        self.register_parameter("w13_scale", None)
        self.register_parameter("w2_scale", None)

    def block_scales(self) -> Optional[ExpertBlockScales]:
        """The experts' block scales when they are block-FP8 now (not inside `unquantized`)."""
        if self.w13_scale is None:
            return None
        return ExpertBlockScales(self.w13_scale, self.w2_scale, self.weight_block)

    def forward(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                shared: Optional["SharedExperts"] = None) -> torch.Tensor:
        """shared: from `shared_slots`, whose output is then included."""
        if self.tp_group.world_size == 1:
            return fused_experts(
                hidden, self.w13, self.w2, topk_weights, topk_ids, self.activation, self.w13_bias, self.w2_bias,
                self.batch_invariant, self.block_scales(), shared,
            )
        if shared is not None:
            raise ValueError("shared expert slots need tensor-parallel size 1")
        topk_weights, topk_ids = self._local_choices(topk_weights, topk_ids, hidden.is_cuda)
        partial = fused_experts(
            hidden, self.w13, self.w2, topk_weights, topk_ids, self.activation, self.w13_bias,
            self.w2_bias if self.adds_down_bias else None, self.batch_invariant, self.block_scales(),
        )
        return self.tp_group.all_reduce(partial)

    def shared_slots(self, hidden: torch.Tensor, gate_up: nn.Module, down: nn.Module) -> Optional["SharedExperts"]:
        """A shared MLP (gate_up and down Linears, SiLU) as extra slots of one
        token's expert kernels, where they apply, else None (run it on its own).
        On its own at one token the shared MLP is two more GEMV launches after
        the experts' (the sum in the second); as slots its weights stream in
        the experts' two launches. At more tokens each token's slots would
        read the shared weights again, so only one token, on CUDA,
        unquantized, at tensor-parallel size 1."""
        if not (hidden.is_cuda and hidden.shape[0] == 1 and self.tp_group.world_size == 1):
            return None
        from radixserve.layers.moe.fused_moe_triton import few_tokens
        from radixserve.layers.moe.few_token_experts import SharedExperts

        plain = all(m.weight_scale is None and m.bias is None and m.lora is None and m.weight.dtype == self.w13.dtype
                    for m in (gate_up, down))
        inter = self.intermediate_size
        if not (plain and few_tokens(1, self.block_scales(), self.batch_invariant) and self.w13_bias is None
                and self.activation.kind == "silu" and down.in_features % inter == 0
                and gate_up.out_features == 2 * down.in_features):
            return None
        return SharedExperts(gate_up.weight, down.weight)

    def _local_choices(self, topk_weights: torch.Tensor, topk_ids: torch.Tensor, on_cuda: bool):
        """Global expert ids -> this rank's local ids. A choice of another
        rank's expert becomes id -1 for the torch path (skipped) and, for the
        Triton kernel, local expert 0 with weight 0 (no host sync, graph-safe;
        the wasted rows are the price of this first version)."""
        if self.num_local_experts == self.num_experts:
            return topk_weights, topk_ids
        local = topk_ids - self.first_expert
        elsewhere = (local < 0) | (local >= self.num_local_experts)
        if on_cuda:
            return topk_weights.masked_fill(elsewhere, 0.0), local.masked_fill(elsewhere, 0)
        return topk_weights, local.masked_fill(elsewhere, -1)

    def local_expert(self, expert: int) -> Optional[int]:
        """This rank's index of global expert `expert`, None when another rank holds it."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range (this layer has {self.num_experts})")
        local = expert - self.first_expert
        return local if 0 <= local < self.num_local_experts else None

    def local_expert_ids(self) -> range:
        """The global ids of the experts this rank holds."""
        return range(self.first_expert, self.first_expert + self.num_local_experts)

    def shard_view(self, expert: int, shard: str, kind: str = "weight") -> torch.Tensor:
        """This rank's slice of w13/w2 (or their biases or block scales) that
        one checkpoint tensor fills: shard "gate", "up" or "down"; kind
        "weight", "bias" or "weight_scale". `expert` is a global id and must be
        one this rank holds."""
        local = self.local_expert(expert)
        if local is None:
            raise ValueError(f"expert {expert} is held by another expert-parallel rank")
        # gate's rows, then up's: in blocks of rows for the scales (whole blocks: prepare_block_fp8)
        inter = self.intermediate_size if kind != "weight_scale" else self.intermediate_size // self.weight_block[0]
        suffix = {"weight": "", "bias": "_bias", "weight_scale": "_scale"}[kind]
        param = getattr(self, ("w2" if shard == "down" else "w13") + suffix)
        rows = slice(None) if shard == "down" else slice(0, inter) if shard == "gate" else slice(inter, 2 * inter)
        if param is None:
            raise ValueError(f"experts have no {kind}")
        return param.data[local, rows]

    def checkpoint_slice(self, shard: str, kind: str) -> Optional[ShardSlice]:
        """The part of a per-expert checkpoint tensor this rank keeps: its
        columns of the intermediate axis (rows of gate/up, columns of down's
        weight, and their blocks of scales); down's bias whole."""
        full, start, size = self.full_intermediate_size, self.inter_start, self.intermediate_size
        if shard == "down" and kind == "bias":
            return None
        weight_slice = ShardSlice(0 if shard != "down" else 1, start, size, full)
        if kind != "weight_scale":
            return weight_slice
        block = self.weight_block[weight_slice.dim]
        return block_scale_slice(weight_slice, block, f"experts' {shard} (intermediate size {full})")

    def load_expert(self, expert: int, shard: str, kind: str, tensor: torch.Tensor) -> None:
        """Copy one per-expert checkpoint tensor (e.g. experts.3.up_proj.weight)
        into place; a no-op for an expert another rank holds."""
        if self.local_expert(expert) is None:
            return
        target = self.shard_view(expert, shard, kind)
        copy_checkpoint_tensor(target, tensor, self.checkpoint_slice(shard, kind), f"expert {expert} {shard} {kind}")
