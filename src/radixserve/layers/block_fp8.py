"""Block-scaled FP8 weights, served as FP8 (DeepSeek-V3/R1 checkpoints).

A weight W [N, K] is float8 E4M3 with one float32 scale per B0 x B1 block,
[ceil(N/B0), ceil(K/B1)] (the last block of an axis partial when its size is
not a multiple): W = q * scale[n // B0, k // B1]. The checkpoint's values and
scales are loaded as they are (no dequantization, no requantization):
`prepare_block_fp8` turns the model's Linears into FP8 parameters with a
`weight_scale` parameter, and its FusedMoE experts into FP8 w13/w2 with
`w13_scale`/`w2_scale`, before the weights stream in.

The product (`block_fp8_linear`), like `quantization.fp8_linear`:
- CUDA, one row: layers/gemv.py, the weight widened with its block scales.
- CUDA, up to 16 rows: block_fp8_kernels' GEMM without activation quantization.
- CUDA, more rows: the activations quantized per token and per B1 columns
  (one Triton kernel), then the block-scaled FP8 GEMM.
- CPU: the weight dequantized for each call, the activations unquantized (the
  weight-only path's numerics, in float32): a reference, not a fast path.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, Tuple

import torch
from torch import nn

from radixserve.layers.quantization import FP8_DTYPE, FP8_MAX, ROUTER_NAMES, WeightFormat
from radixserve.layers.sharding import ShardSlice, block_scale_slice, mark_sharded

Block = Tuple[int, int]
# Up to this many rows the weight-only GEMM runs (as fp8_kernels.WEIGHT_ONLY_MAX_ROWS).
WEIGHT_ONLY_MAX_ROWS = 16


def scale_grid(shape: Tuple[int, int], block: Block) -> Tuple[int, int]:
    """The block-scale shape of a weight [N, K]: [ceil(N/B0), ceil(K/B1)]."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def _expand_scales(scale: torch.Tensor, shape: Tuple[int, int], block: Block) -> torch.Tensor:
    """Per-block scales [..., ceil(N/B0), ceil(K/B1)] -> one per element [..., N, K]."""
    rows, cols = shape
    scale = scale.float().repeat_interleave(block[0], dim=-2)[..., :rows, :]
    return scale.repeat_interleave(block[1], dim=-1)[..., :cols]


def dequantize_block_fp8(weight: torch.Tensor, scale: torch.Tensor, block: Block) -> torch.Tensor:
    """fp8 weight [..., N, K] times its per-block scales [..., ceil(N/B0),
    ceil(K/B1)] -> float32 [..., N, K]."""
    rows, cols = weight.shape[-2:]
    grid = scale_grid((rows, cols), block)
    if tuple(scale.shape[-2:]) != grid or scale.shape[:-2] != weight.shape[:-2]:
        raise ValueError(
            f"fp8 weight {tuple(weight.shape)} with blocks {block} needs scales [..., {grid[0]}, {grid[1]}], "
            f"got {tuple(scale.shape)}"
        )
    return weight.float() * _expand_scales(scale, (rows, cols), block)


def quantize_block_fp8(w: torch.Tensor, block: Block) -> Tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (E4M3 q [..., N, K], float32 scales [..., ceil(N/B0),
    ceil(K/B1)]), each block's largest magnitude mapped to 448 (how DeepSeek's
    are made)."""
    *lead, rows, cols = w.shape
    grid = scale_grid((rows, cols), block)
    padded = w.new_zeros(*lead, grid[0] * block[0], grid[1] * block[1], dtype=torch.float32)
    padded[..., :rows, :cols] = w
    tiles = padded.view(*lead, grid[0], block[0], grid[1], block[1])
    scale = tiles.abs().amax(dim=(-3, -1)).clamp(min=1e-12) / FP8_MAX
    q = (w.float() / _expand_scales(scale, (rows, cols), block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def block_fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: Optional[torch.Tensor], block: Block) -> torch.Tensor:
    """x [..., K] (any float dtype) times an E4M3 weight [N, K] with block
    scales [ceil(N/B0), ceil(K/B1)] (+ bias) -> [..., N] in x's dtype."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    n = weight.shape[0]
    if rows.is_cuda:
        from radixserve.layers import block_fp8_kernels, gemv  # Triton: imported where it runs

        if rows.shape[0] == 1:  # a batch-1 decode: a matrix-vector product
            out = gemv.gemv(rows.contiguous(), weight, weight_scale, bias, scale_block=block)
        elif rows.shape[0] <= WEIGHT_ONLY_MAX_ROWS:  # a decode: read the weight once, x as it is
            out = block_fp8_kernels.block_fp8_matmul(rows, None, weight, weight_scale, block, x.dtype, bias)
        else:
            xq, x_scale = block_fp8_kernels.quantize_groups_fp8(rows, block[1])
            out = block_fp8_kernels.block_fp8_matmul(xq, x_scale, weight, weight_scale, block, x.dtype, bias)
        return out.view(*shape[:-1], n)
    # The CPU: the weight dequantized for the call, the activations as they are
    # (torch has no block-scaled FP8 GEMM here, so quantizing them would only
    # add error), in float32: the CUDA weight-only path's numerics.
    out = torch.nn.functional.linear(rows.float(), dequantize_block_fp8(weight, weight_scale, block),
                                     None if bias is None else bias.float())
    return out.to(x.dtype).view(*shape[:-1], n)


def block_fp8_format(block: Block) -> WeightFormat:
    """The weight format of a block-scaled FP8 checkpoint with blocks `block`."""
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"weight_block_size must be two positive sizes, got {block!r}")
    block = (int(block[0]), int(block[1]))
    return WeightFormat(
        f"fp8-block{block[0]}x{block[1]}",
        functools.partial(block_fp8_linear, block=block),
        functools.partial(quantize_block_fp8, block=block),
        functools.partial(dequantize_block_fp8, block=block),
        block=block,
    )


