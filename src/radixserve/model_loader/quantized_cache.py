"""A GGUF model's quantized weights, cached on disk between starts.

On the CPU a 4-bit GGUF serves as int4 (layers/quantization.py), so every start
would dequantize each block to float32, load it into the model and quantize it
again: more than a second for the default model, on the way to its first
answer. The first start saves the finished weights (every parameter, and each
quantized layer's codes and scales) in one safetensors file next to the GGUF's
cached config; later starts build the model and load that file instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from radixserve.layers.embedding import LMHead
from radixserve.layers.linear import Linear
from radixserve.layers.quantization import WeightFormat

logger = logging.getLogger(__name__)

# Part of the cache's name: bump it when a weight format's layout changes, so
# no start reads codes written in an older layout.
LAYOUT_VERSION = 1
SCALE, HEAD_CODES, HEAD_SCALE = "weight_scale", "qweight", "qscale"


def cache_name(fmt: WeightFormat, dtype: torch.dtype) -> str:
    """The cache's folder name: torch's packed int4 layout may change between
    torch versions, so its version is part of it."""
    return f"weights-{fmt.name}-{str(dtype).removeprefix('torch.')}-torch{torch.__version__}-v{LAYOUT_VERSION}"


def quantized_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every parameter (a tied one once) and every quantized layer's scales,
    and the LM head's quantized copy, by name."""
    tensors = {name: p.data for name, p in model.named_parameters()}
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module.weight_scale is not None:
            tensors[f"{name}.{SCALE}"] = module.weight_scale
        elif isinstance(module, LMHead) and module.weight_format is not None:
            tensors[f"{name}.{HEAD_CODES}"], tensors[f"{name}.{HEAD_SCALE}"] = module.qweight, module.qscale
    return {name: t.contiguous() for name, t in tensors.items()}


def save_quantized(model: nn.Module, path: Path) -> None:
    """Write the model's weights to `path` atomically (a reader never sees half
    a file); a failure to write only means no cache."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(quantized_tensors(model), str(tmp))
        os.replace(tmp, path)
    except OSError as e:
        logger.debug("not caching the quantized weights in %s: %s", path, e)
    finally:
        tmp.unlink(missing_ok=True)


@torch.no_grad()
def load_quantized(model: nn.Module, path: Path, fmt: WeightFormat) -> None:
    """Fill a freshly built model from a file save_quantized wrote for the same
    model, format and dtype: quantized layers take its codes and scales, the
    other parameters its values. Raises ValueError when the file does not fit."""
    # Copies: load_file's tensors are views into one buffer at any 8-byte offset,
    # and torch's packed int8/int4 CPU kernels crash on weights not 64-byte aligned.
    saved = {name: t.clone() for name, t in load_file(str(path)).items()}
    missing = {name for name, _ in model.named_parameters()} - set(saved)
    if missing:
        raise ValueError(f"the cached weights lack {sorted(missing)[:3]}")
    for name, module in model.named_modules():
        if isinstance(module, Linear) and f"{name}.{SCALE}" in saved:
            module.unquantized_dtype = module.weight.dtype
            module.weight = nn.Parameter(saved.pop(f"{name}.weight"), requires_grad=False)
            module.weight_scale, module.weight_format = saved.pop(f"{name}.{SCALE}"), fmt
        elif isinstance(module, LMHead) and f"{name}.{HEAD_CODES}" in saved:
            module.qweight, module.qscale = saved.pop(f"{name}.{HEAD_CODES}"), saved.pop(f"{name}.{HEAD_SCALE}")
            module.weight_format = fmt.lm_head
    for name, param in model.named_parameters():
        if name in saved:
            if saved[name].shape != param.shape:
                raise ValueError(f"the cached {name} has shape {tuple(saved[name].shape)}, not {tuple(param.shape)}")
            param.copy_(saved[name])
