"""Build a model and fill its weights (from files, or random for benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Tuple, Union

import torch
from torch import nn
from tqdm import tqdm

from radixserve.distributed import get_tp_group
from radixserve.layers.block_fp8 import holds_block_fp8, prepare_block_fp8
from radixserve.layers.quantization import WeightFormat
from radixserve.model_loader.fp8 import BlockFP8Weights, checkpoint_block_fp8_size, dequantize_fp8_if_quantized
from radixserve.model_loader.gguf_weights import GGUFWeights
from radixserve.model_loader.hf_weights import HFWeights
from radixserve.model_loader.mxfp4 import Mxfp4Weights, is_mxfp4
from radixserve.model_loader.source import ModelSource
from radixserve.model_loader.weight_loader import checkpoint_weight_owner, is_extra_layer, load_weights
from radixserve.models.registry import get_model_class

LOAD_FORMATS = ("auto", "dummy")


def open_weights(source: ModelSource, keep_fp8: Callable[[str], bool] = lambda name: False,
                 ) -> Union[GGUFWeights, HFWeights, BlockFP8Weights, Mxfp4Weights]:
    """An iterable of (hf_name, tensor) with a len(), for either kind of source.
    Quantized checkpoints (block FP8, MXFP4: their config.json says so) come
    dequantized, for a load and for a weight update alike, except a block-FP8
    weight `keep_fp8(name)` accepts (fp8.py: with its scales, as they are)."""
    if source.kind == "gguf":
        return GGUFWeights(source.path)  # dequantized one whole tensor at a time, then sliced
    mxfp4 = is_mxfp4(checkpoint_quantization_config(source.folder))
    fp8 = checkpoint_block_fp8_size(source.folder) is not None
    # Under tensor parallelism a rank reads only its slice of each tensor from
    # disk; quantized checkpoints are dequantized one whole tensor at a time.
    lazy = get_tp_group().world_size > 1 and not (mxfp4 or fp8)
    weights = dequantize_fp8_if_quantized(HFWeights(source.path, lazy=lazy), source.folder, keep_fp8)
    if mxfp4:
        weights = Mxfp4Weights(weights)  # GPT-OSS: experts as FP4 blocks + scales
    return weights


def block_fp8_weights_of(model: nn.Module) -> Callable[[str], bool]:
    """Whether a checkpoint weight loads into one of the model's block-FP8
    Linears or experts, or is skipped (not worth dequantizing: DeepSeek-V3's
    multi-token-prediction layer is a whole MoE layer)."""
    modules = dict(model.named_modules())
    return lambda name: is_extra_layer(model, name) or holds_block_fp8(checkpoint_weight_owner(model, modules, name))


def checkpoint_quantization_config(folder: Path) -> Optional[dict]:
    path = Path(folder) / "config.json"
    return json.loads(path.read_text()).get("quantization_config") if path.is_file() else None


def iterate_weights(source: ModelSource) -> Iterator[Tuple[str, torch.Tensor]]:
    """(hf_name, tensor) for every weight of the source. GGUF tensors come
    dequantized to float32 and un-permuted; safetensors keep their dtype."""
    return iter(open_weights(source))


def load_model(
    source: ModelSource,
    config: Any,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str = "auto",
    with_lm_head: bool = True,
    block_fp8: Optional[WeightFormat] = None,
) -> nn.Module:
    """The model for `config`, built on `device` in `dtype`, in eval mode, with
    weights from `source` ("auto") or small random values ("dummy": reads no
    weight file, for benchmarking shapes whose checkpoint is not at hand).
    with_lm_head False (embedding serving): no LM head, which embedding
    checkpoints (saved from the bare decoder) do not have. block_fp8: a
    block-FP8 checkpoint's format: its linears are loaded as FP8 with their
    block scales (layers/block_fp8.py), the rest dequantized."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    model = build_model(config, dtype, device)
    if not with_lm_head:
        model.lm_head = None
    if block_fp8 is not None:
        prepare_block_fp8(model, block_fp8, skip=getattr(model, "UNQUANTIZED_LINEARS", ()))
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        weights = open_weights(source, block_fp8_weights_of(model))
        progress = tqdm(weights, total=len(weights), desc="Loading weights", unit="tensor", leave=False)
        with torch.no_grad():
            load_weights(model, progress)
    return model.eval()


def build_model(config: Any, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The model for `config` on `device` in `dtype`, its weights not yet filled."""
    model_cls = get_model_class(config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return model_cls(config).eval()
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights of the real shapes. Small values keep activations finite
    through many layers; norms are 1 so each layer passes its input on scaled
    as in a trained model. Filled in place on the parameter's own device, so
    a large model costs no host copy."""
    generators = {}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        gen = generators.get(param.device)
        if gen is None:
            gen = generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        if param.dtype == torch.float8_e4m3fn:  # block FP8: values of the E4M3 range, scaled down below
            param.copy_(torch.empty(param.shape, device=param.device).uniform_(-448, 448, generator=gen))
        elif name.endswith("_scale"):  # their block scales (weight_scale, w13_scale, w2_scale)
            param.fill_(1e-3 / 448)
        else:
            param.uniform_(-1e-3, 1e-3, generator=gen)