def holds_block_fp8(module: Optional[nn.Module]) -> bool:
    """Whether `module` (a Linear or a FusedMoE) holds block-FP8 weights now,
    not the dequantized copies of `quantization.unquantized`."""
    fmt = getattr(module, "weight_format", None)
    if fmt is not None and fmt.block is not None and getattr(module, "weight_scale", None) is not None:
        return True
    return getattr(module, "w13_scale", None) is not None


def _fp8_parameter(like: torch.Tensor, shard: Optional[ShardSlice]) -> nn.Parameter:
    empty = torch.empty(like.shape, dtype=FP8_DTYPE, device=like.device)
    return mark_sharded(nn.Parameter(empty, requires_grad=False), shard)


def _scale_parameter(shape: Tuple[int, ...], device: torch.device, shard: Optional[ShardSlice]) -> nn.Parameter:
    empty = torch.empty(shape, dtype=torch.float32, device=device)
    return mark_sharded(nn.Parameter(empty, requires_grad=False), shard)


def prepare_block_fp8(model: nn.Module, fmt: WeightFormat, skip: Iterable[str] = ()) -> int:
    """Before loading: every Linear of the model, except routers and the names
    in `skip` (weights the model reads itself), gets an empty E4M3 weight and a
    float32 `weight_scale` parameter of its block grid, for the checkpoint's
    values to be copied into; every FusedMoE the same for w13 and w2
    (`w13_scale`, `w2_scale`). Under tensor parallelism a shard must start on
    a block boundary (ValueError naming the layer otherwise). Returns how many
    modules were prepared."""
    from radixserve.layers.linear import Linear, MergedLinear
    from radixserve.layers.moe.layer import FusedMoE

    keep = set(ROUTER_NAMES) | set(skip)
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, FusedMoE):
            _prepare_experts(module, fmt.block, name)
        elif isinstance(module, Linear) and name.rsplit(".", 1)[-1] not in keep:
            weight = module.weight
            shard: Optional[ShardSlice] = getattr(weight, "shard_slice", None)
            where = f"{name} (weight {tuple(weight.shape)}, blocks {fmt.block})"
            if isinstance(module, MergedLinear):
                check_merged_parts(module, fmt.block[0], where)
            scale_shard = None if shard is None else block_scale_slice(shard, fmt.block[shard.dim], where)
            module.unquantized_dtype = weight.dtype
            module.weight = _fp8_parameter(weight, shard)
            module.weight_scale = _scale_parameter(scale_grid(tuple(weight.shape), fmt.block), weight.device,
                                                   scale_shard)
            module.weight_format = fmt
        else:
            continue
        count += 1
    return count


def _prepare_experts(experts: nn.Module, block: Block, name: str) -> None:
    """A FusedMoE's w13 [E, 2I, H] and w2 [E, H, I] as E4M3 with block scales.
    gate's and up's rows must each be whole blocks, on every moe-tp rank."""
    inter, full = experts.intermediate_size, experts.full_intermediate_size
    where = f"{name} (intermediate size {full}, {inter} on this rank, blocks {block})"
    if inter % block[0]:
        raise ValueError(f"{where}: gate's and up's rows are not whole {block[0]}-row blocks")
    block_scale_slice(ShardSlice(1, experts.inter_start, inter, full), block[1], where)  # down's columns
    experts.unquantized_dtype = experts.w13.dtype
    experts.weight_block = block
    for attr in ("w13", "w2"):
        weight = getattr(experts, attr)
        setattr(experts, attr, _fp8_parameter(weight, None))
        shape = (weight.shape[0], *scale_grid(tuple(weight.shape[1:]), block))
        setattr(experts, attr + "_scale", _scale_parameter(shape, weight.device, None))


def check_merged_parts(module: nn.Module, block_rows: int, where: str) -> None:
    """A merged projection's parts (q|k|v, gate|up) each take whole blocks of
    rows: every part but the last a multiple of the block, and each part's
    rows of its checkpoint tensor starting on a block."""
    parts = list(module.shard_offsets.items())
    for i, (part, (offset, size)) in enumerate(parts):
        if size % block_rows and i < len(parts) - 1:
            raise ValueError(f"{where}: part {part!r} has {size} rows, not a multiple of the "
                             f"{block_rows}-row block, so its blocks would mix with the next part's")
        block_scale_slice(module.shard_sources[part], block_rows, f"{where} part {part!r}")


@contextmanager
def unquantized_experts(model: nn.Module) -> Iterator[None]:
    """`quantization.unquantized` for block-FP8 experts: w13/w2 dequantized to
    the model's dtype for the duration (their scales set to None), quantized
    per block back into the same tensors after."""
    experts = [m for m in model.modules() if getattr(m, "w13_scale", None) is not None]
    saved = [(m, attr, getattr(m, attr), getattr(m, attr + "_scale")) for m in experts for attr in ("w13", "w2")]
    for m, attr, weight, scale in saved:
        dense = dequantize_block_fp8(weight, scale, m.weight_block).to(m.unquantized_dtype)
        setattr(m, attr, nn.Parameter(dense, requires_grad=False))
        setattr(m, attr + "_scale", None)
    try:
        yield
    finally:
        for m, attr, weight, scale in saved:
            q, new_scale = quantize_block_fp8(getattr(m, attr).data, m.weight_block)
            weight.data.copy_(q)
            scale.data.copy_(new_scale)
            setattr(m, attr, weight)
            setattr(m, attr + "_scale", scale)
