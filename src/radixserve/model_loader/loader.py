"""Build a model and fill its weights (from files, or random for benchmarks)."""

from __future__ import annotations

from typing import Any, Iterator, Tuple

import torch
from torch import nn
from tqdm import tqdm

from radixserve.model_loader.gguf_weights import count_gguf_tensors, iterate_gguf_weights
from radixserve.model_loader.hf_weights import count_hf_tensors, iterate_hf_weights
from radixserve.model_loader.source import ModelSource
from radixserve.models.registry import get_model_class


def iterate_weights(source: ModelSource, config: Any) -> Iterator[Tuple[str, torch.Tensor]]:
    if source.kind == "gguf":
        return iterate_gguf_weights(source.path, config)
    return iterate_hf_weights(source.path)


def count_weights(source: ModelSource) -> int:
    return count_gguf_tensors(source.path) if source.kind == "gguf" else count_hf_tensors(source.path)


def load_model(
    source: ModelSource, config: Any, dtype: torch.dtype, device: torch.device, load_format: str = "auto"
) -> nn.Module:
    model_cls = get_model_class(config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        total = count_weights(source)
        weights = tqdm(iterate_weights(source, config), total=total, desc="Loading weights",
                       unit="tensor", leave=False)
        with torch.no_grad():
            model.load_weights(weights)
    return model.eval()


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights of the real shapes, without reading any file: small values
    keep activations finite through many layers."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            values = torch.empty(param.shape, dtype=torch.float32).uniform_(-1e-3, 1e-3, generator=gen)
            param.copy_(values.to(param.dtype))
