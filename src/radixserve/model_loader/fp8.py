"""Block-scaled FP8 checkpoints (DeepSeek-V3/R1): the weight stream.

A quantized weight W [rows, cols] is stored as float8_e4m3fn next to
`<name>_scale_inv`, float32 [ceil(rows/B0), ceil(cols/B1)]: one scale per
B0 x B1 block (config.json `quantization_config.weight_block_size`, [128, 128]
for DeepSeek), the last block of an axis partial when its size is not a
multiple. W = fp8 value * its block's scale. Everything else (norms, router,
embeddings) is stored unquantized and passes through.

What stays FP8, when the runner serves the checkpoint in FP8 (on CUDA by
default, on the CPU with --quantization fp8; layers/block_fp8.py): the weights
of the model's Linears and of its routed experts (FusedMoE). They pass through
as they are, each scale renamed `<name>_scale` (a Linear's `weight_scale`, an
expert's shard of `w13_scale`/`w2_scale`). Every other FP8 weight is
dequantized here to float32 (the model casts it to its dtype): the linears a
model reads directly rather than through Linear.forward (its
UNQUANTIZED_LINEARS: DeepSeek's kv_b_proj, which absorbed MLA attention splits
and multiplies itself), and everything on a runner that serves the checkpoint
dequantized (and in a weight update, which loads into dequantized copies).
Layers the model skips (DeepSeek-V3's multi-token-prediction layer) pass
through undequantized, to be dropped.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple

import torch

from radixserve.layers.block_fp8 import dequantize_block_fp8

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


def _never(name: str) -> bool:
    return False


class BlockFP8Weights:
    """(name, tensor) pairs with every FP8 weight replaced by its dequantized
    float32 value and the `_scale_inv` tensors dropped, except the weights
    `keep_fp8(name)` accepts: those come as the FP8 weight and its scales,
    named `<name>_scale` (a Linear's weight_scale). A weight and its scale may
    come in either order, from different files."""

    def __init__(self, weights: Iterable[Tuple[str, torch.Tensor]], block: Tuple[int, int],
                 keep_fp8: Callable[[str], bool] = _never) -> None:
        self.weights = weights
        self.block = block
        self.keep_fp8 = keep_fp8

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
                    yield from self._paired(weight_name, waiting_weights.pop(weight_name), tensor)
                else:
                    waiting_scales[weight_name] = tensor
            elif tensor.dtype in FP8_DTYPES:
                if name in waiting_scales:
                    yield from self._paired(name, tensor, waiting_scales.pop(name))
                else:
                    waiting_weights[name] = tensor
            else:
                yield name, tensor
        if waiting_weights or waiting_scales:
            unpaired = sorted(waiting_weights) + sorted(n + SCALE_SUFFIX for n in waiting_scales)
            raise ValueError(f"fp8 weights and scales without their pair: {', '.join(unpaired[:8])}")


    def _paired(self, name: str, weight: torch.Tensor, scale: torch.Tensor) -> Iterator[Tuple[str, torch.Tensor]]:
        if weight.dtype == torch.float8_e4m3fn and self.keep_fp8(name):  # (the E4M3 the kernels take)
            yield name, weight
            yield name + "_scale", scale
        else:
            yield name, dequantize_block_fp8(weight, scale, self.block)


def dequantize_fp8_if_quantized(weights: Any, folder: Any, keep_fp8: Callable[[str], bool] = _never) -> Any:
    """`weights` wrapped in BlockFP8Weights when the checkpoint in `folder` is block FP8."""
    block = checkpoint_block_fp8_size(folder)
    return weights if block is None else BlockFP8Weights(weights, block, keep_fp8)
