"""Block-scaled FP8 checkpoints (DeepSeek-V3/R1): weights dequantized while they stream in.

A quantized weight W [rows, cols] is stored as float8_e4m3fn next to
`<name>_scale_inv`, float32 [ceil(rows/B0), ceil(cols/B1)]: one scale per
B0 x B1 block (config.json `quantization_config.weight_block_size`, [128, 128]
for DeepSeek), the last block of an axis partial when its size is not a
multiple. W = fp8 value * its block's scale. Everything else (norms, router,
embeddings) is stored unquantized and passes through.

The model then casts the float32 result to its own dtype, as for any
checkpoint; serving the FP8 weights as FP8 (block-scaled GEMMs) is later work.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple

import torch

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def block_fp8_size(quantization_config: Any) -> Optional[Tuple[int, int]]:
    """The (rows, cols) block size when the config names block-scaled FP8, else None."""
    qc = quantization_config
    if qc is None:
        return None
    get = qc.get if isinstance(qc, dict) else lambda key, default=None: getattr(qc, key, default)
    if str(get("quant_method", "")).lower() != "fp8":
        return None
    block = get("weight_block_size", None)
    if not block or len(block) != 2:
        raise ValueError(
            f"fp8 checkpoints are supported with block-wise scales only (weight_block_size [r, c]); "
            f"quantization_config has weight_block_size={block!r}"
        )
    return int(block[0]), int(block[1])


def checkpoint_block_fp8_size(folder: Any) -> Optional[Tuple[int, int]]:
    """block_fp8_size of the config.json in a checkpoint folder (None without one)."""
    from pathlib import Path

    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    return block_fp8_size(json.loads(path.read_text()).get("quantization_config"))


def dequantize_block_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: Tuple[int, int]) -> torch.Tensor:
    """fp8 weight [..., rows, cols] times its per-block scales [..., ceil(rows/B0),
    ceil(cols/B1)] -> float32 [..., rows, cols]."""
    rows, cols = weight.shape[-2:]
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale_inv.shape[-2:]) != grid or scale_inv.shape[:-2] != weight.shape[:-2]:
        raise ValueError(
            f"fp8 weight {tuple(weight.shape)} with blocks {block} needs scales [..., {grid[0]}, {grid[1]}], "
            f"got {tuple(scale_inv.shape)}"
        )
    scales = scale_inv.float().repeat_interleave(block[0], dim=-2)[..., :rows, :]
    scales = scales.repeat_interleave(block[1], dim=-1)[..., :cols]
    return weight.float() * scales


class BlockFP8Weights:
    """(name, tensor) pairs with every FP8 weight replaced by its dequantized
    float32 value and the `_scale_inv` tensors dropped. A weight and its scale
    may come in either order, from different files."""

    def __init__(self, weights: Iterable[Tuple[str, torch.Tensor]], block: Tuple[int, int]) -> None:
        self.weights = weights
        self.block = block

    def __len__(self) -> int:
        # The source's count (a progress bar's total): each pair counts twice there.
        return len(self.weights)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Tuple[str, torch.Tensor]]:
        waiting_weights: Dict[str, torch.Tensor] = {}
        waiting_scales: Dict[str, torch.Tensor] = {}
        for name, tensor in self.weights:
            if name.endswith("input_scale"):
                raise ValueError(f"{name}: static activation scales are not supported (only dynamic fp8)")
            if name.endswith(SCALE_SUFFIX):
                weight_name = name[: -len(SCALE_SUFFIX)]
                if weight_name in waiting_weights:
                    yield weight_name, dequantize_block_fp8(waiting_weights.pop(weight_name), tensor, self.block)
                else:
                    waiting_scales[weight_name] = tensor
            elif tensor.dtype in FP8_DTYPES:
                if name in waiting_scales:
                    yield name, dequantize_block_fp8(tensor, waiting_scales.pop(name), self.block)
                else:
                    waiting_weights[name] = tensor
            else:
                yield name, tensor
        if waiting_weights or waiting_scales:
            unpaired = sorted(waiting_weights) + sorted(n + SCALE_SUFFIX for n in waiting_scales)
            raise ValueError(f"fp8 weights and scales without their pair: {', '.join(unpaired[:8])}")


def dequantize_fp8_if_quantized(weights: Any, folder: Any) -> Any:
    """`weights` wrapped in BlockFP8Weights when the checkpoint in `folder` is block FP8."""
    block = checkpoint_block_fp8_size(folder)
    return weights if block is None else BlockFP8Weights(weights, block)
