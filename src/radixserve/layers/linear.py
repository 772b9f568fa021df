"""Linear layers, plain and tensor-parallel.

A merged projection (q|k|v, gate|up) is one matmul on the hot path;
`load_shard` copies one checkpoint tensor into its slice. Under tensor
parallelism a column-parallel layer holds a slice of the output rows (each
part of a merged one: this rank's heads of q, k and v, its columns of gate and
up) and needs no communication; a row-parallel layer holds a slice of the
input columns and sums the ranks' partial outputs with one all-reduce. At
tp=1 both are the plain matmul: no collective, no copy.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from radixserve.distributed import get_tp_group
from radixserve.layers.activation import SiluAndMul
from radixserve.layers.batch_invariant import invariant_linear
from radixserve.layers.cpu_gemm_rows import bucketed_linear
from radixserve.layers.layernorm import DeferredNorm
from radixserve.layers.sharding import (
    HeadShard, ShardSlice, block_scale_slice, copy_checkpoint_tensor, even_slice, mark_sharded, split_heads,
)


class Linear(nn.Module):
    """Replicated: every rank holds the whole weight."""

    # Set by the model runner under --enable-deterministic-inference.
    batch_invariant = False
    # Set when the weight is quantized (layers/quantization.py): its format and
    # `weight_scale` (an instance attribute, None until then): per-output-channel
    # scales, or a block-FP8 checkpoint's block scales, a parameter loaded with
    # the weight (layers/block_fp8.py).
    weight_format = None
    # Set by the LoRA manager (lora/manager.py) on the projections adapters
    # target: a LoRATarget whose add_delta adds the batch's adapter deltas.
    lora = None

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features)) if bias else None)
        # Not a class attribute: a block-FP8 layer registers a parameter of this name.
        self.weight_scale: Optional[torch.Tensor] = None

    def forward(self, x: Union[torch.Tensor, DeferredNorm], activation: Optional[nn.Module] = None,
                addend: Optional[torch.Tensor] = None) -> torch.Tensor:
        """activation: a gated activation applied to x first ([gate | up] ->
        act(gate) * up); SiLU's is fused into a one-row product on CUDA.
        addend: a tensor of the output's shape added to it; a one-row
        product on CUDA adds it as its bias (no add kernel of its own).
        x may be a DeferredNorm: a one-row product on CUDA folds the norm in."""
        if isinstance(x, DeferredNorm):
            folded = self._gemv(x, self.bias) if x.foldable() and self.lora is None and activation is None \
                and addend is None else None
            if folded is not None:
                return folded
            x = x.value()
        fused = self._fused_forward(x, activation, addend)
        if fused is not None:
            return fused
        if activation is not None:
            x = activation(x)
        out = self.matmul(x, self.bias)
        if self.lora is not None:
            out = self.lora.add_delta(x, out)
        return out if addend is None else out + addend

    def _fused_forward(self, x: torch.Tensor, activation: Optional[nn.Module],
                       addend: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The whole forward as one GEMV kernel, where `_gemv` applies: with
        SiLU-and-mul fused in (not under LoRA, which needs the activated rows),
        and the addend as the kernel's bias (one output row, a layer without a
        bias of its own). Else None."""
        if self.lora is not None or (activation is not None and not isinstance(activation, SiluAndMul)):
            return None
        bias = self.bias
        if addend is not None:
            if bias is not None or addend.shape != (1, self.out_features) or not addend.is_contiguous():
                return None
            bias = addend.view(-1)
        elif activation is None:
            return None  # a plain product: matmul's own GEMV path
        return self._gemv(x, bias, silu_gated=activation is not None)

    def matmul(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.weight_scale is not None:
            return self.weight_format.matmul(x, self.weight, self.weight_scale, bias)
        if self.batch_invariant:
            return invariant_linear(x, self.weight, bias)
        out = self._gemv(x, bias)
        if out is not None:
            return out
        return bucketed_linear(x, self.weight, bias)

    def _gemv(self, x: Union[torch.Tensor, DeferredNorm], bias: Optional[torch.Tensor],
              silu_gated: bool = False) -> Optional[torch.Tensor]:
        """A batch-1 decode step's product through layers/gemv.py, where it
        applies (one row on CUDA; an FP8 weight, per-channel or block-scaled, or
        an unquantized one small enough to beat cuBLAS; with the SiLU fused in,
        a small weight only), else None. x: the row, or a DeferredNorm of it
        (the norm folded into the same kernel)."""
        row = x.x if isinstance(x, DeferredNorm) else x
        if self.batch_invariant or not (row.is_cuda and row.dim() == 2 and row.shape[0] == 1
                                        and row.stride(-1) == 1):
            return None
        from radixserve.layers import gemv  # Triton: imported where it runs

        def product(scale: Optional[torch.Tensor], scale_block: Optional[Tuple[int, int]] = None) -> torch.Tensor:
            if isinstance(x, DeferredNorm):
                return x.fold_into_gemv(self.weight, scale, bias, scale_block)
            return gemv.gemv(x, self.weight, scale, bias, silu_gated=silu_gated, scale_block=scale_block)

        if silu_gated and not gemv.fuse_activation(self.weight):
            return None
        if self.weight_scale is not None:
            fmt = self.weight_format  # FP8 with per-channel or (a block-FP8 checkpoint's) block scales
            if fmt.name != "fp8" and fmt.block is None:
                return None
            return product(self.weight_scale, fmt.block)
        if not gemv.prefer_over_cublas(self.weight, after_norm=isinstance(x, DeferredNorm)):
            return None
        return product(None)


class ColumnParallelLinear(Linear):
    """Output rows split evenly over the tensor-parallel ranks (by heads when
    the rows are heads' blocks: DeepSeek's q_b_proj, kv_b_proj). Each rank's
    output is its own slice; no communication."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        shard = even_slice(out_features, dim=0)
        super().__init__(in_features, shard.size, bias)
        mark_sharded(self.weight, shard)
        mark_sharded(self.bias, shard)


class RowParallelLinear(Linear):
    """Input columns split over the ranks (o_proj, down_proj): each rank's
    product is a partial sum, added up by one all-reduce; the bias is added
    once, after it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        shard = even_slice(in_features, dim=1)
        super().__init__(shard.size, out_features, bias)
        mark_sharded(self.weight, shard)
        self.tp_group = get_tp_group()

    def forward(self, x: torch.Tensor, activation: Optional[nn.Module] = None,
                addend: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.tp_group.world_size == 1:
            return super().forward(x, activation, addend)
        if activation is not None:
            x = activation(x)
        partial = self.matmul(x, None)
        if self.lora is not None:  # this rank's columns of A: a partial delta, summed with the product
            partial = self.lora.add_delta(x, partial)
        out = self.tp_group.all_reduce(partial)
        out = out if self.bias is None else out + self.bias
        return out if addend is None else out + addend  # once, after the sum


class MergedLinear(Linear):
    """Several projections of the same input stacked on the output axis.

    shard_sizes: each part's rows on this rank. sources: where each part's
    rows come from in its full checkpoint tensor (default: all of it)."""

    def __init__(self, in_features: int, shard_sizes: Dict[str, int], bias: bool = False,
                 sources: Optional[Dict[str, ShardSlice]] = None) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias)
        self.shard_offsets: Dict[str, Tuple[int, int]] = {}  # name -> (first row, rows)
        self.shard_sources: Dict[str, ShardSlice] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (offset, size)
            self.shard_sources[name] = (sources or {}).get(name) or ShardSlice(0, 0, size, size)
            offset += size

    def load_shard(self, shard: str, param_name: str, tensor: torch.Tensor) -> None:
        """Copy this rank's rows of one checkpoint tensor (e.g. k_proj.weight)
        into its rows of the merged parameter."""
        param = {"weight": self.weight, "bias": self.bias, "weight_scale": self.weight_scale}.get(param_name)
        if param is None:
            raise ValueError(f"merged projection has no {param_name!r} for shard {shard!r}")
        offset, size = self.shard_offsets[shard]
        source = self.shard_sources[shard]
        if param_name == "weight_scale":  # block scales: one per block of rows (block_fp8.check_merged_parts)
            rows = self.weight_format.block[0]
            offset, size = offset // rows, -(-size // rows)
            source = block_scale_slice(source, rows, f"shard {shard!r}")
        copy_checkpoint_tensor(param.data[offset:offset + size], tensor, source, f"shard {shard!r} {param_name}")

    def split_output(self, out: torch.Tensor) -> List[torch.Tensor]:
        """The merged output cut back into its projections (views, no copy)."""
        return list(out.split([size for _, size in self.shard_offsets.values()], dim=-1))


class MergedColumnParallelLinear(MergedLinear):
    """gate|up: each rank holds its equal share of the columns of every part."""

    def __init__(self, in_features: int, full_sizes: Dict[str, int], bias: bool = False) -> None:
        sources = {name: even_slice(size) for name, size in full_sizes.items()}
        super().__init__(in_features, {n: s.size for n, s in sources.items()}, bias, sources)


class QKVParallelLinear(MergedLinear):
    """q|k|v by heads: this rank's q heads and the KV heads they read
    (`heads` says which; a KV head is replicated when there are fewer than ranks)."""

    def __init__(self, in_features: int, head_dim: int, total_heads: int, total_kv_heads: int,
                 bias: bool = False) -> None:
        self.heads: HeadShard = split_heads(total_heads, total_kv_heads)
        h = self.heads
        q = ShardSlice(0, h.first_head * head_dim, h.num_heads * head_dim, total_heads * head_dim)
        kv = ShardSlice(0, h.first_kv_head * head_dim, h.num_kv_heads * head_dim, total_kv_heads * head_dim)
        sources = {"q": q, "k": kv, "v": kv}
        super().__init__(in_features, {n: s.size for n, s in sources.items()}, bias, sources)
